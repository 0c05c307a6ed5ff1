"""Workloads and knobs of the attack-cost benchmarks (docs/BENCHMARKS.md).

Environment:
  BENCH_ROUNDS         timed rounds per benchmark (default 3; 1 with BENCH_QUICK)
  BENCH_ROUNDS_PGD40   timed rounds for PGD-40 only (default: BENCH_ROUNDS)
  BENCH_WARMUP         untimed warm-up rounds per benchmark (default 1; 0 with BENCH_QUICK)
  BENCH_QUICK=1        tiny shapes and batch for a smoke run
  BENCH_STOCK=1        also time stock ART (its own attack classes on the same frozen model)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from art.attacks.evasion import BasicIterativeMethod, FastGradientMethod, ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier
from torch import nn

from testbed.builtins.models import PaperCNNParams, build_paper_cnn

QUICK = os.environ.get("BENCH_QUICK", "").lower() in ("1", "true", "yes")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "1" if QUICK else "3"))
ROUNDS_PGD40 = int(os.environ.get("BENCH_ROUNDS_PGD40", str(ROUNDS)))
WARMUP = int(os.environ.get("BENCH_WARMUP", "0" if QUICK else "1"))
STOCK = os.environ.get("BENCH_STOCK", "").lower() in ("1", "true", "yes")
IMPLS = ("bare", "art", "stock") if STOCK else ("bare", "art")

BATCH = 8 if QUICK else 100
SHAPES = ((1, 16, 16), (3, 16, 16)) if QUICK else ((1, 100, 100), (3, 96, 96))
EPS, ALPHA = 0.03, 0.007
NUM_CLASSES = 2
SEED = 0

# name -> (registry attack, params, max_iter, random start)
ATTACKS: dict[str, tuple[str, dict, int, bool]] = {
    "FGSM": ("fgsm", {"eps": EPS}, 1, False),
    "BIM-20": ("bim", {"eps": EPS, "eps_step": ALPHA, "max_iter": 20}, 20, False),
    **{
        f"PGD-{k}": (
            "pgd",
            {"eps": EPS, "eps_step": ALPHA, "max_iter": k, "num_random_init": 1},
            k,
            True,
        )
        for k in (10, 20, 40)
    },
}


def shape_id(shape: tuple[int, int, int]) -> str:
    return "x".join(map(str, shape))


def rounds_for(attack: str) -> int:
    return ROUNDS_PGD40 if attack == "PGD-40" else ROUNDS


@dataclass
class Workload:
    """One shape's model and batch, prepared as `testbed.transfer.run_attack` prepares them."""

    shape: tuple[int, int, int]
    model: nn.Module
    estimator: PyTorchClassifier
    x: torch.Tensor  # [0, 1] pixels, float32
    x_np: np.ndarray
    y: torch.Tensor  # the model's own predictions (class indices)
    y_onehot: np.ndarray


_CACHE: dict[tuple[int, int, int], Workload] = {}


def workload(shape: tuple[int, int, int]) -> Workload:
    if shape not in _CACHE:
        _CACHE.clear()  # one shape's model and batch alive at a time
        c, size, _ = shape
        torch.manual_seed(SEED)  # random (He-initialised) weights, the same every session
        model = build_paper_cnn(PaperCNNParams(), c, size, NUM_CLASSES, [0.5] * c, [0.25] * c)
        # As testbed.transfer.deploy: eval mode and frozen weights.
        model.eval()
        model.requires_grad_(False)
        x = torch.rand((BATCH, *shape), generator=torch.Generator().manual_seed(SEED))
        with torch.no_grad():
            y = model(x).argmax(1)
        # As testbed.transfer.run_attack: clip_values (0, 1), labels = own predictions.
        estimator = PyTorchClassifier(
            model,
            loss=nn.CrossEntropyLoss(),
            input_shape=shape,
            nb_classes=NUM_CLASSES,
            clip_values=(0.0, 1.0),
            device_type="cpu",
        )
        y_onehot = np.eye(NUM_CLASSES, dtype=np.float32)[y.numpy()]
        # Warm up once per shape (thread pool, allocator, convolution kernels for these shapes)
        # so that the first benchmark of a shape is not charged for it.
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(nn.functional.cross_entropy(model(xg), y), xg)
        _CACHE[shape] = Workload(shape, model, estimator, x, x.numpy(), y, y_onehot)
    return _CACHE[shape]


def stock_attack(attack: str, estimator: PyTorchClassifier):
    """The attack as stock ART builds it (what BASELINES.md's "ART" column measured)."""
    name, p, _, _ = ATTACKS[attack]
    if name == "fgsm":
        return FastGradientMethod(estimator, norm=np.inf, eps=p["eps"], batch_size=BATCH)
    common = {"eps": p["eps"], "eps_step": p["eps_step"], "max_iter": p["max_iter"]}
    if name == "bim":
        return BasicIterativeMethod(estimator, **common, batch_size=BATCH, verbose=False)
    return ProjectedGradientDescent(
        estimator,
        norm=np.inf,
        **common,
        num_random_init=p["num_random_init"],
        batch_size=BATCH,
        verbose=False,
    )
