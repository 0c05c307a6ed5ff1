"""The engine side of training-time attacks: who is compromised, what they do to their
data and their uploads, and what the run measures of it.

A ``Threat`` is built per repeat from ``[threat_model]`` and ``[[poisoning]]``. The
runner's ``make_clients`` (which the Flower ClientApp also calls) hands each compromised
client's training data to ``poison_data`` once, before training; ``finish_round`` (which
both engines call on the server side) hands the round's uploads to ``poison_round`` before
screening, and ``round_record`` adds the detection matrix to the round's record. Every
random draw derives from the seed, the round and the client, so a poisoned run is as
reproducible, resumable and engine-independent as any other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from testbed.data import ImageDataset
from testbed.local_training import ClientData
from testbed.metrics import mean_std, unpredicted
from testbed.pluginmanager import Host
from testbed.rundir import RunError
from testbed.scenario import Scenario
from testbed.state import ClientUpdate, RoundContext, generator
from testbed.threat import malicious_clients
from testbed.transfer import Deployed, predict, to_unit

ROBUST_F_RULES = ("krum", "multi_krum", "bulyan")
"""Aggregators whose parameter ``f`` is the number of Byzantine updates they tolerate."""


@dataclass
class Threat:
    """The compromised clients of one repeat and the attack objects they run."""

    malicious: tuple[int, ...]
    collude: bool
    attacks: list[tuple[str, Any]]
    """(name, object) of each ``[[poisoning]]`` entry, in the scenario's order."""

    def poison_data(
        self, cid: int, x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``cid``'s training data after every data-poisoning attack, in order."""
        if cid not in self.malicious:
            return x, y
        shape, classes = tuple(x.shape[1:]), tuple(map(str, range(num_classes)))
        for i, (name, attack) in enumerate(self.attacks):
            if hasattr(attack, "poison_data"):
                try:
                    x, y = attack.poison_data(
                        x, y, num_classes, generator(seed, "poison-data", cid, i)
                    )
                    # what it returns is still a dataset of this task: uint8 images of the
                    # same shape, one label in range per image (ImageDataset's own check)
                    ImageDataset(x, y, classes)
                    if tuple(x.shape[1:]) != shape:
                        raise ValueError(f"returned images of shape {tuple(x.shape[1:])}, "
                                         f"not {shape}")  # fmt: skip
                except ValueError as exc:  # e.g. a target class the task does not have
                    raise RunError(f"poisoning[{i}] {name!r}: {exc}") from None
        return x, y

    def poison_round(
        self, ctx: RoundContext, updates: list[ClientUpdate], expected: torch.Tensor
    ) -> list[dict[str, Any]]:
        """Replace the sampled compromised clients' uploads in place by their poisoned
        ones; returns an event for each attack that could not act (e.g. ALIE with fewer
        than two benign updates this round), whose client then uploads its honest update."""
        attacks = [
            (i, n, a) for i, (n, a) in enumerate(self.attacks) if hasattr(a, "poison_update")
        ]
        bad = [u for u in updates if u.client_id in self.malicious and _usable(u.delta, expected)]
        if not attacks or not bad:
            return []
        benign = None
        if self.collude:  # the omniscient attacker reads every benign upload of the round
            rows = [
                u.delta
                for u in updates
                if u.client_id not in self.malicious and _usable(u.delta, expected)
            ]
            benign = torch.stack(rows) if rows else expected.new_zeros((0, expected.numel()))
        events = []
        for u in bad:
            delta = u.delta
            try:
                for i, _, attack in attacks:
                    g = ctx.generator("poison", u.client_id, i)
                    delta = attack.poison_update(delta, benign, ctx, g)
            except ValueError as exc:
                events.append(
                    {"client": u.client_id, "kind": "poisoning", "detail": str(exc),
                     "action": "honest update uploaded"}
                )  # fmt: skip
                continue
            u.delta = delta
        return events

    def round_record(
        self, ctx: RoundContext, updates: Sequence[ClientUpdate], rejected: Sequence[int]
    ) -> dict[str, Any]:
        """The round's compromised clients and detection matrix: uploads of compromised and
        of benign clients that screening, a defence or the aggregator dropped."""
        dropped = {u.client_id for u in updates if u.dropped is not None} | set(rejected)
        arrived = [u.client_id for u in updates]
        mal = [c for c in arrived if c in self.malicious]
        ben = [c for c in arrived if c not in self.malicious]
        return {
            "malicious": [c for c in ctx.sampled if c in self.malicious],
            "detection": {
                "malicious_dropped": sum(c in dropped for c in mal),
                "malicious": len(mal),
                "benign_dropped": sum(c in dropped for c in ben),
                "benign": len(ben),
            },
        }


def _usable(delta: object, expected: torch.Tensor) -> bool:
    # A broken upload (wrong shape, non-finite) is left for screening to drop.
    return (
        isinstance(delta, torch.Tensor)
        and delta.shape == expected.shape
        and delta.is_floating_point()
        and bool(torch.isfinite(delta).all())
    )


def build_threat(scenario: Scenario, host: Host, seed: int) -> Threat | None:
    """The repeat's threat, or None for a scenario without ``[[poisoning]]`` (which then
    runs exactly as before this existed)."""
    if not scenario.poisoning:
        return None
    tm = scenario.threat_model
    attacks = [
        (spec.name, host.registry.build("poisoning", spec.name, spec.params))
        for spec in scenario.poisoning
    ]
    return Threat(malicious_clients(tm, scenario.federation.clients, seed), tm.collude, attacks)


def threat_key(scenario: Scenario) -> dict[str, Any] | None:
    """What training reads of the threat (for the federation cache key); None without
    ``[[poisoning]]``, so that the keys of all other scenarios stay as they were."""
    if not scenario.poisoning:
        return None
    tm = scenario.threat_model
    return {
        "poisoning": [p.model_dump(mode="json") for p in scenario.poisoning],
        "malicious": tm.malicious,
        "malicious_fraction": tm.malicious_fraction,
        "collude": tm.collude,
    }


def threat_warnings(scenario: Scenario, threat: Threat) -> list[str]:
    """Valid experiments the reader should know are outside a rule's guarantee."""
    agg = scenario.aggregator
    f = agg.params.get("f")
    k = len(threat.malicious)
    if agg.name in ROBUST_F_RULES and isinstance(f, int) and f < k:
        return [
            f"{agg.name} tolerates f = {f} Byzantine updates per round, but {k} clients are "
            "compromised: its guarantee does not hold in rounds that sample more than f of them"
        ]
    return []


# -- metrics ---------------------------------------------------------------------------


def _share(hits: torch.Tensor) -> float:
    return float(hits.float().mean())


def _mean(values: list[float]) -> float:
    """NaN where any value is NaN (a model with non-finite outputs, recorded as a
    `diverged` event): a mean over the healthy models alone would look like a valid one."""
    return sum(values) / len(values) if values else math.nan


def _per_client_rates(
    threat: Threat, rates: dict[int, float]
) -> dict[str, float | dict[str, float]]:
    return {
        "per_client": {str(c): v for c, v in rates.items()},
        "benign": _mean([v for c, v in rates.items() if c not in threat.malicious]),
        "malicious": _mean([v for c, v in rates.items() if c in threat.malicious]),
    }


def _no_lift(bd: dict[str, Any]) -> str | None:
    """A warning where the trigger adds nothing on the benign models: their backdoor
    success is no higher than the target rate of the same images without the trigger."""
    hit, floor = bd["benign"], bd["untriggered"]["benign"]
    if math.isnan(hit) or math.isnan(floor) or hit > floor:
        return None
    return (
        f"the trigger adds nothing: backdoor success on benign models ({100 * hit:.1f}%) is no "
        f"higher than their rate of class {bd['target']} on the same images without it "
        f"({100 * floor:.1f}%)"
    )


def poisoning_metrics(
    threat: Threat,
    deployed: Sequence[Deployed],
    clients: Sequence[ClientData],
    hooks: Any,
    *,
    seed: int,
    num_classes: int,
    acc: dict[str, float],
    history: list[dict[str, Any]],
    warnings: list[str],
) -> dict[str, Any]:
    """Per seed: backdoor success and targeted error on every client's final model (own
    test split), clean accuracy of the benign clients, and the detection matrix summed
    over the rounds."""
    benign = [c for c in range(len(clients)) if c not in threat.malicious]
    out: dict[str, Any] = {
        "malicious": list(threat.malicious),
        "collude": threat.collude,
        "attacks": [name for name, _ in threat.attacks],
        "acc_benign": _mean([acc[str(c)] for c in benign]),
        "warnings": list(warnings),
    }
    for name, attack in threat.attacks:
        if hasattr(attack, "backdoor_test") and "backdoor_success" not in out:
            rates, untriggered = {}, {}
            for d in deployed:
                test = clients[d.client_id]
                x_trig, target = attack.backdoor_test(test.x_test, test.y_test)
                keep = test.y_test != target  # images already of the target class prove nothing
                if not keep.any():  # nothing to measure on this client: not a rate of 0 or NaN
                    continue
                pred = predict(d, to_unit(x_trig[keep]), hooks, (seed, "backdoor"))
                rates[d.client_id] = math.nan if unpredicted(pred) else _share(pred == target)
                # The same images without the trigger: the target rate the model has anyway
                # (its errors; all of them for a model collapsed onto the target class).
                # Backdoor success is the attack's only where it rises above this floor.
                base = predict(d, to_unit(test.x_test[keep]), hooks, (seed, "untriggered"))
                untriggered[d.client_id] = math.nan if unpredicted(base) else _share(base == target)
            out["backdoor_success"] = {
                "attack": name,
                "target": target,
                **_per_client_rates(threat, rates),
                "untriggered": _per_client_rates(threat, untriggered),
            }
            if warning := _no_lift(out["backdoor_success"]):
                out["warnings"].append(warning)
        if hasattr(attack, "label_map") and "targeted_error" not in out:
            mapping = torch.tensor(attack.label_map(num_classes))
            rates = {}
            for d in deployed:
                test = clients[d.client_id]
                taught = mapping.to(test.y_test.device)[test.y_test]
                flipped = taught != test.y_test
                if not flipped.any():  # no image of a class the attack relabels
                    continue
                pred = predict(d, to_unit(test.x_test[flipped]), hooks, (seed, "targeted"))
                hits = pred == taught[flipped]
                rates[d.client_id] = math.nan if unpredicted(pred) else _share(hits)
            out["targeted_error"] = {"attack": name, **_per_client_rates(threat, rates)}
    totals = {"malicious_dropped": 0, "malicious": 0, "benign_dropped": 0, "benign": 0}
    for rec in history:
        for k in totals:
            totals[k] += int(rec.get("detection", {}).get(k, 0))
    out["detection"] = totals
    return out


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def summarise_poisoning(repeats: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean and std over seeds of what ``poisoning_metrics`` measured; None without it."""
    rows = [r["poisoning"] for r in repeats if r.get("poisoning")]
    if not rows:
        return None
    out: dict[str, Any] = {"acc_benign": mean_std([_num(p["acc_benign"]) for p in rows])}
    for key in ("backdoor_success", "targeted_error"):
        if key in rows[0]:
            out[key] = {
                who: mean_std([_num(p[key][who]) for p in rows]) for who in ("benign", "malicious")
            }
    if "untriggered" in rows[0].get("backdoor_success", {}):
        out["backdoor_success"]["untriggered"] = {
            who: mean_std([_num(p["backdoor_success"]["untriggered"][who]) for p in rows])
            for who in ("benign", "malicious")
        }
    det = {k: sum(p["detection"][k] for p in rows) for k in rows[0]["detection"]}
    out["detection"] = det
    out["warnings"] = sorted({w for p in rows for w in p["warnings"]})
    return out
