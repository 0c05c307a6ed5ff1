"""Robustness-evaluation attacks (testbed/builtins/strong_attacks.py): the cost of one batch on
the paper CNN beside lean PGD-20 in the same run, the images each attack sends to the model's
predict per image (the query count of the black-box ones), and a per-unit cost to extrapolate
to ART's default budgets (docs/BENCHMARKS.md).

Workload: workloads.py's paper CNN (random He-initialised weights, frozen, eval mode) and its
batch (100 images at 1x100x100; BENCH_QUICK: 8 at 1x16x16); labels = the model's own
predictions; each attack built by the registry on a `PyTorchClassifier` made as
`testbed.transfer.run_attack` makes it (clip_values (0, 1), preprocessing=None).

Budgets are reduced (the BUDGETS table): ART's defaults would take hours per batch on CPU.
Two departures from the plain workload, both so that the measured work is the attack's:
- AutoAttack and Square run at L-inf eps 0.0005, below every image's distance to this
  model's boundary (the smallest is about 0.0013), so no image is fooled and every member
  spends its whole budget on every image, as on a robust model. At the workload's eps 0.03
  APGD fools every image of this untrained model in its first steps, and the rest of the
  ensemble never runs. Their cost per iteration or query does not depend on eps.
- HopSkipJump needs an adversarial starting point drawn from uniform noise, and the random
  model gives every input the same class, so it would give up after its 100 draws. It runs
  on a copy whose last bias is shifted so that the boundary passes through the batch (half
  the images in each class); the cost of a forward pass is unchanged.

Run (one round each; 85 minutes on 2 CPU cores that other jobs were also using):
  BENCH_ROUNDS=1 BENCH_WARMUP=0 OMP_NUM_THREADS=2 pytest benchmarks/test_strong_attack_cost.py \
      --benchmark-enable --benchmark-json=F
  python benchmarks/strong_attack_table.py F          # Markdown table of the JSON
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from art.estimators.classification import PyTorchClassifier
from torch import nn
from workloads import ATTACKS, BATCH, NUM_CLASSES, QUICK, ROUNDS, SEED, SHAPES, WARMUP, shape_id
from workloads import workload as get_workload

from testbed.transfer import numpy_seeded

SHAPE = SHAPES[0]  # 1x100x100 (MRI); 1x16x16 with BENCH_QUICK
BUDGET_EPS = 0.0005  # AutoAttack and Square: below every image's distance to the boundary


@dataclass(frozen=True)
class Budget:
    """One benchmark: the registry attack, its reduced params, and what one unit of its
    budget is (the per-unit cost extrapolates to ART's default budget)."""

    label: str
    attack: str
    params: dict[str, Any]
    budget: str  # in words, for the table
    unit: str  # what `s_per_unit` is per
    boundary_model: bool = False  # HopSkipJump: the copy whose boundary crosses the batch


_PGD20 = ATTACKS["PGD-20"][1]
BUDGETS: tuple[Budget, ...] = (
    Budget(
        "PGD-20 (first)",
        "pgd",
        _PGD20,
        "eps 0.03, step 0.007, 20 iterations, 1 random start (lean path)",
        "iteration",
    ),
    Budget(
        "AutoAttack",
        "autoattack",
        {
            "eps": BUDGET_EPS,
            "eps_step": 2 * BUDGET_EPS,
            "max_iter": 10,
            "nb_random_init": 1,
            "square_max_iter": 50,
        },
        "APGD-CE 10 iterations x 1 restart, DeepFool (ART's member: up to 100 iterations), "
        "Square 50 iterations; eps 0.0005",
        "member (see members)",  # APGD iteration, DeepFool iteration, Square iteration
    ),
    Budget(
        "CW-L2",
        "cw_l2",
        {"binary_search_steps": 2, "max_iter": 5},
        "2 search steps x 5 iterations",
        "iteration (batch)",
    ),
    Budget(
        "CW-Linf",
        "cw_linf",
        {"max_iter": 2, "initial_const": 0.5, "largest_const": 1.0},
        "1 constant (0.5) x 2 Adam steps per tau round",
        "Adam step (one image)",
    ),
    Budget(
        "DeepFool",
        "deepfool",
        {},
        "defaults: up to 100 iterations, overshoot 1e-6",
        "gradient step (batch)",
    ),
    Budget(
        "Square",
        "square",
        {"eps": BUDGET_EPS, "max_iter": 100},
        "100 iterations (the default), eps 0.0005",
        "iteration (batch)",
    ),
    Budget(
        "HopSkipJump",
        "hopskipjump",
        {"max_iter": 2, "max_eval": 50, "init_eval": 10},
        "2 iterations, init_eval 10, max_eval 50",
        "query per image (batch)",
        boundary_model=True,
    ),
    Budget(
        "PGD-20 (last)",
        "pgd",
        _PGD20,
        "as first: brackets the run against load drift",
        "iteration",
    ),
)

# ART's default budgets, for the extrapolation
CW_L2_DEFAULT_ITERATIONS = 10 * 10  # binary_search_steps x max_iter
CW_LINF_DEFAULT_STEPS_PER_ROUND = 21 * 10  # constants 1e-5 doubling below 20, x max_iter
SQUARE_DEFAULT_QUERIES = 100  # SquareAttack's max_iter (AutoAttack's member: 5000)
# HopSkipJump, max_iter 50, init_eval 100, max_eval 10000: sum over iterations of
# min(100 sqrt(i + 1), 10000) gradient-estimate queries; its searches add a few per iteration
HSJ_DEFAULT_QUERIES = sum(min(int(100 * (i + 1) ** 0.5), 10000) for i in range(50))  # 23883

_REFERENCE: dict[str, float] = {}  # PGD-20 seconds per batch, measured first in this session


def engine_estimator(model: nn.Module) -> PyTorchClassifier:
    """As `testbed.transfer.run_attack` builds it (workloads.py's estimator keeps ART's
    default identity standardisation, which the attack-cost benchmarks measured with)."""
    return PyTorchClassifier(
        model,
        loss=nn.CrossEntropyLoss(),
        input_shape=SHAPE,
        nb_classes=NUM_CLASSES,
        clip_values=(0.0, 1.0),
        preprocessing=None,
        device_type="cpu",
    )


def boundary_model(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of `model` whose last bias puts the decision boundary through the batch: the
    median image's two logits are equal."""
    shifted = copy.deepcopy(model)
    last = [m for m in shifted.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        logits = shifted(x)
        last.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    return shifted


class Counter:
    """Counts what an attack asks of its estimators: images sent to predict (the queries) and
    the calls carrying them, and backward passes (images x classes differentiated)."""

    def __init__(self, estimator: PyTorchClassifier):
        self.reset()
        self.raw_predict = estimator.predict  # the engine's own scoring, not counted
        self.wrap(estimator)

    def wrap(self, estimator: PyTorchClassifier) -> None:
        predict, class_gradient, loss_gradient = (
            estimator.predict,
            estimator.class_gradient,
            estimator.loss_gradient,
        )

        def counting_predict(x, *args, **kwargs):
            self.predict_images += len(x)
            self.predict_calls += 1
            return predict(x, *args, **kwargs)

        def counting_class_gradient(x, label=None, *args, **kwargs):
            self.backward_images += len(x) * (estimator.nb_classes if label is None else 1)
            return class_gradient(x, label, *args, **kwargs)

        def counting_loss_gradient(x, y, *args, **kwargs):
            self.backward_images += len(x)
            return loss_gradient(x, y, *args, **kwargs)

        estimator.predict = counting_predict
        estimator.class_gradient = counting_class_gradient
        estimator.loss_gradient = counting_loss_gradient

    def reset(self) -> None:
        self.predict_images = self.predict_calls = self.backward_images = 0

    def snapshot(self) -> dict[str, int]:
        return {
            "predict_images": self.predict_images,
            "predict_calls": self.predict_calls,
            "backward_images": self.backward_images,
        }


def time_members(attack, counter: Counter) -> list[dict[str, Any]]:
    """Wrap each AutoAttack member's generate to time it and count its model use."""
    log: list[dict[str, Any]] = []

    def timed(member):
        generate, name = member.generate, type(member).__name__

        def run(*args, **kwargs):
            before = counter.snapshot()
            t0 = time.perf_counter()
            out = generate(*args, **kwargs)
            took = time.perf_counter() - t0
            after = counter.snapshot()
            images = len(kwargs["x"]) if "x" in kwargs else len(args[0])
            log.append(
                {"member": name, "images": images, "s": took}
                | {k: after[k] - before[k] for k in after}
            )
            return out

        return run

    for member in attack.attacks:
        if member.estimator is not attack.estimator:
            counter.wrap(member.estimator)  # ART's APGD crafts on its own PyTorchClassifier
        member.generate = timed(member)
    return log


def member_units(members: list[dict[str, Any]], params: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-member unit costs: APGD per iteration (batch), DeepFool per iteration (batch,
    counted from its class-gradient passes), Square per query (batch)."""
    out = []
    for m in members:
        row = dict(m)
        n = max(m["images"], 1)
        if m["member"] == "AutoProjectedGradientDescent":
            units = params["max_iter"] * params["nb_random_init"]
            row.update(unit="APGD iteration", units=units, default_units=100 * 5)  # x restarts
        elif m["member"] == "DeepFool":
            units = m["backward_images"] / (n * NUM_CLASSES)
            # ART's member settings are AutoAttack's defaults: measured as they are
            row.update(unit="DeepFool iteration", units=units, default_units=None)
        elif m["member"] == "SquareAttack":
            units = params["square_max_iter"]
            row.update(unit="Square iteration", units=units, default_units=5000)
        else:
            units = None
        row["s_per_unit"] = m["s"] / units if units else None
        out.append(row)
    return out


def case_id(b: Budget) -> str:
    return b.label.replace(" ", "").replace("(", "-").rstrip(")")


CASES = [pytest.param(b, id=case_id(b)) for b in BUDGETS]


@pytest.mark.parametrize("spec", CASES)
def test_strong_attack_cost(benchmark, registry, spec: Budget):
    w = get_workload(SHAPE)
    model = boundary_model(w.model, w.x) if spec.boundary_model else w.model
    estimator = engine_estimator(model)
    counter = Counter(estimator)
    x = w.x_np
    labels = counter.raw_predict(x).argmax(1)  # the model's own predictions, as the engine
    y = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    attack = registry.build("attacks", spec.attack, spec.params, estimator=estimator)
    members: list[dict[str, Any]] = []
    if spec.attack == "autoattack":
        members = time_members(attack, counter)
    rounds = [0]  # CW-Linf: (tau, constant) rounds, one _generate_single each
    if spec.attack == "cw_linf":
        single = attack._generate_single

        def counted_single(*args, **kwargs):
            rounds[0] += 1
            return single(*args, **kwargs)

        attack._generate_single = counted_single
    seconds: list[float] = []
    last: dict[str, Any] = {}

    def run():
        counter.reset()
        members.clear()
        rounds[0] = 0
        with numpy_seeded(SEED):
            t0 = time.perf_counter()
            x_adv = attack.generate(x=x, y=y)
            seconds.append(time.perf_counter() - t0)
        last.update(counter.snapshot(), cw_linf_rounds=rounds[0])
        return x_adv

    benchmark.group = f"{shape_id(SHAPE)} strong attacks"
    x_adv = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    s = statistics.median(seconds[WARMUP:] or seconds)
    n = len(x)

    units: float | None = None
    default_units: float | None = None
    s_at_default: float | None = None
    member_rows = member_units(members, spec.params) if members else None
    if spec.attack == "pgd":
        units = default_units = spec.params["max_iter"]
        _REFERENCE.setdefault("pgd20", s)
    elif spec.attack == "autoattack":
        # each member at ART's default budget, plus AutoAttack's own checks as measured
        overhead = s - sum(m["s"] for m in member_rows)
        s_at_default = overhead + sum(
            m["s_per_unit"] * m["default_units"] if m["default_units"] else m["s"]
            for m in member_rows
        )
    elif spec.attack == "cw_l2":
        units = spec.params["binary_search_steps"] * spec.params["max_iter"]
        default_units = CW_L2_DEFAULT_ITERATIONS
    elif spec.attack == "cw_linf":
        # each Adam step differentiates two logits of one image; at ART's defaults a tau
        # round runs 21 constants x 10 steps, and the rounds per image are taken as here
        units = last["backward_images"] / 2
        default_units = CW_LINF_DEFAULT_STEPS_PER_ROUND * last["cw_linf_rounds"]
    elif spec.attack == "deepfool":
        units = default_units = last["backward_images"] / (n * NUM_CLASSES)  # at its defaults
    elif spec.attack == "square":
        units, default_units = spec.params["max_iter"], SQUARE_DEFAULT_QUERIES
    elif spec.attack == "hopskipjump":
        # An upper bound: this small budget sends mostly one image per call, the defaults
        # send most queries in batches of 64 (cheaper per image).
        units = last["predict_images"] / n
        default_units = HSJ_DEFAULT_QUERIES
    if units and default_units and s_at_default is None:
        s_at_default = s / units * default_units

    fooled = counter.raw_predict(x_adv.astype(np.float32, copy=False)).argmax(1) != labels
    reference = _REFERENCE.get("pgd20")
    benchmark.extra_info.update(
        strong_attack=spec.label,
        registry_attack=spec.attack,
        params=spec.params,
        budget=spec.budget,
        boundary_model=spec.boundary_model,
        labels_per_class=np.bincount(labels, minlength=NUM_CLASSES).tolist(),
        shape=shape_id(SHAPE),
        batch=BATCH,
        quick=QUICK,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        s_per_batch=s,
        x_pgd20=s / reference if reference else None,
        predict_images_per_image=last["predict_images"] / n,
        predict_calls=last["predict_calls"],
        backward_images_per_image=last["backward_images"] / n,
        fooled=float(fooled.mean()),
        linf_max=float(np.abs(x_adv - x).max()),
        unit=spec.unit,
        units=units,
        s_per_unit=s / units if units else None,
        default_units=default_units,
        s_at_default=s_at_default,
        cw_linf_rounds_per_image=last["cw_linf_rounds"] / n if spec.attack == "cw_linf" else None,
        members=member_rows,
    )
    # Sanity only (never timing): the batch came back in the pixel range.
    assert x_adv.shape == x.shape
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    if "eps" in spec.params:
        assert np.abs(x_adv - x).max() <= spec.params["eps"] + 1e-6
