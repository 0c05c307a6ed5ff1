"""Local training with the step captured once as a CUDA graph and replayed (issue 14).

On a GPU the paper CNN's training step at batch 32 is bound by kernel launches, not by
arithmetic: replaying the fp32 step as one captured graph took 0.76x the eager step's
time on an H200 (docs/BENCHMARKS.md, `benchmarks/step_variants.py`). `CapturedSGD` is
`local_sgd` rebuilt for that: one model copy, one optimiser, one static input batch and
one loss accumulator live for the whole run, so one graph (forward, backward, SGD step,
loss sum: torch.cuda.graphs' whole-network recipe) serves every full batch of every
client and round; a short last batch runs the same step eagerly on the same tensors.

It is `local_sgd` exactly, not approximately: the same batches (`batches`), the same
cross-entropy, SGD and mean loss. A fresh optimiser's first momentum step stores the
gradient; here the buffer is zeroed per client, and 0.9 x 0 + g is g bitwise. With
``capture=False`` (how CPU tests check it) it equals `local_sgd` bitwise; captured, a GPU
run is another sample of the same arithmetic (cuDNN's own run-to-run differences, dropout
masks from the graph's philox offsets), so an engine with ``capture = "cuda-graph"`` has
its own cache entries and is not compared bitwise with eager runs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from testbed.local_training import ClientData, LocalConfig, batches, get_weights, set_weights


class CapturedSGD:
    """A `testbed.local_training.Trainer` for one run: see the module docstring."""

    def __init__(self, *, capture: bool) -> None:
        self.capture = capture
        self._model: nn.Module | None = None
        self._graph: torch.cuda.CUDAGraph | None = None

    def __call__(
        self, model: nn.Module, data: ClientData, cfg: LocalConfig, g: torch.Generator
    ) -> float:
        own = self._prepare(model, data, cfg)
        set_weights(own, get_weights(model))
        own.train(model.training)
        for state in self._opt.state.values():
            buf = state.get("momentum_buffer")
            if buf is not None:
                buf.zero_()  # in place: the graph holds these tensors
        self._loss_sum.zero_()
        seen = 0
        for x, y in batches(data, cfg, g):
            if self.capture and y.shape[0] == cfg.batch_size:
                self._x.copy_(x)
                self._y.copy_(y)
                if self._graph is None:
                    self._capture()
                else:
                    self._graph.replay()
            else:
                self._step(x, y)
            seen += y.shape[0]
        set_weights(model, get_weights(own))
        return float(self._loss_sum) / max(seen, 1)

    def _prepare(self, model: nn.Module, data: ClientData, cfg: LocalConfig) -> nn.Module:
        """The run's own model copy, optimiser and static tensors, made on the first call.
        Its own copy, so nothing the caller does to its model's tensors can leave the graph
        pointing at memory that is no longer the model's."""
        device = data.x_train.device
        if self.capture and device.type != "cuda":
            raise RuntimeError(f"a CUDA graph needs a CUDA device, the data is on {device}")
        if self._model is None:
            self._model = copy.deepcopy(model)
            self._opt = torch.optim.SGD(
                self._model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                weight_decay=cfg.weight_decay,
            )  # fmt: skip
            self._cfg = cfg
            self._x = torch.zeros((cfg.batch_size, *data.x_train.shape[1:]), device=device)
            self._y = torch.zeros(cfg.batch_size, dtype=data.y_train.dtype, device=device)
            self._loss_sum = torch.zeros((), device=device)
        elif cfg != self._cfg:
            raise RuntimeError("one CapturedSGD serves one run: its configuration changed")
        return self._model

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        assert self._model is not None
        loss = nn.functional.cross_entropy(self._model(x), y)
        # zeroed, not set to None: the graph's backward writes into these same tensors
        self._opt.zero_grad(set_to_none=False)
        loss.backward()
        self._opt.step()
        self._loss_sum.add_(loss.detach() * y.shape[0])

    def _capture(self) -> None:
        """This batch's step, run eagerly on a side stream (the recipe's warm-up: it makes
        the gradients and momentum buffers the graph will hold), then recorded, not run."""
        device = self._x.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._step(self._x, self._y)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(self._x, self._y)
        self._graph = graph
