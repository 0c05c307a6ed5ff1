"""Across the attacks of one seed: robust accuracy (RobustBench) and the sanity checks of
Carlini et al. 2019, "On Evaluating Adversarial Robustness" (arXiv:1902.06705), Sec. 5.

Pure functions of `run_attack` results (dicts as stored in metrics.json), so a finished
run's figures can be recomputed from its metrics alone.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

import torch

from testbed.metrics import mean_std, robust_accuracy

MASKING = "possible gradient masking"


def unbounded(result: Mapping[str, Any]) -> bool:
    """An L-inf budget of 1 lets every pixel take any value: Carlini et al.'s unbounded
    check (success should reach ~100%), not a threat model."""
    b = result.get("budget")
    return bool(b) and b["norm"] == "inf" and b["eps"] >= 1


def robust_attacks(attacks: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """Labels that count towards robust accuracy (a bounded threat model), and the rest:
    minimum-norm attacks without a budget and unbounded checks would fool every image."""
    used, left = [], []
    for label, r in attacks.items():
        ok = r.get("budget") and not unbounded(r) and r.get("per_image")
        (used if ok else left).append(label)
    return used, left


def robust_accuracy_per_client(attacks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per adversary (a client attacking its own test images with its own model): the share
    of its attacked pool classified correctly clean and under every bounded attack."""
    used, left = robust_attacks(attacks)
    out: dict[str, Any] = {"per_client": {}, "mean": math.nan, "attacks": used, "excluded": left}
    if not used:
        return out
    first = attacks[used[0]]
    for i, client in enumerate(first["adversaries"]):
        y = torch.tensor(first["per_image"]["y"][i])
        clean = torch.tensor(first["per_image"]["pred_clean_own"][i])
        advs = []
        for label in used:
            r = attacks[label]
            j = r["adversaries"].index(client)
            if r["per_image"]["y"][j] != first["per_image"]["y"][i]:
                raise ValueError(f"attack {label} scored another pool than {used[0]}")
            advs.append(torch.tensor(r["per_image"]["pred_adv_own"][j]))
        out["per_client"][str(client)] = robust_accuracy(y, clean, advs)
    values = list(out["per_client"].values())
    out["mean"] = sum(values) / len(values)
    return out


def _v(x: Any) -> float:
    """A rate as stored in metrics.json (None for NaN, "inf" for infinity) as a float."""
    return math.nan if x is None else math.inf if x == "inf" else float(x)


def _tolerance(r: Mapping[str, Any]) -> float:
    """One image of the smallest pool: differences below it are sampling, not a finding."""
    return 1 / max(1, min(r.get("samples") or [1]))


def _flag(check: str, labels: list[str], detail: str) -> dict[str, Any]:
    return {"check": check, "attacks": labels, "detail": detail, "verdict": MASKING}


def sanity_checks(attacks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Carlini et al.'s checks on one seed's attacks, each a flag when violated:

    - eps_monotone: along an eps sweep, white-box success (ASR on the adversary's own model)
      must not fall as eps grows;
    - whitebox_vs_transfer: a white-box attack fools its own model at least as often as it
      fools the benign models it transfers to;
    - whitebox_vs_blackbox: at the same budget, the strongest white-box attack fools the
      own model at least as often as any black-box attack does;
    - unbounded: an L-inf eps of 1 reaches (nearly) every image.
    A difference within one image of the pool is tolerated. A comparison with an n/a side
    (a diverged model, an empty support) is not run: it could neither pass nor fail."""
    flags, ran = [], defaultdict(int)
    sweeps: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for label, r in attacks.items():
        if r.get("sweep_of") and r.get("budget") and set(r.get("sweep_point") or {}) == {"eps"}:
            sweeps[r["sweep_of"]].append((r["budget"]["eps"], label))
    for name, points in sweeps.items():
        points.sort()
        for (e0, l0), (e1, l1) in pairwise(points):
            a0, a1 = _v(attacks[l0]["aasr_own"]), _v(attacks[l1]["aasr_own"])
            if math.isnan(a0) or math.isnan(a1):
                continue
            ran["eps_monotone"] += 1
            if a1 < a0 - _tolerance(attacks[l1]):
                flags.append(
                    _flag(
                        "eps_monotone",
                        [l0, l1],
                        f"sweep {name}: own-model ASR falls from {a0:.3f} at eps {e0:g} "
                        f"to {a1:.3f} at eps {e1:g}",
                    )
                )
    white = {k: r for k, r in attacks.items() if r.get("access") == "white-box"}
    for label, r in white.items():
        own, benign = _v(r["aasr_own"]), _v(r["aasr_benign"])
        if math.isnan(own) or math.isnan(benign):
            continue
        ran["whitebox_vs_transfer"] += 1
        if own < benign - _tolerance(r):
            flags.append(
                _flag(
                    "whitebox_vs_transfer",
                    [label],
                    f"own-model ASR {own:.3f} below transfer ASR {benign:.3f}",
                )
            )
    for label, r in attacks.items():
        if r.get("access") != "black-box" or not r.get("budget"):
            continue
        peers = [
            k for k, w in white.items()
            if w.get("budget") == r["budget"] and not math.isnan(_v(w["aasr_own"]))
        ]  # fmt: skip
        if not peers or math.isnan(_v(r["aasr_own"])):
            continue
        ran["whitebox_vs_blackbox"] += 1
        best = max(peers, key=lambda k: _v(white[k]["aasr_own"]))
        if _v(white[best]["aasr_own"]) < _v(r["aasr_own"]) - _tolerance(r):
            flags.append(
                _flag(
                    "whitebox_vs_blackbox",
                    [best, label],
                    f"black-box {label} ({_v(r['aasr_own']):.3f}) beats the strongest "
                    f"white-box {best} ({_v(white[best]['aasr_own']):.3f}) on the own model "
                    "at the same budget",
                )
            )
    for label, r in attacks.items():
        if not unbounded(r) or math.isnan(_v(r["aasr_own"])):
            continue
        ran["unbounded"] += 1
        if _v(r["aasr_own"]) < 1 - _tolerance(r):
            flags.append(
                _flag(
                    "unbounded",
                    [label],
                    f"L-inf eps {r['budget']['eps']:g} reaches only {_v(r['aasr_own']):.3f} "
                    "of the own model's images",
                )
            )
    return {"flags": flags, "checks_run": dict(ran)}


def evaluate_repeat(attacks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What a seed's metrics record across its attacks."""
    return {
        "robust_accuracy": robust_accuracy_per_client(attacks),
        "sanity": sanity_checks(attacks),
    }


def summarise_repeats(repeats: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Over seeds: robust accuracy (mean over clients) and every flag with its seed."""
    # None: a seed without bounded attacks has no robust accuracy (NaN in metrics.json)
    rob = [
        r["robustness"]["robust_accuracy"]["mean"]
        for r in repeats
        if "robustness" in r and r["robustness"]["robust_accuracy"]["mean"] is not None
    ]
    flags = [
        {"seed": r["seed"], **f}
        for r in repeats
        if "robustness" in r
        for f in r["robustness"]["sanity"]["flags"]
    ]
    return {"robust_acc": mean_std(rob) if rob else None, "sanity_flags": flags}
