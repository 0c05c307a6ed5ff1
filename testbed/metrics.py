"""The paper's metrics (SPEC.md, Sec. IV-C) as pure functions of predictions."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).float().mean())


def attack_success_rate(pred_clean: torch.Tensor, pred_adv: torch.Tensor) -> float:
    """ASR of one model: share of attacked images whose predicted label changed."""
    return float((pred_clean != pred_adv).float().mean())


def error_transfer_rate(
    pred_adv_source: torch.Tensor, pred_adv_target: torch.Tensor, y: torch.Tensor
) -> tuple[float, int]:
    """P(target misclassifies x_adv | source misclassifies x_adv), and how many x_adv
    the source misclassified (the condition's support; NaN rate when it is zero)."""
    fooled = pred_adv_source != y
    n = int(fooled.sum())
    if n == 0:
        return math.nan, 0
    return float((pred_adv_target[fooled] != y[fooled]).float().mean()), n


def transfer_summary(
    asr: Sequence[Sequence[float]], etr: Mapping[tuple[int, int], float], adversaries: Sequence[int]
) -> dict[str, float]:
    """AASR over all (adversary, target) cells; split into the adversary's own model and
    the benign ones; AETR as the mean ETR over (adversary, target != adversary) pairs."""
    cells = [(a, t, asr[i][t]) for i, a in enumerate(adversaries) for t in range(len(asr[i]))]
    own = [v for a, t, v in cells if a == t]
    benign = [v for a, t, v in cells if a != t]
    pairs = [v for (a, t), v in etr.items() if a != t and not math.isnan(v)]
    return {
        "aasr": mean([v for _, _, v in cells]),
        "aasr_own": mean(own),
        "aasr_benign": mean(benign),
        "aetr": mean(pairs),
        "aetr_pairs": float(len(pairs)),
    }


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value), NaNs ignored."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    m = mean(vals)
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
    return {"mean": m, "std": math.sqrt(var), "n": len(vals)}
