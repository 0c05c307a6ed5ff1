"""Mean and spread over a task's seeds, from the per-seed metrics (as stored in JSON)."""

from __future__ import annotations

import math
from typing import Any

from testbed.explain import summarise_explain
from testbed.metrics import mean_std
from testbed.poisoning_run import summarise_poisoning
from testbed.robust_eval import summarise_repeats


def summarise(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    attacks: dict[str, Any] = {}
    for label in repeats[0]["attacks"]:
        rows = [r["attacks"][label] for r in repeats]
        attacks[label] = {
            # .get: runs resumed from checkpoints older than the true-label variant
            key: mean_std([_num(row.get(key)) for row in rows])
            for key in ("aasr", "aasr_own", "aasr_benign", "aetr", "aasr_true")
        }
        attacks[label]["cost_s"] = mean_std([c for row in rows for c in row["cost_s"]])
    eps = [_num(p["epsilon"]) for r in repeats for p in r["privacy"]]
    # .get: metrics written before the spread was recorded
    spread = [_num(r["client_models"]["distance_mean"]) for r in repeats if r.get("client_models")]
    balanced = [_num(r["acc_balanced_mean"]) for r in repeats if "acc_balanced_mean" in r]
    return {
        "acc_mean": mean_std([_num(r["acc_mean"]) for r in repeats]),
        **({"acc_balanced_mean": mean_std(balanced)} if len(balanced) == len(repeats) else {}),
        **({"client_distance": mean_std(spread)} if spread else {}),
        "attacks": attacks,
        "epsilon": mean_std(eps) if eps else None,
        "events": sum(len(r["events"]) for r in repeats),
        "round_s": mean_std([t for r in repeats for t in r["timing"]["round_s"]]),
        **({"poisoning": p} if (p := summarise_poisoning(repeats)) else {}),
        **({"explain": e} if (e := summarise_explain(repeats)) else {}),
        **summarise_repeats(repeats),
    }


def _num(v: Any) -> float:
    """Undo _json_safe for values that come back from a checkpoint."""
    if v is None:
        return math.nan
    if v == "inf":
        return math.inf
    return float(v)
