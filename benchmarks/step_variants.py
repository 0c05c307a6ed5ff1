"""The paper CNN's training step under the settings that could bring paper_baseline on one
GPU within issue 14's 10 minutes, timed in one run so that the ratios share the machine.

    python benchmarks/step_variants.py [--device cuda] [--steps 60] [--out F.json]

On an H200 the fp32 step (batch 32, 1x100x100, 73 GFLOP forward and backward) takes
5.1 ms, about 14 TFLOP/s (docs/BENCHMARKS.md), and a stacked or concurrent step barely
helps: the convolutions themselves are slow. Variants, each from the same weights over the
same batches:

- fp32: what the engines run today, then again: the second run's drift is what the GPU's
  own nondeterminism (cuDNN's atomics) gives, the floor under every other variant's;
- cudnn.deterministic: fp32 with deterministic convolution algorithms only (GPU only),
  what bitwise-reproducible GPU runs would cost;
- cudnn.benchmark: autotuned convolution algorithms (GPU only);
- channels_last: NHWC tensors, the layout tensor-core convolutions want;
- bf16 autocast: convolutions and matmuls in bfloat16 (changes the numbers);
- all three together;
- CUDA graph: the fp32 step captured once and replayed (GPU only).

Each line gives ms per step, the ratio to fp32, and how far the weights end from fp32's
after the same steps (max |difference|), so a faster variant's numerical cost is read
beside its speed. A variant that fails says why and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from testbed.builtins.dataset_synthetic import SyntheticParams, load_synthetic
from testbed.builtins.models import PaperCNNParams, build_paper_cnn

BATCH, SHAPE = 32, (1, 100, 100)


def _model(device: torch.device, channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    m = build_paper_cnn(PaperCNNParams(dropout=0.0), 1, SHAPE[1], 2, [0.5], [0.25]).to(device)
    return m.to(memory_format=torch.channels_last) if channels_last else m


def _batches(device: torch.device, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The generated lesion images (uniform noise makes this unnormalised CNN diverge, and
    then any two variants end arbitrarily far apart)."""
    ds = load_synthetic(SyntheticParams(n_samples=n * BATCH, image_size=SHAPE[1], seed=1))
    x = ds.x.to(device).float().div(255).view(n, BATCH, *SHAPE)
    y = ds.y.to(device).view(n, BATCH)
    return list(zip(x.unbind(0), y.unbind(0), strict=True))


def _weights(model: nn.Module) -> torch.Tensor:
    # reshape, not parameters_to_vector's view: channels-last weights are not contiguous
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eager(device: torch.device, batches, *, bench=False, cl=False, bf16=False, det=False):
    """ms per step over ``batches`` after one warm-up step, and the final weights."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bench
        torch.backends.cudnn.deterministic = det
    model = _model(device, cl)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(*batches[0])
    _sync(device)
    t0 = time.perf_counter()
    for x, y in batches[1:]:
        step(x, y)
    _sync(device)
    torch.backends.cudnn.benchmark = torch.backends.cudnn.deterministic = False
    return 1e3 * (time.perf_counter() - t0) / (len(batches) - 1), _weights(model)


def graphed(device: torch.device, batches):
    """The fp32 step captured as one CUDA graph (torch.cuda.graphs' whole-network recipe)."""
    model = _model(device, False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()

    def step() -> None:
        loss = nn.functional.cross_entropy(model(static_x), static_y)
        loss.backward()
        opt.step()

    # warm-up on a side stream (momentum buffers made), as the recipe asks; it is the
    # first batch's step, so the replays below continue from the same state as eager's
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        opt.zero_grad(set_to_none=False)
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    # the capture records the step without running it
    with torch.cuda.graph(graph):
        opt.zero_grad(set_to_none=False)
        step()
    _sync(device)
    t0 = time.perf_counter()
    for x, y in batches[1:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    _sync(device)
    return 1e3 * (time.perf_counter() - t0) / (len(batches) - 1), _weights(model)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    batches = _batches(device, args.steps + 1)
    gpu = device.type == "cuda"
    variants: dict[str, Callable[[], tuple[float, torch.Tensor]]] = {
        "fp32": lambda: eager(device, batches),
        "fp32 again": lambda: eager(device, batches),
        "cudnn.deterministic": lambda: eager(device, batches, det=True),
        "cudnn.benchmark": lambda: eager(device, batches, bench=True),
        "channels_last": lambda: eager(device, batches, cl=True),
        "bf16 autocast": lambda: eager(device, batches, bf16=True),
        "all three": lambda: eager(device, batches, bench=True, cl=True, bf16=True),
        "CUDA graph": lambda: graphed(device, batches),
    }
    if not gpu:
        for name in ("cudnn.deterministic", "cudnn.benchmark", "all three", "CUDA graph"):
            variants.pop(name)
    start = _weights(_model(device, False))
    rows, base = [], None
    print(f"{device} ({torch.cuda.get_device_name(device) if gpu else 'CPU'}), torch "
          f"{torch.__version__}, {args.steps} steps of batch {BATCH} x {SHAPE}")  # fmt: skip
    for name, run in variants.items():
        try:
            ms, w = run()
        except Exception as exc:  # a variant the machine cannot run is a row, not a stop
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
            print(f"{name:16s} failed: {rows[-1]['error']}")
            continue
        if base is None:
            base = (ms, w)
            moved = float((w - start).abs().max())
            print(f"(fp32's weights move by at most {moved:.2e} over these steps)")
        dev = float((w - base[1]).abs().max())
        rows.append({"variant": name, "ms_per_step": ms, "ratio": ms / base[0], "max_dw": dev})
        print(f"{name:16s} {ms:8.2f} ms/step  x{ms / base[0]:.2f}  max|w - w_fp32| {dev:.2e}")
    if args.out:
        args.out.write_text(json.dumps({"device": str(device), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
