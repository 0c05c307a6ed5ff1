"""Attack cost: the ART-backed attacks (as the engine builds them) beside a bare-PyTorch loop.

Run: `tox -e bench`, or `python -m pytest benchmarks --benchmark-enable --benchmark-json=F`;
summarise with `python benchmarks/summarise.py F`. See benchmarks/workloads.py for the knobs.
"""

from __future__ import annotations

import pytest
import torch
from workloads import (
    ALPHA,
    ATTACKS,
    BATCH,
    EPS,
    IMPLS,
    QUICK,
    SEED,
    SHAPES,
    WARMUP,
    rounds_for,
    shape_id,
    stock_attack,
)
from workloads import workload as get_workload

from testbed.builtins.attacks import reference_linf_attack
from testbed.transfer import numpy_seeded

# bare and art of one (shape, attack) run back to back, so a change in machine load between
# them skews the ratio as little as possible.
CASES = [
    pytest.param(shape, attack, impl, id=f"{shape_id(shape)}-{attack}-{impl}")
    for shape in SHAPES
    for attack in ATTACKS
    for impl in IMPLS
]


@pytest.mark.parametrize(("shape", "attack", "impl"), CASES)
def test_attack_cost(benchmark, registry, shape, attack, impl):
    w = get_workload(shape)
    name, params, max_iter, random_init = ATTACKS[attack]
    if impl in ("art", "stock"):
        # "art" is exactly the engine's path: the registry's builder on the PyTorchClassifier,
        # numpy in and out. "stock" swaps in ART's own attack classes (BENCH_STOCK=1).
        if impl == "art":
            art_attack = registry.build("attacks", name, params, estimator=w.estimator)
        else:
            art_attack = stock_attack(attack, w.estimator)

        def run():
            with numpy_seeded(SEED):
                return art_attack.generate(x=w.x_np, y=w.y_onehot)
    else:

        def run():
            with numpy_seeded(SEED):
                return reference_linf_attack(
                    w.model,
                    w.x,
                    w.y,
                    eps=EPS,
                    eps_step=EPS if attack == "FGSM" else ALPHA,
                    max_iter=max_iter,
                    random_init=random_init,
                ).numpy()

    benchmark.group = f"{shape_id(shape)} {attack}"
    benchmark.extra_info.update(
        shape=shape_id(shape),
        attack=attack,
        impl=impl,
        max_iter=max_iter,
        batch=BATCH,
        eps=EPS,
        alpha=ALPHA,
        quick=QUICK,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    x_adv = benchmark.pedantic(run, rounds=rounds_for(attack), iterations=1, warmup_rounds=WARMUP)
    # Sanity only (never timing): inside the eps-ball and the pixel range.
    assert x_adv.shape == w.x_np.shape
    assert abs(x_adv - w.x_np).max() <= EPS + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
