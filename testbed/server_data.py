"""The server's own clean data, for aggregators that need it (FLTrust's root set).

An aggregator object asks for it by declaring ``root_set = RootSet(size, ...)``. The
engine then

1. carves that many examples from the dataset before it is partitioned
   (``carve_root_set``, seeded by the run's seed), so that no client holds them:
   ``make_clients`` deals out only the rest;
2. builds a ``ServerData`` (the root set, a private copy of the model, the training
   settings), recorded per seed in metrics.json under ``server.root_set``;
3. calls the aggregator's ``aggregate(updates, sizes, ctx, clients, server=...)`` with a
   ``ServerRound``: the round's global model and ``update()``, which trains a copy of it
   on the root set by plain local SGD (the clients' ``local_sgd``) and returns the update.

The server's training runs no client hook (no ``testbed_local_training``,
``testbed_client_update``, ``testbed_training_inputs``): it is the server's clean
reference, not a client. Both engines run it in the server's process.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from testbed.local_training import (
    ClientData,
    LocalConfig,
    get_weights,
    local_sgd,
    seeded,
    set_weights,
)
from testbed.state import RoundContext, derive_seed, generator

SERVER_ID = -1
"""The ``client_id`` of the root set's ``ClientData``: it belongs to no client."""

SOURCE = (
    "carved from the task's dataset before partitioning, drawn from the seed; "
    "no client holds these images (neither for training nor for testing)"
)


@dataclass(frozen=True)
class RootSet:
    """What an aggregator asks the server to hold: ``size`` examples drawn
    ``"stratified"`` (each class in proportion to its share of the dataset, by largest
    remainder) or ``"random"`` (uniformly without replacement), and the server's local
    training settings on them (None: the federation's)."""

    size: int
    sampling: Literal["stratified", "random"] = "stratified"
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None

    def key(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "sampling": self.sampling,
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
        }


def root_set_of(aggregator: object) -> RootSet | None:
    """The root set an aggregator object declares, None for one that needs none."""
    spec = getattr(aggregator, "root_set", None)
    if spec is not None and not isinstance(spec, RootSet):
        raise TypeError(
            f"{type(aggregator).__qualname__}.root_set is {type(spec).__name__}, "
            "expected testbed.server_data.RootSet or None"
        )
    return spec


def carve_root_set(labels: torch.Tensor, spec: RootSet, seed: int) -> torch.Tensor:
    """The dataset indices (sorted) of the root set; ValueError when the dataset is too
    small to leave the clients anything."""
    n = int(labels.numel())
    if spec.size < 1 or spec.size >= n:
        raise ValueError(
            f"a root set of {spec.size} examples needs a dataset of more than {spec.size} "
            f"images (the clients share the rest), this one has {n}"
        )
    g = generator(seed, "root-set")
    if spec.sampling == "random":
        idx = torch.randperm(n, generator=g)[: spec.size]
    elif spec.sampling == "stratified":
        classes, counts = torch.unique(labels.cpu(), return_counts=True)
        quota = counts * spec.size // n
        remainder = counts * spec.size % n
        short = spec.size - int(quota.sum())
        # largest remainder first; ties to the lower class (stable sort)
        quota[torch.argsort(-remainder, stable=True)[:short]] += 1
        picks = []
        for c, q in zip(classes.tolist(), quota.tolist(), strict=True):
            members = torch.nonzero(labels.cpu() == c).flatten()
            picks.append(members[torch.randperm(members.numel(), generator=g)[:q]])
        idx = torch.cat(picks)
    else:
        raise ValueError(f"root set sampling {spec.sampling!r}: expected stratified or random")
    return idx.to(torch.int64).sort().values


@dataclass
class ServerData:
    """The server's root set and what it trains on it with."""

    spec: RootSet
    indices: torch.Tensor
    """Dataset indices of the root set (sorted)."""
    root: ClientData
    """The root set as training data (``client_id`` = ``SERVER_ID``, no test split)."""
    model: nn.Module
    """A private copy of the federation's model: training it never touches a client's."""
    cfg: LocalConfig
    pool: int
    """Images in the dataset before the root set was carved from it."""
    num_classes: int
    updates: int = field(default=0, init=False)
    """Server updates computed so far (one per round with something to aggregate)."""

    def update(self, global_weights: torch.Tensor, ctx: RoundContext) -> torch.Tensor:
        """Train a copy of ``global_weights`` on the root set with ``cfg`` (plain SGD,
        randomness fixed by the seed and round) and return new minus old weights."""
        set_weights(self.model, global_weights)
        self.model.train()
        g = ctx.generator("server-root")
        with seeded(derive_seed(ctx.seed, ctx.round, "dropout", "server"), global_weights.device):
            local_sgd(self.model, self.root, self.cfg, g)
        self.updates += 1
        return get_weights(self.model) - global_weights

    def at(self, global_weights: torch.Tensor, ctx: RoundContext) -> ServerRound:
        return ServerRound(self, global_weights, ctx)

    def info(self) -> dict[str, Any]:
        """What metrics.json records of the root set."""
        counts = torch.bincount(self.root.y_train.cpu(), minlength=self.num_classes)
        return {
            "size": int(self.indices.numel()),
            "sampling": self.spec.sampling,
            "label_counts": counts.tolist(),
            "pool": self.pool,
            "source": SOURCE,
            "indices": self.indices.tolist(),
            "training": {
                "epochs": self.cfg.epochs,
                "batch_size": self.cfg.batch_size,
                "lr": self.cfg.lr,
                "momentum": self.cfg.momentum,
                "weight_decay": self.cfg.weight_decay,
            },
        }


class ServerRound:
    """What an aggregator that declared a root set gets as ``server`` in one round."""

    def __init__(self, data: ServerData, global_weights: torch.Tensor, ctx: RoundContext):
        self.data = data
        self.root = data.root
        """The root set (uint8 images ``x_train``, labels ``y_train``)."""
        self.global_weights = global_weights
        """The global model the round's clients started from (flat)."""
        self._ctx = ctx
        self._update: torch.Tensor | None = None

    def update(self) -> torch.Tensor:
        """The server's own update g_0 on the root set from this round's global model
        (trained once per round; later calls return the same tensor)."""
        if self._update is None:
            self._update = self.data.update(self.global_weights, self._ctx)
        return self._update


def make_server_data(
    spec: RootSet,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    seed: int,
    model: nn.Module,
    cfg: LocalConfig,
    device: torch.device,
) -> ServerData:
    """The server's data for the root set ``spec`` of the dataset (``x``, ``y``)."""
    idx = carve_root_set(y, spec, seed)
    root = ClientData(
        SERVER_ID,
        x[idx].to(device),
        y[idx].to(device),
        x[:0].to(device),
        y[:0].to(device),
    )
    own = LocalConfig(
        spec.epochs or cfg.epochs,
        spec.batch_size or cfg.batch_size,
        spec.lr or cfg.lr,
        cfg.momentum,
        cfg.weight_decay,
        cfg.augment,
    )
    return ServerData(spec, idx, root, copy.deepcopy(model).to(device), own, len(y), num_classes)
