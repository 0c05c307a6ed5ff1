"""DP-SGD cost: one local epoch of the dp_sgd mechanism beside one epoch of plain local SGD.

Workload (BASELINES.md): the paper CNN (PaperCNNParams defaults), 1x100x100, 300 random
uint8 images, batch 32, one epoch, lr 0.01, momentum 0.9, horizontal flips; DP-SGD with
noise multiplier 1.0, max_grad_norm 1.0, Poisson sampling. Each DP-SGD epoch is timed
right after a plain epoch (pytest-benchmark's setup), so plain and DP measurements
interleave and a change in machine load skews their ratio as little as possible.

Modes: Opacus' ``hooks`` and ``functorch``; ``ghost-opacus`` = Opacus' ghost clipping with
its own two-pass backward; ``ghost`` = what dp_sgd runs by default (ghost clipping with
testbed's leaner driver, see testbed/builtins/dpsgd.py). All clip every example's gradient
to C and add the same noise: the same guarantee.

Run (not collected by the normal test run):

    python -m pytest benchmarks/bench_dpsgd.py --benchmark-enable -s \
        [--benchmark-json=F]

BENCH_ROUNDS (default 3) interleaved pairs per mode, medians reported; BENCH_QUICK=1: tiny
model and data for a smoke run; BENCH_DEVICE=cuda: data and model on the GPU. Every result
carries, in extra_info, the plain and DP medians in wall-clock and in process CPU seconds;
on a shared CPU machine the CPU-time ratio is the steadier one. Ratios print at the end
with -s.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from testbed.builtins.dpsgd import DPSGD, DPSGDParams
from testbed.builtins.models import PaperCNNParams, build_paper_cnn
from testbed.local_training import ClientData, LocalConfig, local_sgd, seeded
from testbed.scenario import Augment
from testbed.state import RoundContext

QUICK = os.environ.get("BENCH_QUICK", "").lower() in ("1", "true", "yes")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "1" if QUICK else "3"))
N_IMAGES, SIZE = (64, 16) if QUICK else (300, 100)
PARAMS = (
    PaperCNNParams(conv_channels=(8, 8, 16, 16, 32, 32), fc_units=(64, 32, 32, 16))
    if QUICK
    else PaperCNNParams()
)
CFG = LocalConfig(
    epochs=1, batch_size=32, lr=0.01, momentum=0.9, weight_decay=0.0, augment=Augment()
)
MODES = ("hooks", "functorch", "ghost-opacus", "ghost")
SEED = 0
DEVICE = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))

RESULTS: dict[str, dict[str, float]] = {}


def _data() -> tuple[ClientData, torch.nn.Module]:
    g = torch.Generator().manual_seed(SEED)
    x = torch.randint(0, 256, (N_IMAGES, 1, SIZE, SIZE), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 2, (N_IMAGES,), generator=g)
    x, y = x.to(DEVICE), y.to(DEVICE)
    torch.manual_seed(SEED)
    model = build_paper_cnn(PARAMS, 1, SIZE, 2, [0.5], [0.25]).to(DEVICE)
    return ClientData(0, x, y, x[:8], y[:8]), model


@pytest.fixture(scope="module")
def workload() -> Iterator[tuple[ClientData, torch.nn.Module]]:
    data, model = _data()
    # Warm-up (thread pool, allocator, kernels for these shapes), not charged to anyone.
    _plain_epoch(data, model)()
    _dp_epoch(data, model, "ghost")()
    yield data, model
    if RESULTS:
        print(f"\nDP-SGD / plain, one local epoch on {DEVICE}, medians of {ROUNDS} pairs")
        print(f"load average at the end: {os.getloadavg()}")
        for mode, r in RESULTS.items():
            print(
                f"{mode:>13}: wall {r['plain_wall_s']:.2f} s -> {r['dp_wall_s']:.2f} s "
                f"(x{r['ratio_wall']:.2f}); CPU {r['plain_cpu_s']:.2f} s -> "
                f"{r['dp_cpu_s']:.2f} s (x{r['ratio_cpu']:.2f})"
            )


def _plain_epoch(data: ClientData, model: torch.nn.Module) -> Callable[[], float]:
    """testbed.local_training.client_step's default path."""

    def run() -> float:
        m = copy.deepcopy(model)
        m.train()
        with seeded(SEED, DEVICE):
            return local_sgd(m, data, CFG, torch.Generator().manual_seed(SEED))

    return run


def _dp_epoch(data: ClientData, model: torch.nn.Module, mode: str) -> Callable[[], float]:
    """The dp_sgd mechanism's testbed_local_training, as the engine calls it."""
    opacus_ghost = mode == "ghost-opacus"
    params = DPSGDParams(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="ghost" if opacus_ghost else mode,  # type: ignore[arg-type]
    )
    ctx = RoundContext(seed=SEED, round=1, rounds=1, n_clients=1, sampled=(0,), weights={0: 1})

    def run() -> float:
        mech = DPSGD(params)
        mech.lean_ghost = not opacus_ghost
        m = copy.deepcopy(model)
        m.train()
        with seeded(SEED, DEVICE):
            return mech.testbed_local_training(
                ctx=ctx, model=m, data=data, cfg=CFG, generator=torch.Generator().manual_seed(1)
            )

    return run


@pytest.mark.parametrize("mode", MODES)
def test_dpsgd_epoch(benchmark, workload, mode):
    data, model = workload
    plain, dp = _plain_epoch(data, model), _dp_epoch(data, model, mode)
    plain_wall: list[float] = []
    plain_cpu: list[float] = []
    dp_wall: list[float] = []
    dp_cpu: list[float] = []

    def setup() -> None:  # untimed by pytest-benchmark: the plain epoch just before
        t, c = time.perf_counter(), time.process_time()
        plain()
        plain_wall.append(time.perf_counter() - t)
        plain_cpu.append(time.process_time() - c)

    def target() -> float:
        t, c = time.perf_counter(), time.process_time()
        loss = dp()
        dp_wall.append(time.perf_counter() - t)
        dp_cpu.append(time.process_time() - c)
        return loss

    loss = benchmark.pedantic(target, setup=setup, rounds=ROUNDS, iterations=1)
    assert loss == loss  # not NaN: the client trained
    r = {
        "plain_wall_s": statistics.median(plain_wall),
        "dp_wall_s": statistics.median(dp_wall),
        "plain_cpu_s": statistics.median(plain_cpu),
        "dp_cpu_s": statistics.median(dp_cpu),
    }
    r["ratio_wall"] = r["dp_wall_s"] / r["plain_wall_s"]
    r["ratio_cpu"] = r["dp_cpu_s"] / r["plain_cpu_s"]
    benchmark.extra_info.update(
        r,
        plain_wall_all=plain_wall,
        plain_cpu_all=plain_cpu,
        dp_wall_all=dp_wall,
        dp_cpu_all=dp_cpu,
        loadavg=os.getloadavg(),
    )
    RESULTS[mode] = r
