"""After training: clean accuracy, then transfer attacks crafted by ART and scored everywhere."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from art.attacks.evasion import AutoAttack
from art.estimators.classification import PyTorchClassifier
from art.estimators.classification.classifier import ClassGradientsMixin
from art.estimators.estimator import LossGradientsMixin
from torch import nn

from testbed.local_training import ClientData, seeded
from testbed.metrics import (
    HEALTHY_MARKERS,
    NO_PREDICTION,
    accuracy,
    attack_success_rate,
    balanced_accuracy,
    direction_asr,
    error_transfer_rate,
    healthy_class,
    mean,
    named_healthy_class,
    predicted,
    targeted_success_rate,
    transfer_summary,
    true_label_asr,
)
from testbed.perceptibility import perceptibility, pool_perceptibility
from testbed.pluginmanager import PluginError
from testbed.registry import Registry
from testbed.scenario import Attack
from testbed.state import InferenceBatch, derive_seed, generator


@dataclass(frozen=True)
class Deployed:
    """A client's final model, frozen for inference: attacks need input gradients only,
    and frozen parameters spare ART's loss_gradient the weight gradients (BASELINES.md)."""

    client_id: int
    model: nn.Module


def deploy(models: Sequence[nn.Module]) -> list[Deployed]:
    out = []
    for cid, m in enumerate(models):
        m.eval()
        m.requires_grad_(False)
        out.append(Deployed(cid, m))
    return out


@torch.no_grad()
def predict(
    d: Deployed, x: torch.Tensor, hooks: Any, keys: tuple[object, ...], batch_size: int = 256
) -> torch.Tensor:
    """``keys`` (the seed first, then the purpose) seed each batch's generator. An input
    defence that changes the batch's shape or returns non-finite pixels is a plugin error
    naming it: a prediction per image it dropped, or of NaN, would be a wrong rate."""
    preds = []
    for start in range(0, x.shape[0], batch_size):
        g = generator(*keys, d.client_id, start)
        batch = InferenceBatch(d.client_id, x[start : start + batch_size], g)
        shape = batch.x.shape

        def check(batch: InferenceBatch = batch, shape: torch.Size = shape) -> None:
            if batch.x.shape != shape:
                raise ValueError(f"changed the batch's shape {tuple(shape)} to "
                                 f"{tuple(batch.x.shape)}")  # fmt: skip
            if not bool(torch.isfinite(batch.x).all()):
                raise ValueError("returned non-finite pixels")

        hooks.call_each("testbed_inference_input", check, batch=batch)
        preds.append(predicted(d.model(batch.x)))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


@contextmanager
def numpy_seeded(seed: int):
    """ART draws random starts from numpy's global RNG; seed it, then restore it."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


def attack_pool(data: ClientData, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The adversary's n attacked images: a seeded draw from its own test split."""
    g = generator(seed, "attack-pool", data.client_id)
    order = torch.randperm(data.y_test.shape[0], generator=g)
    idx = order[:n].to(data.y_test.device)
    return data.x_test[idx].float().div(255), data.y_test[idx]


def clean_accuracy(
    deployed: Sequence[Deployed], clients: Sequence[ClientData], hooks: Any, seed: int
) -> tuple[dict[str, float], dict[str, float], list[dict[str, Any]]]:
    """Each deployed model's accuracy on its own test split, its balanced accuracy there
    (a label-skewed split inflates the plain one), and an event for each model that gives
    non-finite outputs (diverged): its accuracies and attack rates are NaN."""
    acc, balanced, events = {}, {}, []
    for d in deployed:
        test = clients[d.client_id]
        pred = predict(d, to_unit(test.x_test), hooks, (seed, "clean-accuracy"))
        acc[str(d.client_id)] = accuracy(pred, test.y_test)
        balanced[str(d.client_id)] = balanced_accuracy(pred, test.y_test)
        if none := int((pred == NO_PREDICTION).sum()):
            events.append({
                "round": "end", "client": d.client_id, "kind": "diverged",
                "action": "its accuracy and attack rates are n/a",
                "detail": f"non-finite outputs on {none} of {pred.numel()} own test images",
            })  # fmt: skip
    return acc, balanced, events


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255)


def run_attack(
    spec: Attack,
    deployed: Sequence[Deployed],
    clients: Sequence[ClientData],
    adversaries: Sequence[int],
    registry: Registry,
    hooks: Any,
    *,
    seed: int,
    samples: int,
    num_classes: int,
    device: torch.device,
    on_adversary_done: Callable[[], None] | None = None,
    classes: Sequence[str] = (),
    crafting: Mapping[int, nn.Module] | None = None,
    keep: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each adversary crafts on its own model (white-box); every model scores the result.
    Returns the metrics and one example (the first adversary's first image) for figures.
    ``classes`` (the dataset's class names) decide which class is healthy for the split of
    the ASR by direction; without them class 0 is. ``crafting`` (the outsider) gives each
    adversary another model to craft on (a surrogate) in place of its federated one.
    ``keep`` > 0 adds the first adversary's first ``keep`` clean and adversarial images and
    labels to the example, as ``batch`` (for explanations)."""
    asr_rows, etr, costs, linf, counts = [], {}, [], 0.0, []
    asr_true_rows: list[list[float]] = []
    healthy = healthy_class(classes)
    directions: list[list[dict[str, float | int]]] = []
    tsr_rows: list[list[float]] = []
    percept: list[dict[str, float | int]] = []
    per_image: dict[str, list[list[int]]] = {"y": [], "pred_clean_own": [], "pred_adv_own": []}
    example: dict[str, Any] = {}
    attack: Any = None
    asr_crafting: list[float] = []
    adaptive: list[Any] = []
    for a in adversaries:
        x, y = attack_pool(clients[a], samples, seed)
        counts.append(int(y.shape[0]))
        clean = [predict(d, x, hooks, (seed, "attack-clean", spec.label, a)) for d in deployed]
        adaptive = [p for ps in hooks.testbed_attack_preprocessing(client_id=a) for p in ps]
        crafter = deployed[a].model if crafting is None else crafting[a]
        # the model the adversary crafts on labels the attack (its own predictions)
        own = clean[a] if crafting is None else _plain_predict(crafter, x)
        estimator = PyTorchClassifier(
            crafter,
            loss=nn.CrossEntropyLoss(),
            input_shape=tuple(x.shape[1:]),
            nb_classes=num_classes,
            clip_values=(0.0, 1.0),
            preprocessing_defences=adaptive or None,
            # normalisation is inside the model; ART's own (identity) standardisation would
            # only cost time, and in numpy it upcasts to float64
            preprocessing=None,
            device_type="gpu" if device.type == "cuda" else "cpu",
        )
        attack = registry.build("attacks", spec.name, spec.params, estimator=estimator)
        x_np = x.cpu().numpy()
        # Label the attack with the adversary's own predictions: the untargeted goal is to
        # change them (the ASR definition), and ART skips a forward pass. A targeted attack
        # gets its targets instead (ART reads y as the class to reach).
        targets = None
        if spec.params.get("targeted"):
            targets = target_labels(spec.params.get("target"), own, healthy, num_classes)
        labels = own if targets is None else targets
        y_np = np.eye(num_classes, dtype=np.float32)[labels.cpu().numpy()]
        s = derive_seed(seed, "attack", spec.label, a)
        with numpy_seeded(s), seeded(s, device):
            t0 = time.perf_counter()
            x_adv_np = attack.generate(x=x_np, y=y_np)
            batches = math.ceil(len(x_np) / spec.params.get("batch_size", len(x_np)))
            costs.append((time.perf_counter() - t0) / batches)
        # some ART attacks return float64 (HopSkipJump's search): the models take float32
        if problem := budget_violation(x_np, x_adv_np, budget(spec.params)):
            raise PluginError(f"attack {spec.label} ({spec.name}) {problem}")
        x_adv = torch.from_numpy(x_adv_np.astype(x_np.dtype, copy=False)).to(device)
        linf = max(linf, float((x_adv - x).abs().max()))
        adv = [predict(d, x_adv, hooks, (seed, "attack-adv", spec.label, a)) for d in deployed]
        if not example:
            example = {
                "adversary": a,
                "x": x[0].cpu().clone(),  # clone: a view would save the whole batch
                "x_adv": x_adv[0].cpu().clone(),
                "label": int(y[0]),
                "pred_clean": int(clean[a][0]),
                "pred_adv": int(adv[a][0]),
            }
            if keep > 0:
                example["batch"] = {
                    "x": x[:keep].cpu(), "x_adv": x_adv[:keep].cpu(), "y": y[:keep].cpu()
                }  # fmt: skip
        asr_rows.append([attack_success_rate(clean[t], adv[t]) for t in range(len(deployed))])
        asr_true_rows.append([true_label_asr(y, clean[t], adv[t]) for t in range(len(deployed))])
        if crafting is not None:
            asr_crafting.append(attack_success_rate(own, _plain_predict(crafter, x_adv)))
        directions.append([direction_asr(clean[t], adv[t], healthy) for t in range(len(deployed))])
        if targets is not None:
            tsr_rows.append(
                [targeted_success_rate(clean[t], adv[t], targets) for t in range(len(deployed))]
            )
        percept.append(perceptibility(x, x_adv))
        # per image on the adversary's own model: robust accuracy over attacks needs them
        per_image["y"].append(y.cpu().tolist())
        per_image["pred_clean_own"].append(clean[a].cpu().tolist())
        per_image["pred_adv_own"].append(adv[a].cpu().tolist())
        for t in range(len(deployed)):
            etr[(a, t)] = error_transfer_rate(adv[a], adv[t], y)[0]
        if on_adversary_done:
            on_adversary_done()
    return {
        "attack": spec.name,
        "sweep_of": spec.sweep_of,
        "sweep_point": spec.sweep_point,
        "params": spec.params,
        "adversaries": list(adversaries),
        "samples": counts,
        "asr": asr_rows,
        "etr": {f"{a}->{t}": v for (a, t), v in etr.items()},
        **transfer_summary(asr_rows, etr, adversaries),
        # the same, counted against the true label (a metric variant; see true_label_asr)
        "asr_true": asr_true_rows,
        **{
            f"{k}_true": v
            for k, v in _nan_free_summary(asr_true_rows, adversaries).items()
            if k.startswith("aasr")
        },
        "linf_max": linf,
        "cost_s": costs,
        # which defences the adversary's own model included when crafting (adaptive attack)
        "adaptive_to": sorted({type(p).__name__ for p in adaptive}),
        "access": access(attack),
        "budget": budget(spec.params),
        "targeted": targets is not None,
        "target": spec.params.get("target"),
        "healthy_class": {"index": healthy, "name": _class_name(classes, healthy)},
        "direction": _direction_summary(directions, adversaries),
        "tsr": tsr_rows or None,
        "perceptibility": pool_perceptibility(percept) if percept else None,
        "per_image": per_image,
        "notes": list(getattr(attack, "testbed_notes", [])),
        "crafted_on": "federated model" if crafting is None else "surrogate",
        # white-box ASR on the model the examples were crafted on, when that is a surrogate
        "asr_crafting": asr_crafting or None,
    }, example


def _nan_free_summary(rows: list[list[float]], adversaries: Sequence[int]) -> dict[str, float]:
    """AASR means over the cells with support (a model that got no image right has none)."""
    cells = [(a, t, v) for a, row in zip(adversaries, rows, strict=True) for t, v in enumerate(row)]
    ok = [(a, t, v) for a, t, v in cells if not math.isnan(v)]
    return {
        "aasr": mean([v for _, _, v in ok]),
        "aasr_own": mean([v for a, t, v in ok if a == t]),
        "aasr_benign": mean([v for a, t, v in ok if a != t]),
    }


@torch.no_grad()
def _plain_predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predictions of the adversary's private surrogate: no deployment-time defence there."""
    return torch.cat(
        [predicted(model(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    )


def target_problem(spec: Attack, classes: Sequence[str]) -> str | None:
    """Why a targeted attack cannot aim at its target on a task with these class names
    (None: it can). Checked when the data is loaded, before any training: a named
    direction needs a class named healthy, else "missed diagnosis" would silently mean
    class 0; an index needs the class to exist."""
    if not spec.params.get("targeted"):
        return None
    target = spec.params.get("target")
    where = f"attacks {spec.label!r}: target {target!r}"
    if isinstance(target, int) and target >= len(classes):
        return f"{where} is not a class of this task (0..{len(classes) - 1}: {', '.join(classes)})"
    if isinstance(target, str) and named_healthy_class(classes) is None:
        return (
            f"{where} needs a class named healthy (a name containing "
            f"{', '.join(HEALTHY_MARKERS)}); this task's classes are {', '.join(classes)}: "
            "give the target class index instead"
        )
    if isinstance(target, str) and len(classes) < 2:
        return f"{where} needs two classes"
    return None


def target_labels(
    target: str | int | None, pred_clean: torch.Tensor, healthy: int, num_classes: int
) -> torch.Tensor:
    """One target class per image. "lesion_to_healthy": the healthy class; "healthy_to_lesion":
    the first class that is not healthy (the lesion class of a binary task); an int: that
    class."""
    if target == "lesion_to_healthy":
        cls = healthy
    elif target == "healthy_to_lesion":
        cls = next(c for c in range(num_classes) if c != healthy)
    elif isinstance(target, int) and 0 <= target < num_classes:
        cls = target
    else:
        raise ValueError(f"target {target!r} is not a class of this task (0..{num_classes - 1})")
    return torch.full_like(pred_clean, cls)


def access(attack: Any) -> str:
    """What the attack needs of the model, read from what ART requires of its estimator:
    "white-box" (gradients), else "black-box" (scores or decisions only). AutoAttack asks
    only for a classifier but its APGD and DeepFool members use gradients: white-box."""
    if isinstance(attack, AutoAttack):
        return "white-box"
    grads = (ClassGradientsMixin, LossGradientsMixin)
    needs = getattr(attack, "estimator_requirements", None) or ()
    uses_grads = any(isinstance(r, type) and issubclass(r, grads) for r in needs)
    return "white-box" if uses_grads else "black-box"


def budget(params: dict[str, Any]) -> dict[str, Any] | None:
    """The threat model an attack's params state: norm and eps; None for minimum-norm
    attacks (Carlini-Wagner, DeepFool, HopSkipJump), which have no bound."""
    if "eps" not in params:
        return None
    return {"norm": str(params.get("norm", "inf")), "eps": float(params["eps"])}


def budget_violation(x: np.ndarray, x_adv: np.ndarray, bound: dict[str, Any] | None) -> str | None:
    """Why ``x_adv`` is not a valid attack on ``x`` (wrong shape, non-finite, outside the
    [0, 1] pixel range, or past its stated ``bound``), else None. An attack past its budget
    (a plugin's bug, eps in other units) would report a higher ASR that looks valid.
    The slack covers float32 rounding: one projection, then the sum over an L2 norm."""
    if x_adv.shape != x.shape:
        return f"returned shape {tuple(x_adv.shape)} for inputs of shape {tuple(x.shape)}"
    if not np.isfinite(x_adv).all():
        return "returned non-finite pixels"
    if x_adv.min() < -1e-6 or x_adv.max() > 1 + 1e-6:
        return f"returned pixels outside [0, 1] ({x_adv.min():.4g} to {x_adv.max():.4g})"
    if bound is None:
        return None
    delta = (x_adv - x).reshape(len(x), -1)  # in float32: its rounding is inside the slack
    eps = bound["eps"]
    if bound["norm"] == "inf":
        worst, slack = float(np.abs(delta).max(initial=0.0)), 1e-6
    else:
        order = float(bound["norm"])
        worst = float(np.linalg.norm(delta, ord=order, axis=1).max(initial=0.0))
        slack = 1e-4 * eps + 1e-6 * delta.shape[1] ** (1 / order)
    if worst > eps + slack:
        return f"went past its budget: L{bound['norm']} {worst:.6g} > eps {eps:.6g}"
    return None


def _class_name(classes: Sequence[str], i: int) -> str:
    return classes[i] if i < len(classes) else str(i)


def _direction_summary(
    rows: list[list[dict[str, float | int]]], adversaries: Sequence[int]
) -> dict[str, Any]:
    """The direction split as adversary x target matrices, and their means over the
    adversary's own model and over the benign ones (NaN cells, no support, left out)."""
    out: dict[str, Any] = {}
    for key in ("lesion_to_healthy", "healthy_to_lesion"):
        matrix = [[float(cell[key]) for cell in row] for row in rows]
        cells = [
            (a, t, v) for a, row in zip(adversaries, matrix, strict=True) for t, v in enumerate(row)
        ]
        out[key] = matrix
        out[f"{key}_own"] = mean([v for a, t, v in cells if a == t and not math.isnan(v)])
        out[f"{key}_benign"] = mean([v for a, t, v in cells if a != t and not math.isnan(v)])
    return out
