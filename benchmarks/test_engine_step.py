"""Local training cost (issue 14): the engines' step beside a bare PyTorch loop over the
same model and data, and the batched engine beside the in-process one, in one run so the
ratios share the machine's load.

Run:  OMP_NUM_THREADS=2 pytest benchmarks/test_engine_step.py --benchmark-enable \
        --benchmark-json=F    (BENCH_QUICK=1: tiny shapes for a smoke run)

BENCH_DEVICE=cuda puts the model and the data on the GPU (each timed call ends with a
synchronisation); BENCH_CLIENT_SIZE sets the images per client (default 96, three batches;
a paper_baseline client holds about 297).

- "bare": SGD over the client's batches with nothing else (the floor).
- "inprocess": `testbed.local_training.client_step`, the in-process engine's step for one
  client (weights in, generator, hooks, local_sgd, update out).
- "captured": the same with ``capture = "cuda-graph"`` (`testbed.captured.CapturedSGD`:
  the step replayed as one CUDA graph; on CPU its eager form, which costs the copies in
  and out of the run's own model).
- "inprocess+augment", "captured+augment": both with the brain-MRI tasks' augmentation
  (a flip per image, one rotation of up to 10 degrees per batch), which runs outside the
  graph: its cost beside the step, and on a GPU its host-to-device copies.
- "stacked" vs "sequential": three clients' local training by the batched engine
  (`testbed.batched.train_stacked`) and by three `local_sgd` calls.
- "sequential" vs "stacked" with the paper CNN's dropout 0.25: the batched engine with
  ``dropout = "stacked"`` (one vmap with per-client masks) against three `local_sgd` calls.
Augmentation off but where named, and dropout 0 but in the last group, so every other
variant of a group does the same arithmetic.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch import nn
from workloads import QUICK, ROUNDS, SEED, WARMUP

from testbed.batched import train_stacked
from testbed.builtins.models import PaperCNNParams, build_paper_cnn
from testbed.captured import CapturedSGD
from testbed.local_training import (
    ClientData,
    LocalConfig,
    client_step,
    get_weights,
    local_sgd,
    set_weights,
)
from testbed.pluginmanager import build_host
from testbed.scenario import Augment
from testbed.state import RoundContext

SHAPE = (1, 16, 16) if QUICK else (1, 100, 100)
N_TRAIN = 16 if QUICK else int(os.environ.get("BENCH_CLIENT_SIZE", "96"))
DEVICE = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
CFG = LocalConfig(1, 32, 0.01, 0.9, 0.0, Augment(hflip=False))
AUGMENTED = dataclasses.replace(CFG, augment=Augment(hflip=True, rotate_degrees=10))


def _model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(SEED)
    c, size, _ = SHAPE
    model = build_paper_cnn(PaperCNNParams(dropout=dropout), c, size, 2, [0.5] * c, [0.25] * c)
    return model.to(DEVICE)


def _client(cid: int) -> ClientData:
    g = torch.Generator().manual_seed(SEED + cid)
    x = torch.randint(0, 256, (N_TRAIN, *SHAPE), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 2, (N_TRAIN,), generator=g)
    x, y = x.to(DEVICE), y.to(DEVICE)
    return ClientData(cid, x, y, x[:0], y[:0])


def _bare(model: nn.Module, data: ClientData, g: torch.Generator) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=CFG.lr, momentum=CFG.momentum)
    order = torch.randperm(data.n_train, generator=g).to(DEVICE)
    for start in range(0, data.n_train, CFG.batch_size):
        idx = order[start : start + CFG.batch_size]
        x = data.x_train[idx].float() / 255
        loss = nn.functional.cross_entropy(model(x), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _run(benchmark, fn) -> None:
    def timed() -> None:
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()  # GPU work is asynchronous: time it to the end

    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


@pytest.mark.parametrize(
    "impl", ["bare", "inprocess", "captured", "inprocess+augment", "captured+augment"]
)
def test_one_client_step(benchmark, impl):
    benchmark.group = "one client, one local epoch"
    model, data = _model(), _client(0)
    start = get_weights(model)
    hooks = build_host(autoload=False).hook
    ctx = RoundContext(
        seed=SEED, round=1, rounds=1, n_clients=1, sampled=(0,), weights={0: 1.0},
        client_sampling="fixed", sample_rate=1.0, client_sizes=(N_TRAIN,),
    )  # fmt: skip

    def bare() -> None:
        set_weights(model, start)
        _bare(model.train(), data, torch.Generator().manual_seed(SEED))

    name, _, augmented = impl.partition("+")
    cfg = AUGMENTED if augmented else CFG

    def inprocess() -> None:
        client_step(model, start, data, cfg, ctx, hooks)

    trainer = CapturedSGD(capture=DEVICE.type == "cuda")  # one per run, as the engine's

    def captured() -> None:
        client_step(model, start, data, cfg, ctx, hooks, trainer)

    _run(benchmark, {"bare": bare, "inprocess": inprocess, "captured": captured}[name])


@pytest.mark.parametrize("impl", ["sequential", "stacked"])
def test_three_clients(benchmark, impl):
    benchmark.group = "three clients, one local epoch each"
    model = _model()
    clients = [_client(c) for c in range(3)]
    start = get_weights(model)

    def sequential() -> None:
        for c, data in enumerate(clients):
            set_weights(model, start)
            local_sgd(model.train(), data, CFG, torch.Generator().manual_seed(c))

    def stacked() -> None:
        gens = [torch.Generator().manual_seed(c) for c in range(3)]
        train_stacked(model, [start] * 3, clients, CFG, gens)

    _run(benchmark, sequential if impl == "sequential" else stacked)


@pytest.mark.parametrize("impl", ["sequential", "stacked"])
def test_three_clients_with_dropout(benchmark, impl):
    benchmark.group = "three clients, one local epoch each, dropout 0.25"
    model = _model(dropout=0.25)
    clients = [_client(c) for c in range(3)]
    start = get_weights(model)

    def sequential() -> None:
        for c, data in enumerate(clients):
            set_weights(model, start)
            local_sgd(model.train(), data, CFG, torch.Generator().manual_seed(c))

    def stacked() -> None:
        gens = [torch.Generator().manual_seed(c) for c in range(3)]
        train_stacked(model, [start] * 3, clients, CFG, gens, stacked_dropout=True)

    _run(benchmark, sequential if impl == "sequential" else stacked)
