"""The batched engine: every sampled client of a round trained as one stacked model.

The clients' weights are stacked into one leading dimension
(`torch.func.stack_module_state`), one `vmap` of `functional_call` computes every
client's loss on its own batch, and one backward and one `torch.optim.SGD` step update
all of them: each client's slice sees only its own gradient, so the optimiser does per
client exactly what the in-process engine's does. Everything around local training (the
hooks on uploads, screening, aggregation, downloads, the round record) is the same
`finish_round` the other engines call.

Equal to the in-process engine within float tolerance, not bitwise: batched kernels sum
in another order. Each client draws its batch order and augmentation from the same
generator the in-process engine uses, in the same order, so the data each step sees is
identical. Clients with fewer batches (non-IID sizes, a short last batch) are padded
with zero-weight samples; a client with no batch left keeps its weights and momentum.
A plugin that takes over local training (`testbed_local_training`: DP-SGD, adversarial
training) cannot be batched: those rounds are trained client by client, exactly as
in-process. Dropout can be batched only by giving up equality, since vmap draws the masks
of all clients from one random stream and the sequential loop draws each client's from its
own: with ``dropout = "exact"`` (the default) a model with dropout is trained client by
client; with ``dropout = "stacked"`` it is batched (`vmap(randomness="different")`: every
client its own independent masks, the stream seeded per round), which is the same
training in distribution but another sample of it, so such a run has its own cache
entries and is not compared with in-process numbers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from testbed.federation import FederationState, finish_round, round_context
from testbed.local_training import (
    ClientData,
    LocalConfig,
    batches,
    client_step,
    seeded,
    set_weights,
)
from testbed.state import ClientUpdate, RoundContext, derive_seed


def _has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def batchable(model: nn.Module, hooks: Any, *, stacked_dropout: bool = False) -> bool:
    """Whether a round can be trained stacked (see the module docstring)."""
    if hooks.implementers("testbed_local_training"):
        return False
    return stacked_dropout or not _has_dropout(model)


@dataclass
class _Pending:
    """A client's batches still to come, and how many samples it has trained on."""

    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    seen: int = 0


def train_stacked(
    model: nn.Module,
    received: list[torch.Tensor],
    data: list[ClientData],
    cfg: LocalConfig,
    generators: list[torch.Generator],
    *,
    stacked_dropout: bool = False,
) -> tuple[list[torch.Tensor], list[float]]:
    """Local training of every client at once: (each client's trained flat weights, each
    one's mean training loss), as `local_sgd` would give client by client. Dropout masks
    come from torch's global stream, one independent draw per client, only when
    ``stacked_dropout`` allows it (otherwise a random op under vmap is an error)."""
    copies = []
    for w in received:
        m = copy.deepcopy(model)
        set_weights(m, w)
        copies.append(m.train())
    params, buffers = stack_module_state(copies)
    base = copy.deepcopy(model)  # its own weights are replaced by the stacked ones
    opt = torch.optim.SGD(
        list(params.values()), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )

    def client_loss(p, b, x, y, w):
        logits = functional_call(base, (p, b), (x,))
        per_sample = nn.functional.cross_entropy(logits, y, reduction="none")
        return (per_sample * w).sum() / w.sum().clamp(min=1)

    randomness = "different" if stacked_dropout else "error"
    losses = vmap(client_loss, in_dims=(0, 0, 0, 0, 0), randomness=randomness)
    pending = [_Pending(batches(d, cfg, g)) for d, g in zip(data, generators, strict=True)]
    x0 = data[0].x_train
    shape = (len(data), cfg.batch_size, *x0.shape[1:])
    # summed on the device, as local_sgd does: reading each step's loss back to the host
    # would wait for the GPU every step
    loss_sums = torch.zeros(len(data), dtype=torch.float64, device=x0.device)
    while True:
        step = [next(p.batches, None) for p in pending]
        active = [s is not None for s in step]
        if not any(active):
            break
        xs = torch.zeros(shape, device=x0.device)
        ys = torch.zeros(shape[:2], dtype=torch.long, device=x0.device)
        ws = torch.zeros(shape[:2], device=x0.device)
        for c, s in enumerate(step):
            if s is not None:
                n = s[1].shape[0]
                xs[c, :n], ys[c, :n], ws[c, :n] = s[0], s[1], 1.0
        frozen = _freeze(opt, params, active)
        loss = losses(params, buffers, xs, ys, ws)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # client c's loss depends on slice c only: per-client grads
        opt.step()
        _restore(opt, frozen)
        loss_sums += loss.detach().double() * ws.sum(1)  # an idle client's row adds 0
        for c, s in enumerate(step):
            if s is not None:
                pending[c].seen += s[1].shape[0]
    flat = torch.cat([p.detach().flatten(1) for p in params.values()], dim=1)
    sums = loss_sums.tolist()
    return list(flat.unbind(0)), [t / max(p.seen, 1) for t, p in zip(sums, pending, strict=True)]


Frozen = tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], list[int]]


def _freeze(
    opt: torch.optim.SGD, params: dict[str, torch.Tensor], active: list[bool]
) -> Frozen | None:
    """Copies of the idle clients' slices (weights, momentum) to put back after the step:
    with zero gradient SGD would still move them by momentum and weight decay."""
    idle = [c for c, a in enumerate(active) if not a]
    if not idle:
        return None
    kept = []
    for p in params.values():
        buf = opt.state.get(p, {}).get("momentum_buffer")
        kept.append((p, p.detach()[idle].clone(), None if buf is None else buf[idle].clone()))
    return kept, idle


@torch.no_grad()
def _restore(opt: torch.optim.SGD, frozen: Frozen | None) -> None:
    if frozen is None:
        return
    kept, idle = frozen
    for p, w, b in kept:
        p[idle] = w
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if b is not None and buf is not None:
            buf[idle] = b


class Batched:
    """Engine "batched": see the module docstring."""

    name = "batched"

    def __init__(self, *, stacked_dropout: bool = False) -> None:
        self.stacked_dropout = stacked_dropout

    def round_step(
        self, setup
    ) -> Callable[[FederationState, Callable[[int], None]], FederationState]:
        fed = setup.scenario.federation
        hooks = setup.host.hook

        def step(state: FederationState, on_client_done: Callable[[int], None]) -> FederationState:
            ctx = round_context(
                state, setup.clients, seed=setup.seed, rounds=fed.rounds, m=fed.m,
                sampling=fed.client_sampling,
            )  # fmt: skip
            if batchable(setup.model, hooks, stacked_dropout=self.stacked_dropout) and ctx.sampled:
                updates = _stacked_updates(state, ctx, setup, hooks, self.stacked_dropout)
                for cid in ctx.sampled:
                    on_client_done(cid)
            else:
                updates = []
                for cid in ctx.sampled:
                    received = state.client_weights[cid]
                    data = setup.clients[cid]
                    updates.append(client_step(setup.model, received, data, setup.cfg, ctx, hooks))
                    on_client_done(cid)
            return finish_round(
                state, ctx, updates, setup.aggregator, hooks, setup.policy,
                threat=setup.threat, server=setup.server,
            )  # fmt: skip

        return step


def _stacked_updates(
    state: FederationState, ctx: RoundContext, setup, hooks, stacked_dropout: bool
) -> list[ClientUpdate]:
    received = [state.client_weights[c] for c in ctx.sampled]
    data = [setup.clients[c] for c in ctx.sampled]
    gens = [ctx.generator("local", c) for c in ctx.sampled]
    # one stream for all clients' masks (vmap splits it), seeded apart from the per-client
    # streams client_step uses, which a stacked-dropout run cannot reproduce anyway
    with seeded(derive_seed(ctx.seed, ctx.round, "dropout-stacked"), received[0].device):
        trained, losses = train_stacked(
            setup.model, received, data, setup.cfg, gens, stacked_dropout=stacked_dropout
        )
    updates = []
    for cid, w, r, d, loss in zip(ctx.sampled, trained, received, data, losses, strict=True):
        update = ClientUpdate(cid, w - r, d.n_train, loss)
        hooks.testbed_client_update(ctx=ctx, update=update)
        updates.append(update)
    return updates
