"""After training: clean accuracy, then transfer attacks crafted by ART and scored everywhere."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier
from torch import nn

from testbed.federation import ClientData, seeded
from testbed.metrics import accuracy, attack_success_rate, error_transfer_rate, transfer_summary
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
    """``keys`` (the seed first, then the purpose) seed each batch's generator."""
    preds = []
    for start in range(0, x.shape[0], batch_size):
        g = generator(*keys, d.client_id, start)
        batch = InferenceBatch(d.client_id, x[start : start + batch_size], g)
        hooks.testbed_inference_input(batch=batch)
        preds.append(d.model(batch.x).argmax(1))
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
) -> dict[str, float]:
    acc = {}
    for d in deployed:
        test = clients[d.client_id]
        pred = predict(d, to_unit(test.x_test), hooks, (seed, "clean-accuracy"))
        acc[str(d.client_id)] = accuracy(pred, test.y_test)
    return acc


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
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each adversary crafts on its own model (white-box); every model scores the result.
    Returns the metrics and one example (the first adversary's first image) for figures."""
    asr_rows, etr, costs, linf, counts = [], {}, [], 0.0, []
    example: dict[str, Any] = {}
    adaptive: list[Any] = []
    for a in adversaries:
        x, y = attack_pool(clients[a], samples, seed)
        counts.append(int(y.shape[0]))
        clean = [predict(d, x, hooks, (seed, "attack-clean", spec.label, a)) for d in deployed]
        adaptive = [p for ps in hooks.testbed_attack_preprocessing(client_id=a) for p in ps]
        estimator = PyTorchClassifier(
            deployed[a].model,
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
        # change them (the ASR definition), and ART skips a forward pass.
        y_np = np.eye(num_classes, dtype=np.float32)[clean[a].cpu().numpy()]
        s = derive_seed(seed, "attack", spec.label, a)
        with numpy_seeded(s), seeded(s, device):
            t0 = time.perf_counter()
            x_adv_np = attack.generate(x=x_np, y=y_np)
            batches = math.ceil(len(x_np) / spec.params.get("batch_size", len(x_np)))
            costs.append((time.perf_counter() - t0) / batches)
        x_adv = torch.from_numpy(x_adv_np).to(device)
        linf = max(linf, float((x_adv - x).abs().max()))
        adv = [predict(d, x_adv, hooks, (seed, "attack-adv", spec.label, a)) for d in deployed]
        if not example:
            example = {
                "adversary": a,
                "x": x[0].cpu(),
                "x_adv": x_adv[0].cpu(),
                "label": int(y[0]),
                "pred_clean": int(clean[a][0]),
                "pred_adv": int(adv[a][0]),
            }
        asr_rows.append([attack_success_rate(clean[t], adv[t]) for t in range(len(deployed))])
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
        "linf_max": linf,
        "cost_s": costs,
        # which defences the adversary's own model included when crafting (adaptive attack)
        "adaptive_to": sorted({type(p).__name__ for p in adaptive}),
    }, example
