"""Explanations of attacked images, and whether they help (issue 15, the seed paper's advice
to explain each prediction so that a clinician can judge whether it is legitimate).

Attributions come from Captum (Kokhlikyan et al., "Captum: A unified and generic model
interpretability library for PyTorch", 2020):

- saliency: the gradient of the predicted class's logit with respect to the input, absolute
  value, maximum over colour channels (Simonyan, Vedaldi & Zisserman, "Deep Inside
  Convolutional Networks: Visualising Image Classification Models and Saliency Maps", ICLR
  workshop 2014);
- integrated_gradients: the path integral of that gradient from a black image to the input
  (Gauss-Legendre, ``ig_steps`` points), summed over channels, absolute value (Sundararajan,
  Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017); the completeness gap
  (Captum's convergence delta) is recorded;
- gradcam: Grad-CAM on the model's last convolution, ReLU of the gradient-weighted sum of
  its feature maps, bilinearly upsampled to the image (Selvaraju et al., "Grad-CAM: Visual
  Explanations from Deep Networks via Gradient-based Localization", ICCV 2017).

Each map explains the class the model predicts for that input (what a clinician would be
shown). The maps are taken on the plain model, without deployment-time input
transformations.

Two measurements per attack, method and model:

- the attribution shift between an image and its adversarial version: Spearman's rank
  correlation of the two maps over pixels, and the top-k overlap, the share of the clean
  map's k most attributed pixels that are also among the adversarial map's k most
  attributed ones (k a stated share of the pixels);
- a detector that sees one input's map only (as a deployed one would: the clean version
  of an incoming image is never available): a logistic regression on four statistics of
  the map (log total attribution, share of it in the top-k pixels, normalised entropy,
  roughness), its AUROC from cross-validated scores, folds split by image so that an
  image and its adversarial version are never on both sides. Every perturbed image counts
  as adversarial, whether or not the attack changed the prediction. Detecting adversarial
  inputs from their explanations follows Fidel, Bitton & Shabtai, "When Explainability
  Meets Adversarial Learning: Detecting Adversarial Examples using SHAP Signatures", IJCNN
  2020. An AUROC near 0.5 means the explanations do not tell the inputs apart.

Everything here is a pure function of its arguments (no randomness), so the same models and
images give the same numbers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from testbed.metrics import predicted, unpredicted

METHODS = ("saliency", "integrated_gradients", "gradcam")
SHIFT_KEYS = ("rank_corr", "top_k_overlap", "auroc")
"""What each method and model reports (n/a for a model with non-finite outputs)."""
FEATURES = ("log_total", "top_k_share", "entropy", "roughness")
"""The statistics of one map the detector reads (map_features)."""


# --------------------------------------------------------------------------------------
# Attributions
# --------------------------------------------------------------------------------------


def explainable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose ReLUs do not work in place: Captum's layer
    hooks (Grad-CAM) must see a convolution's output before a ReLU overwrites it."""
    m = copy.deepcopy(model).eval()
    for mod in m.modules():
        if isinstance(mod, nn.ReLU):
            mod.inplace = False
    return m


def last_conv(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The model's last 2-D convolution (Grad-CAM's layer), None if it has none."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model(x), dim=1)


def attribution_maps(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, method: str, *, ig_steps: int = 20
) -> tuple[torch.Tensor, float | None]:
    """Non-negative maps N x H x W of ``method`` for the classes ``target`` on ``model``
    (an ``explainable`` copy), and for integrated gradients the mean relative completeness
    gap |sum(attr) - (f(x) - f(0))| / |f(x) - f(0)| (None for the others)."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Saliency

    x = x.detach().clone().requires_grad_(True)
    if method == "saliency":
        grad = Saliency(model).attribute(x, target=target, abs=True)
        return grad.amax(dim=1).detach(), None
    if method == "integrated_gradients":
        ig = IntegratedGradients(model)
        attr, delta = ig.attribute(
            x,
            baselines=torch.zeros_like(x),
            target=target,
            n_steps=ig_steps,
            internal_batch_size=max(1, 256 // ig_steps) * ig_steps,
            return_convergence_delta=True,
        )
        with torch.no_grad():
            logits = model(x)
            base = model(torch.zeros_like(x))
            idx = torch.arange(len(x))
            span = (logits[idx, target] - base[idx, target]).abs().clamp_min(1e-12)
        gap = float((delta.detach().abs() / span).mean())
        return attr.sum(dim=1).abs().detach(), gap
    if method == "gradcam":
        found = last_conv(model)
        if found is None:
            raise ValueError("Grad-CAM needs a model with a 2-D convolution")
        cam = LayerGradCam(model, found[1]).attribute(x, target=target, relu_attributions=True)
        up = LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear")
        return up[:, 0].clamp_min(0).detach(), None
    raise ValueError(f"unknown attribution method {method!r} (known: {', '.join(METHODS)})")


# --------------------------------------------------------------------------------------
# Attribution shift between a clean and an adversarial map
# --------------------------------------------------------------------------------------


def k_pixels(n_pixels: int, share: float) -> int:
    """k of the top-k overlap: ``share`` of the pixels, at least one."""
    return max(1, min(n_pixels, round(share * n_pixels)))


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps over their pixels (ties share their mean
    rank); NaN when either map is constant (no ranking to compare)."""
    from scipy.stats import rankdata

    ra = rankdata(np.asarray(a, dtype=np.float64).ravel())
    rb = rankdata(np.asarray(b, dtype=np.float64).ravel())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else math.nan


def top_k(a: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest pixels; ties go to the earlier pixel (a stable order)."""
    return np.argsort(-np.asarray(a, dtype=np.float64).ravel(), kind="stable")[:k]


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """|top-k(a) ∩ top-k(b)| / k: 1 when the two maps agree on their k most attributed
    pixels, 0 when they share none."""
    return len(np.intersect1d(top_k(a, k), top_k(b, k))) / k


# --------------------------------------------------------------------------------------
# The detector: one input's map -> adversarial or not
# --------------------------------------------------------------------------------------


def map_features(m: np.ndarray, k: int) -> np.ndarray:
    """The detector's statistics of one non-negative map (FEATURES): log of the total
    attribution; the share of it in the k most attributed pixels; the entropy of the map
    as a distribution over pixels, over log(pixels) (1: flat); roughness, the mean absolute
    difference between neighbouring pixels over the mean pixel. A zero map is flat."""
    m = np.clip(np.asarray(m, dtype=np.float64), 0, None)
    total = float(m.sum())
    n = m.size
    if total <= 0:
        return np.array([math.log(1e-30), k / n, 1.0, 0.0])
    p = m.ravel() / total
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum() / math.log(n)) if n > 1 else 1.0
    diffs = [np.abs(np.diff(m, axis=ax)).mean() for ax in range(m.ndim) if m.shape[ax] > 1]
    rough = float(np.mean(diffs) / (total / n)) if diffs else 0.0
    share = float(np.sort(m.ravel())[::-1][:k].sum() / total)
    return np.array([math.log(total), share, entropy, rough])


def detector_auroc(
    features: np.ndarray, is_adv: np.ndarray, groups: np.ndarray, folds: int = 5
) -> float:
    """AUROC of a logistic regression (standardised features) that flags inputs as
    adversarial, from out-of-fold scores: ``groups`` (the image each row came from) keep an
    image and its adversarial version in the same fold. Deterministic (GroupKFold,
    lbfgs). NaN when there are fewer than two images or only one class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(is_adv, dtype=int)
    n_groups = len(np.unique(groups))
    if n_groups < 2 or len(np.unique(y)) < 2:
        return math.nan
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    cv = GroupKFold(n_splits=min(folds, n_groups))
    scores = cross_val_predict(
        clf, np.asarray(features, dtype=np.float64), y, groups=groups, cv=cv,
        method="decision_function",
    )  # fmt: skip
    return float(roc_auc_score(y, scores))


# --------------------------------------------------------------------------------------
# One attack: both models, every method
# --------------------------------------------------------------------------------------


def shift_and_detect(clean: np.ndarray, adv: np.ndarray, k: int, folds: int) -> dict[str, Any]:
    """Per image shift statistics and the detector's AUROC for maps N x H x W of the clean
    and adversarial versions of the same N images."""
    n = len(clean)
    rank = [rank_correlation(clean[i], adv[i]) for i in range(n)]
    overlap = [top_k_overlap(clean[i], adv[i], k) for i in range(n)]
    feats = np.stack([map_features(m, k) for m in [*clean, *adv]])
    is_adv = np.r_[np.zeros(n), np.ones(n)]
    groups = np.r_[np.arange(n), np.arange(n)]
    return {
        "rank_corr": _nanmean(rank),
        "top_k_overlap": _nanmean(overlap),
        "auroc": detector_auroc(feats, is_adv, groups, folds),
        "rank_corr_per_image": rank,
        "top_k_overlap_per_image": overlap,
    }


def explain_attack(
    models: dict[str, tuple[int, nn.Module]],
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    *,
    methods: Sequence[str],
    top_k_share: float,
    ig_steps: int,
    folds: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Attributions of the clean images ``x`` and their adversarial versions ``x_adv`` on
    each of ``models`` (role -> (client id, model); roles "own" and "benign"), with the
    shift statistics and the detector per method and role. Returns the metrics and, for a
    figure, the first image the attack flipped on the adversary's own model (else the
    first image) with its maps and each model's predictions and confidences."""
    n = int(x.shape[0])
    h, w = int(x.shape[2]), int(x.shape[3])
    k = k_pixels(h * w, top_k_share)
    result: dict[str, Any] = {
        "images": n,
        "models": {role: cid for role, (cid, _) in models.items()},
        "methods": list(methods),
        "k": k,
        "top_k_share": top_k_share,
        "ig_steps": ig_steps if "integrated_gradients" in methods else None,
        "gradcam_layer": _layer_name(next(iter(models.values()))[1])
        if "gradcam" in methods
        else None,
        "detector": (
            f"logistic regression on {', '.join(FEATURES)} of the input's own map; "
            f"AUROC of out-of-fold scores, {folds} folds by image"
        ),
        "per_method": {m: {} for m in methods},
        "predictions": {},
    }
    figure: dict[str, Any] = {"y": int(y[0]), "models": {}}
    chosen, drawable = None, True
    for role, (cid, model) in models.items():
        net = explainable(model)
        p_clean, p_adv = predict_proba(net, x), predict_proba(net, x_adv)
        pred_clean, pred_adv = predicted(p_clean), predicted(p_adv)
        flipped = (pred_clean != pred_adv).tolist()
        diverged = unpredicted(pred_clean, pred_adv)
        result["predictions"][role] = {
            "pred_clean": pred_clean.tolist(),
            "pred_adv": pred_adv.tolist(),
            "flipped": math.nan if diverged else float(np.mean(flipped)),
        }
        if diverged:  # non-finite outputs: no class to explain; no figure for this image
            for method in methods:
                result["per_method"][method][role] = dict.fromkeys(SHIFT_KEYS, math.nan)
            drawable = False
            continue
        if chosen is None:  # the first role is the adversary's own model
            chosen = flipped.index(True) if any(flipped) else 0
            figure.update(
                index=chosen, x=x[chosen].clone(), x_adv=x_adv[chosen].clone(),
                y=int(y[chosen]),
            )  # fmt: skip
        fig_role: dict[str, Any] = {
            "client": cid,
            "pred_clean": int(pred_clean[chosen]),
            "conf_clean": float(p_clean[chosen, pred_clean[chosen]]),
            "pred_adv": int(pred_adv[chosen]),
            "conf_adv": float(p_adv[chosen, pred_adv[chosen]]),
            "maps": {},
        }
        for method in methods:
            clean_maps, gap_c = attribution_maps(net, x, pred_clean, method, ig_steps=ig_steps)
            adv_maps, gap_a = attribution_maps(net, x_adv, pred_adv, method, ig_steps=ig_steps)
            stats = shift_and_detect(clean_maps.cpu().numpy(), adv_maps.cpu().numpy(), k, folds)
            if gap_c is not None and gap_a is not None:
                stats["ig_completeness_gap"] = (gap_c + gap_a) / 2
            result["per_method"][method][role] = stats
            fig_role["maps"][method] = {
                "clean": clean_maps[chosen].clone(),
                "adv": adv_maps[chosen].clone(),
            }
        figure["models"][role] = fig_role
    return result, (figure if drawable else {})


def _layer_name(model: nn.Module) -> str | None:
    found = last_conv(model)
    return found[0] if found else None


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


# --------------------------------------------------------------------------------------
# Over seeds, for the report and compare
# --------------------------------------------------------------------------------------


def summarise_explain(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """attack -> method -> role -> {rank_corr, top_k_overlap, auroc}: mean and std over
    seeds; empty when no attack was explained."""
    from testbed.metrics import mean_std

    out: dict[str, Any] = {}
    for label, a in repeats[0]["attacks"].items():
        if not a.get("explain"):
            continue
        rows = [
            r["attacks"][label]["explain"] for r in repeats if r["attacks"][label].get("explain")
        ]
        out[label] = {
            method: {
                role: {
                    key: mean_std([_float(row["per_method"][method][role][key]) for row in rows])
                    for key in SHIFT_KEYS
                }
                for role in per_role
            }
            for method, per_role in a["explain"]["per_method"].items()
        }
    return out


def _float(v: Any) -> float:
    return math.nan if v is None else float(v)


def explain_for_run(
    cfg: Any, models: Sequence[nn.Module], adversary: int, batch: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's call: the scenario's ``[explain]`` table ``cfg``, every client's deployed
    model, the adversary whose images ``batch`` (x, x_adv, y) are; the benign model is the
    next client's (none in a one-client federation). Adds the seconds it took (time_s)."""
    import time

    t0 = time.perf_counter()
    roles = {"own": (adversary, models[adversary])}
    if len(models) > 1:
        benign = (adversary + 1) % len(models)
        roles["benign"] = (benign, models[benign])
    dev = next(models[adversary].parameters()).device
    result, figure = explain_attack(
        roles, batch["x"].to(dev), batch["x_adv"].to(dev), batch["y"],
        methods=cfg.methods, top_k_share=cfg.top_k, ig_steps=cfg.ig_steps, folds=cfg.folds,
    )  # fmt: skip
    result["time_s"] = time.perf_counter() - t0
    return result, _to_cpu(figure)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj
