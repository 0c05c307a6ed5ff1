"""Built-in partitioners: how a dataset is dealt out to the federation's clients.

A partitioner is ``fn(labels, n_clients, generator) -> list[Tensor]``: one sorted int64
index tensor per client, disjoint and together covering every sample. All randomness
comes from the generator passed in, so a scenario seed fixes the partition.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from testbed import hookimpl
from testbed.registry import KindRegistry, NoParams, Params

PartitionFn = Callable[[torch.Tensor, int, torch.Generator], list[torch.Tensor]]


def _check(labels: torch.Tensor, n_clients: int) -> int:
    # no partitioner name in these messages: the engine prefixes every partitioner's error
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if n_clients < 1:
        raise ValueError(f"n_clients must be at least 1, got {n_clients}")
    n = labels.numel()
    if n_clients > n:
        raise ValueError(
            f"{n_clients} clients but only {n} samples; every client needs at least one"
        )
    return n


def _finish(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.to(torch.int64).sort().values for p in parts]


def _label_order(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices sorted by label, ties in random order (so chunks are not file-order biased)."""
    perm = torch.randperm(labels.numel(), generator=generator)
    return perm[torch.argsort(labels[perm], stable=True)]


# --------------------------------------------------------------------------------------
# Non-IID chunks (the paper)
# --------------------------------------------------------------------------------------


class NonIIDChunksParams(Params):
    chunks_per_client: int = Field(
        5, ge=1, description="Contiguous chunks each client draws (fewer: more label skew)."
    )
    sort_by: Literal["label", "order"] = Field(
        "label",
        description="label: chunks cut from label-sorted data (skewed); order: dataset order.",
    )


def build_noniid_chunks(params: NonIIDChunksParams) -> PartitionFn:
    """The paper's split: non-overlapping chunks of sorted data, a few per client."""

    def partition(
        labels: torch.Tensor, n_clients: int, generator: torch.Generator
    ) -> list[torch.Tensor]:
        n = _check(labels, n_clients)
        n_chunks = n_clients * params.chunks_per_client
        if n_chunks > n:
            raise ValueError(
                f"{n_clients} clients x "
                f"{params.chunks_per_client} chunks = {n_chunks} chunks, more than the "
                f"{n} samples; lower chunks_per_client"
            )
        by_label = params.sort_by == "label"
        order = _label_order(labels, generator) if by_label else torch.arange(n)
        chunks = torch.tensor_split(order, n_chunks)
        deal = torch.randperm(n_chunks, generator=generator)
        k = params.chunks_per_client
        return _finish(
            [
                torch.cat([chunks[int(c)] for c in deal[i * k : (i + 1) * k]])
                for i in range(n_clients)
            ]
        )

    return partition


# --------------------------------------------------------------------------------------
# IID
# --------------------------------------------------------------------------------------


def build_iid(params: NoParams) -> PartitionFn:
    """A random permutation cut into near-equal parts (sizes differ by at most one)."""

    def partition(
        labels: torch.Tensor, n_clients: int, generator: torch.Generator
    ) -> list[torch.Tensor]:
        n = _check(labels, n_clients)
        perm = torch.randperm(n, generator=generator)
        return _finish(list(torch.tensor_split(perm, n_clients)))

    return partition


# --------------------------------------------------------------------------------------
# Dirichlet label skew (Hsu et al. 2019)
# --------------------------------------------------------------------------------------


class DirichletParams(Params):
    alpha: float = Field(
        gt=0, description="Concentration: small (0.1) gives strong label skew, large is IID-like."
    )
    min_per_client: int = Field(
        2, ge=0, description="Redraw until every client holds at least this many samples."
    )
    max_tries: int = Field(
        1000, ge=1, description="Redraws allowed before giving up with an error."
    )


def build_dirichlet(params: DirichletParams) -> PartitionFn:
    """Per class, client shares drawn from Dirichlet(alpha); redrawn until none is too small."""

    def partition(
        labels: torch.Tensor, n_clients: int, generator: torch.Generator
    ) -> list[torch.Tensor]:
        n = _check(labels, n_clients)
        if n_clients * params.min_per_client > n:
            raise ValueError(
                f"{n_clients} clients x min_per_client="
                f"{params.min_per_client} exceeds the {n} samples"
            )
        # torch.distributions takes no generator, so numpy draws, seeded from the torch
        # generator to keep the scenario seed in charge.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        rng = np.random.default_rng(seed)
        y = labels.cpu().numpy()
        classes = np.unique(y)
        for _ in range(params.max_tries):
            parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
            for c in classes:
                members = rng.permutation(np.flatnonzero(y == c))
                shares = rng.dirichlet(np.full(n_clients, params.alpha))
                cuts = np.floor(np.cumsum(shares)[:-1] * members.size).astype(np.int64)
                for client, piece in enumerate(np.split(members, cuts)):
                    parts[client].append(piece)
            sizes = [sum(p.size for p in ps) for ps in parts]
            if min(sizes) >= max(params.min_per_client, 1):
                return _finish(
                    [torch.from_numpy(np.concatenate(ps).astype(np.int64)) for ps in parts]
                )
        raise ValueError(
            f"no draw in {params.max_tries} tries gave every one of "
            f"{n_clients} clients at least {max(params.min_per_client, 1)} of {n} samples; "
            "raise alpha, lower min_per_client or use fewer clients"
        )

    return partition


# --------------------------------------------------------------------------------------
# Per-client train/test split
# --------------------------------------------------------------------------------------


def split_train_test(
    indices: torch.Tensor,
    labels: torch.Tensor,
    train_fraction: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split one client's ``indices`` into (train, test), stratified by label.

    ``labels`` are the whole dataset's labels, indexed by ``indices``. Each class sends
    ``round(train_fraction * n_c)`` of its samples to train. A client with two or more
    samples always gets at least one test and one train sample, so it can both learn and
    be evaluated (and, as adversary, attack its own test images). Both parts are sorted.
    """
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
    indices = indices.to(torch.int64)
    if indices.numel() == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty.clone()
    own = labels[indices]
    train_parts: list[torch.Tensor] = []
    test_parts: list[torch.Tensor] = []
    for c in torch.unique(own).tolist():
        members = indices[own == c]
        members = members[torch.randperm(members.numel(), generator=generator)]
        k = round(train_fraction * members.numel())
        train_parts.append(members[:k])
        test_parts.append(members[k:])
    train = torch.cat(train_parts)
    test = torch.cat(test_parts)
    if indices.numel() >= 2:
        # Rounding per class can leave a side empty on tiny clients; move one sample over,
        # taken from the largest class on the other side so stratification suffers least.
        if test.numel() == 0:
            train, test = _move_one(train, labels, generator)
        elif train.numel() == 0:
            test, train = _move_one(test, labels, generator)
    return train.sort().values, test.sort().values


def _move_one(
    source: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(source without one sample, that sample): a random member of the largest class."""
    own = labels[source]
    classes, counts = torch.unique(own, return_counts=True)
    biggest = classes[int(torch.argmax(counts))]
    candidates = torch.nonzero(own == biggest).flatten()
    pick = int(candidates[torch.randint(candidates.numel(), (1,), generator=generator)])
    keep = torch.ones(source.numel(), dtype=torch.bool)
    keep[pick] = False
    return source[keep], source[pick : pick + 1]


@hookimpl
def testbed_register_partitioners(registry: KindRegistry) -> None:
    registry.add(
        "noniid_chunks",
        build_noniid_chunks,
        params=NonIIDChunksParams,
        description="Paper: label-sorted data cut into chunks, chunks_per_client to each client",
    )
    registry.add(
        "iid",
        build_iid,
        description="Random permutation split into near-equal parts",
    )
    registry.add(
        "dirichlet",
        build_dirichlet,
        params=DirichletParams,
        description="Per-class client shares ~ Dirichlet(alpha) (Hsu et al. 2019)",
    )
