"""The paper's metrics (SPEC.md, Sec. IV-C) as pure functions of predictions."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

NO_PREDICTION = -1
"""What ``predicted`` gives an image whose outputs name no class: a NaN, or a largest
output that is not finite (an overflow to +inf, or -inf everywhere). argmax over NaN names
the first class, so a diverged model would pass for one that predicts it; every rate over
predictions holding one is NaN instead (n/a in the reports)."""


def predicted(logits: torch.Tensor) -> torch.Tensor:
    """The predicted classes of a batch of logits (or probabilities, or log-probabilities:
    -inf for a class ruled out is a valid output), NO_PREDICTION where a row names none."""
    top, cls = logits.max(1)
    named = ~torch.isnan(logits).any(1) & torch.isfinite(top)
    return cls.masked_fill(~named, NO_PREDICTION)


def unpredicted(*preds: torch.Tensor) -> bool:
    """Whether any of ``preds`` holds NO_PREDICTION (a rate over them is then NaN)."""
    return any(bool((p == NO_PREDICTION).any()) for p in preds)


def class_name(classes: Sequence[str], i: int) -> str:
    """A prediction's class name for captions; NO_PREDICTION (not classes[-1]) says none."""
    return "none (non-finite output)" if i == NO_PREDICTION else str(classes[i])


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    if unpredicted(pred):
        return math.nan
    return float((pred == y).float().mean())


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over the classes present in ``y`` of the share of their images predicted as
    themselves (recall), as sklearn's balanced_accuracy_score: always giving one answer
    scores 1/k however skewed the split is, where plain accuracy scores the commonest
    class's share (Brodersen et al., ICPR 2010). Torch, to stay on the models' device."""
    if unpredicted(pred):
        return math.nan
    recalls = [(pred[y == c] == c).float().mean() for c in torch.unique(y)]
    return float(torch.stack(recalls).mean())


def attack_success_rate(pred_clean: torch.Tensor, pred_adv: torch.Tensor) -> float:
    """ASR of one model: share of attacked images whose predicted label changed."""
    if unpredicted(pred_clean, pred_adv):
        return math.nan
    return float((pred_clean != pred_adv).float().mean())


def true_label_asr(y: torch.Tensor, pred_clean: torch.Tensor, pred_adv: torch.Tensor) -> float:
    """ASR against the true label: among the images the model classifies correctly when
    clean, the share it misclassifies after the attack (NaN when it gets none right).
    `attack_success_rate` (the paper's, against the clean prediction) also counts images
    the model already got wrong and an attack that moves a wrong label to another."""
    if unpredicted(pred_clean, pred_adv):
        return math.nan
    right = pred_clean == y
    n = int(right.sum())
    return float((pred_adv[right] != y[right]).float().mean()) if n else math.nan


def error_transfer_rate(
    pred_adv_source: torch.Tensor, pred_adv_target: torch.Tensor, y: torch.Tensor
) -> tuple[float, int]:
    """P(target misclassifies x_adv | source misclassifies x_adv), and how many x_adv
    the source misclassified (the condition's support; NaN rate when it is zero)."""
    if unpredicted(pred_adv_source, pred_adv_target):
        return math.nan, 0
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


def client_model_spread(weights: Sequence[torch.Tensor]) -> dict[str, float]:
    """How far apart the deployed client models are: the mean L2 distance over client
    pairs, and the mean L2 norm of a model for scale. Per-client downlink noise is what
    separates them under FedAvg, and transfer (AETR) falls as they drift apart."""
    w = torch.stack([t.detach().double().flatten() for t in weights])
    pairs = torch.pdist(w)  # the k(k-1)/2 pairwise L2 distances
    return {
        "distance_mean": float(pairs.mean()) if pairs.numel() else 0.0,
        "norm_mean": float(w.norm(dim=1).mean()),
    }


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for a single value) and, from two values on,
    ``ci95``: the half-width of the mean's 95% confidence interval (Student's t with n - 1
    degrees of freedom, as few seeds need). NaNs ignored."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    m = mean(vals)
    n = len(vals)
    if n == 1:
        return {"mean": m, "std": 0.0, "n": 1}
    from scipy.stats import t  # ~0.3 s to import: only where a summary has seeds to pool

    std = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    ci95 = float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"mean": m, "std": std, "n": n, "ci95": ci95}


HEALTHY_MARKERS = ("no_", "normal", "healthy", "negative")


def named_healthy_class(classes: Sequence[str]) -> int | None:
    """The class that means "no lesion": the first whose name contains no_, normal, healthy
    or negative (no_tumor, no_lesion, normal); None when no name does."""
    for i, name in enumerate(classes):
        if any(m in name.lower() for m in HEALTHY_MARKERS):
            return i
    return None


def healthy_class(classes: Sequence[str]) -> int:
    """`named_healthy_class`, class 0 when no name says which: the direction split of the
    report then reads class 0 as healthy (metrics.json names the class it used)."""
    named = named_healthy_class(classes)
    return 0 if named is None else named


def direction_asr(
    pred_clean: torch.Tensor, pred_adv: torch.Tensor, healthy: int
) -> dict[str, float | int]:
    """ASR of one model split by the direction of the change: among images it predicts as
    a lesion, the share moved to healthy (the missed diagnosis); among images it predicts
    healthy, the share moved to a lesion class. A change between two lesion classes counts
    in neither. NaN where the model predicts no image of that kind (support 0)."""
    if unpredicted(pred_clean, pred_adv):
        nan = math.nan
        return {"lesion_to_healthy": nan, "healthy_to_lesion": nan, "n_lesion": 0, "n_healthy": 0}
    lesion = pred_clean != healthy
    n_lesion, n_healthy = int(lesion.sum()), int((~lesion).sum())
    missed = int(((pred_adv == healthy) & lesion).sum())
    false_alarm = int(((pred_adv != healthy) & ~lesion).sum())
    return {
        "lesion_to_healthy": missed / n_lesion if n_lesion else math.nan,
        "healthy_to_lesion": false_alarm / n_healthy if n_healthy else math.nan,
        "n_lesion": n_lesion,
        "n_healthy": n_healthy,
    }


def targeted_success_rate(
    pred_clean: torch.Tensor, pred_adv: torch.Tensor, target: torch.Tensor
) -> float:
    """Share of images not already predicted as their target that now are (NaN if none)."""
    if unpredicted(pred_clean, pred_adv):
        return math.nan
    open_ = pred_clean != target
    n = int(open_.sum())
    return int((pred_adv[open_] == target[open_]).sum()) / n if n else math.nan


def robust_accuracy(
    y: torch.Tensor, pred_clean: torch.Tensor, preds_adv: Sequence[torch.Tensor]
) -> float:
    """RobustBench's robust accuracy on one pool: the share of images classified correctly
    clean and under every attack (the strongest attack per image decides)."""
    if unpredicted(pred_clean, *preds_adv):
        return math.nan
    ok = pred_clean == y
    for p in preds_adv:
        ok &= p == y
    return int(ok.sum()) / y.numel() if y.numel() else math.nan
