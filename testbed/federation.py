"""The server's half of a federated round, and a whole round in this process.

`server_step` takes the global weights, the uploads, the round context (which carries the
seed every random choice derives from) and configuration, and returns new state; the
client's half is `testbed.local_training.client_step`. Nothing is kept between calls, so
another execution engine can drive the same steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from testbed.local_training import ClientData, LocalConfig, Trainer, client_step, local_sgd
from testbed.pluginmanager import PluginError, implementers_text
from testbed.state import (
    ENGINE_KEYS,
    Aggregate,
    Broadcast,
    ClientUpdate,
    RoundContext,
    generator,
    plain_value,
)

Aggregator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``fn(updates[k, d], sizes[k]) -> delta[d]``, or an object whose ``aggregate(updates,
sizes, ctx, clients)`` returns a ``Screening`` (delta, per-row weights, kept mask)."""


@dataclass
class FederationState:
    """Everything a federation needs to continue: the server's model, what each client
    last received, and the number of finished rounds."""

    round: int
    global_weights: torch.Tensor
    client_weights: dict[int, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)


def sample_clients(
    seed: int, rnd: int, n_clients: int, m: int, sampling: str = "fixed"
) -> tuple[int, ...]:
    """The round's clients, fixed by seed and round. 'fixed': m of N without replacement.
    'poisson': each client independently with probability q = m / N (DP-FedAvg, McMahan
    et al. 2018), so a round may sample none; only this kind of sampling lets a DP
    accountant claim amplification by q."""
    g = generator(seed, rnd, "sample")
    if sampling == "poisson":
        keep = torch.rand(n_clients, generator=g) < m / n_clients
        return tuple(torch.nonzero(keep).flatten().tolist())
    if sampling != "fixed":
        raise ValueError(f"client sampling {sampling!r}: expected 'fixed' or 'poisson'")
    if m == n_clients:
        return tuple(range(n_clients))
    perm = torch.randperm(n_clients, generator=g)
    return tuple(sorted(perm[:m].tolist()))


@dataclass(frozen=True)
class UpdatePolicy:
    """What the server does with an upload it cannot trust. Non-finite values and wrong
    shapes are always dropped; an update whose norm exceeds ``max_norm`` is dropped or
    clipped to ``max_norm`` (``on_excess_norm``)."""

    max_norm: float = 1e4
    on_excess_norm: str = "drop"


def _screen_one(
    delta: object, expected: torch.Tensor, policy: UpdatePolicy
) -> tuple[str, str, str, torch.Tensor | None] | None:
    """(kind, detail, action, delta to keep) for one upload, or None if it passes."""
    if not isinstance(delta, torch.Tensor) or delta.shape != expected.shape:
        shape = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
        return "shape", f"shape {shape}, expected {tuple(expected.shape)}", "dropped", None
    if not delta.is_floating_point():
        # integer, bool or complex: not a weight update, whatever its values
        return "dtype", f"dtype {delta.dtype}, expected a real floating dtype", "dropped", None
    if not bool(torch.isfinite(delta).all()):
        kind = "nan" if bool(torch.isnan(delta).any()) else "inf"
        return kind, f"{int((~torch.isfinite(delta)).sum())} non-finite values", "dropped", None
    # float64: a float32 norm of finite values can overflow to inf (and clip to zero)
    norm = float(torch.linalg.vector_norm(delta.to(torch.float64)))
    if norm <= policy.max_norm and delta.dtype == expected.dtype:
        return None
    if norm <= policy.max_norm:  # a real float of another precision: use it, in ours
        return "", "", "", delta.to(expected.dtype)
    detail = f"norm {norm:.3g} > {policy.max_norm:g}"
    if policy.on_excess_norm == "clip":
        clipped = (delta.to(torch.float64) * (policy.max_norm / norm)).to(expected.dtype)
        return "norm", detail, "clipped", clipped
    return "norm", detail, "dropped", None


def screen_updates(
    updates: Sequence[ClientUpdate], expected: torch.Tensor, policy: UpdatePolicy
) -> list[dict[str, Any]]:
    """Mark broken or hostile uploads before any hook or aggregator sees them; returns
    one event per finding, for the report. Uploads that pass are in ``expected``'s dtype."""
    events = []
    for u in updates:
        found = _screen_one(u.delta, expected, policy)
        if found is None:
            continue
        kind, detail, action, keep = found
        if keep is not None:
            u.delta = keep
        if action == "dropped":
            u.dropped = f"{kind}: {detail}"
        if action:
            events.append({"client": u.client_id, "kind": kind, "detail": detail, "action": action})
    return events


def _aggregate(
    aggregator: Any,
    stacked: torch.Tensor,
    sizes: torch.Tensor,
    ctx: RoundContext,
    ids: list[int],
    server: Any = None,
) -> tuple[torch.Tensor, dict[int, float], list[int]]:
    """(delta, weight per client, clients the rule rejected) from either kind of aggregator.
    ``server``: the round's ``testbed.server_data.ServerRound``, passed to an aggregator
    that declares a ``root_set``."""
    screen = getattr(aggregator, "aggregate", None)
    if screen is None:
        return aggregator(stacked, sizes), {}, []
    if getattr(aggregator, "root_set", None) is None:
        result = screen(stacked, sizes, ctx, ids)
    elif server is None:
        raise RuntimeError(
            f"{type(aggregator).__qualname__} declares a root_set, but the engine passed no "
            "server data (build it with testbed.assemble.make_server)"
        )
    else:
        result = screen(stacked, sizes, ctx, ids, server=server)
    weights = dict(zip(ids, (float(w) for w in result.weights), strict=True))
    kept = [bool(k) for k in result.kept]
    return result.delta, weights, [c for c, k in zip(ids, kept, strict=True) if not k]


def _server_event(kind: str, detail: str) -> dict[str, Any]:
    return {"client": None, "kind": kind, "detail": detail, "action": "global model unchanged"}


def server_step(
    global_weights: torch.Tensor,
    updates: Sequence[ClientUpdate],
    aggregator: Aggregator,
    ctx: RoundContext,
    hooks: Any,
    policy: UpdatePolicy = UpdatePolicy(),
    server: Any = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor], Aggregate]:
    """Screen and aggregate the uploads, update the global model and build every client's
    download. ``server`` (``testbed.server_data.ServerData``): the server's root set, for
    an aggregator that declares ``root_set``."""
    updates = list(updates)
    events = screen_updates(updates, global_weights, policy)
    weights: dict[int, float] = {}
    rejected: list[int] = []
    hooks.testbed_before_aggregation(ctx=ctx, updates=updates)
    kept = [u for u in updates if u.dropped is None]
    delta = torch.zeros_like(global_weights)
    if not kept:
        events.append(_server_event("empty", "no update left to aggregate"))
    else:
        stacked = torch.stack([u.delta for u in kept])
        sizes = torch.tensor([float(u.n_train) for u in kept], device=stacked.device)
        ids = [u.client_id for u in kept]
        try:
            at = server.at(global_weights, ctx) if server is not None else None
            delta, weights, rejected = _aggregate(aggregator, stacked, sizes, ctx, ids, at)
        except ValueError as exc:  # e.g. Krum after drops left too few updates
            events.append(_server_event("aggregator", str(exc)))
    aggregate = Aggregate(delta, [u.client_id for u in kept], events, weights, rejected)
    hooks.testbed_after_aggregation(ctx=ctx, aggregate=aggregate)
    # A server hook (central noise, a defence) can break the model as a client can: the
    # same screening, and a broken result leaves the global model as it was.
    found = _screen_one(aggregate.delta, global_weights, UpdatePolicy(math.inf))
    if found is not None and found[3] is None:
        aggregate.events.append(_server_event(f"aggregate-{found[0]}", found[1]))
        aggregate.delta = torch.zeros_like(global_weights)
    elif found is not None:
        aggregate.delta = found[3]
    new_global = global_weights + aggregate.delta
    downloads = {}
    for cid in range(ctx.n_clients):
        b = Broadcast(cid, new_global.clone())
        hooks.testbed_broadcast(ctx=ctx, broadcast=b)
        bad = _screen_one(b.weights, global_weights, UpdatePolicy(math.inf))
        if bad is not None:
            # a client must never silently get another model than the mechanism built
            raise PluginError(
                f"plugin {implementers_text(hooks, 'testbed_broadcast')} broke client {cid}'s "
                f"download in testbed_broadcast: {bad[1] or 'dtype ' + str(b.weights.dtype)}"
            )
        downloads[cid] = b.weights
    return new_global, downloads, aggregate


def _norm(delta: object) -> float | None:
    return float(torch.linalg.vector_norm(delta)) if isinstance(delta, torch.Tensor) else None


def round_context(
    state: FederationState,
    clients: Sequence[ClientData],
    *,
    seed: int,
    rounds: int,
    m: int,
    sampling: str = "fixed",
) -> RoundContext:
    """The next round's context: which clients are sampled (``sampling``: 'fixed' or
    'poisson', see ``sample_clients``) and their aggregation weights. A Poisson round may
    sample nobody: no weights, and the server keeps the global model."""
    rnd = state.round + 1
    sampled = sample_clients(seed, rnd, len(clients), m, sampling)
    total = sum(clients[c].n_train for c in sampled)
    return RoundContext(
        seed=seed,
        round=rnd,
        rounds=rounds,
        n_clients=len(clients),
        sampled=sampled,
        weights={c: clients[c].n_train / total for c in sampled},
        client_sampling=sampling,
        sample_rate=m / len(clients),
        client_sizes=tuple(c.n_train for c in clients),
    )


def finish_round(
    state: FederationState,
    ctx: RoundContext,
    updates: Sequence[ClientUpdate],
    aggregator: Aggregator,
    hooks: Any,
    policy: UpdatePolicy,
    events: Sequence[dict[str, Any]] = (),
    threat: Any = None,
    server: Any = None,
) -> FederationState:
    """The server's half of a round, whichever engine ran the clients: aggregate, build the
    downloads and the round's record. ``events`` are the engine's own (e.g. a lost reply).
    ``threat`` (``testbed.poisoning_run.Threat``) replaces the compromised clients' uploads
    by their poisoned ones before anything screens them, and records what was caught.
    ``server`` (``testbed.server_data.ServerData``) holds the server's root set, for an
    aggregator that declares ``root_set``."""
    updates = list(updates)
    if threat is not None:
        events = [*events, *threat.poison_round(ctx, updates, state.global_weights)]
    new_global, downloads, aggregate = server_step(
        state.global_weights, updates, aggregator, ctx, hooks, policy, server
    )
    record: dict[str, Any] = {
        "round": ctx.round,
        "sampled": list(ctx.sampled),
        "included": aggregate.included,
        "dropped": {str(u.client_id): u.dropped for u in updates if u.dropped},
        "events": [*events, *aggregate.events],
        "train_loss": {str(u.client_id): u.loss for u in updates},
        "update_norm": {
            str(u.client_id): u.info.get("norm_before_clip", _norm(u.delta)) for u in updates
        },
    }
    if aggregate.weights:
        record["screening"] = {
            "weights": {str(c): w for c, w in aggregate.weights.items()},
            "rejected": aggregate.rejected,
        }
    if threat is not None:
        record.update(threat.round_record(ctx, updates, aggregate.rejected))
    engine_view = {k: _canonical(record.get(k)) for k in ENGINE_KEYS}

    def check_record() -> None:
        changed = sorted(k for k in ENGINE_KEYS if _canonical(record.get(k)) != engine_view[k])
        if changed:
            raise ValueError(f"changed the engine's record keys {changed}; add keys of its own")
        for key in [k for k in record if k not in ENGINE_KEYS]:
            record[key] = plain_value(record[key], f"record[{key!r}]")

    hooks.call_each("testbed_round_end", check_record, ctx=ctx, record=record)
    return FederationState(ctx.round, new_global, downloads, [*state.history, record])


def _canonical(value: Any) -> str:
    """A comparable text of plain values (NaN equals NaN here, unlike in Python)."""
    return json.dumps(value, sort_keys=True, default=repr)


def run_round(
    state: FederationState,
    model: nn.Module,
    clients: Sequence[ClientData],
    cfg: LocalConfig,
    aggregator: Aggregator,
    hooks: Any,
    *,
    seed: int,
    rounds: int,
    m: int,
    policy: UpdatePolicy = UpdatePolicy(),
    on_client_done: Callable[[int], None] | None = None,
    threat: Any = None,
    sampling: str = "fixed",
    server: Any = None,
    trainer: Trainer = local_sgd,
) -> FederationState:
    """One round with every sampled client trained in this process, one after another."""
    ctx = round_context(state, clients, seed=seed, rounds=rounds, m=m, sampling=sampling)
    updates = []
    for cid in ctx.sampled:
        received = state.client_weights[cid]
        updates.append(client_step(model, received, clients[cid], cfg, ctx, hooks, trainer))
        if on_client_done:
            on_client_done(cid)
    return finish_round(
        state, ctx, updates, aggregator, hooks, policy, threat=threat, server=server
    )
