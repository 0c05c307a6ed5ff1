"""Relative cost of the robustness-evaluation attacks (testbed/builtins/strong_attacks.py):
seconds for one batch of 100 images beside lean PGD-20, in one run so that the ratios share
the machine's load, and the images each attack sends to the model's predict per image (the
query budget actually spent by the black-box ones).

Workload: the tiny paper CNN of tests/test_strong_attacks.py (16x16 grey, 2 classes, fitted
for a few steps so its boundary lies near the images), 100 images, one thread.

Run:  python benchmarks/strong_attack_cost.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_strong_attacks import SIDE, classifier, tiny_model

from testbed.pluginmanager import build_host
from testbed.transfer import numpy_seeded

CASES = [
    ("pgd", {"eps": 0.05, "eps_step": 0.01, "max_iter": 20}),
    # ART's own AutoAttack settings: APGD 100 iterations x 5 restarts, Square 5000 queries
    ("autoattack", {"eps": 0.05, "eps_step": 0.02}),
    ("autoattack", {"eps": 0.05, "eps_step": 0.02, "max_iter": 50, "nb_random_init": 1,
                    "square_max_iter": 1000}),
    ("cw_l2", {}),
    ("cw_linf", {}),
    ("deepfool", {}),
    ("square", {"eps": 0.05, "max_iter": 1000}),
    ("hopskipjump", {"max_iter": 10, "max_eval": 1000}),
]  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    registry = build_host(autoload=False).registry
    est = classifier(tiny_model(2, seed=1), 2)
    rng = np.random.default_rng(0)
    spread = np.linspace(-0.15, 0.15, 100).reshape(-1, 1, 1, 1)
    x = np.clip(rng.random((100, 1, SIDE, SIDE)) + spread, 0, 1).astype(np.float32)
    predict = est.predict
    y = np.eye(2, dtype=np.float32)[predict(x).argmax(1)]
    queries = [0]

    def counting(batch, *args, **kwargs):
        queries[0] += len(batch)
        return predict(batch, *args, **kwargs)

    est.predict = counting  # counts what the attacks ask; the engine's own scoring is apart
    base = None
    for name, params in CASES:
        attack = registry.build("attacks", name, params, estimator=est)
        queries[0] = 0
        with numpy_seeded(0):
            t0 = time.perf_counter()
            x_adv = attack.generate(x=x, y=y)
            took = time.perf_counter() - t0
        base = base or took
        asr = float(np.mean(predict(x_adv).argmax(1) != y.argmax(1)))
        print(
            f"{name:12s} {params}: {took:8.3f} s/batch  x{took / base:6.1f} PGD-20  "
            f"ASR {asr:.2f}  predict images/img {queries[0] / len(x):.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
