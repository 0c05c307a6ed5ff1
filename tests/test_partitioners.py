"""Partitioners: disjoint and complete, seeded, and skewed as much as each one claims."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from testbed.builtins.partitioners import (
    DirichletParams,
    NonIIDChunksParams,
    PartitionFn,
    build_dirichlet,
    build_iid,
    build_noniid_chunks,
    split_train_test,
)
from testbed.pluginmanager import build_host
from testbed.registry import NoParams
from testbed.state import generator

LABELS = torch.tensor([0] * 500 + [1] * 937)[torch.randperm(1437, generator=generator("lab"))]

PARTITIONERS: dict[str, PartitionFn] = {
    "noniid_chunks": build_noniid_chunks(NonIIDChunksParams()),
    "noniid_order": build_noniid_chunks(NonIIDChunksParams(sort_by="order")),
    "iid": build_iid(NoParams()),
    "dirichlet": build_dirichlet(DirichletParams(alpha=0.5)),
}


def _assert_partition(parts: list[torch.Tensor], n: int, n_clients: int) -> None:
    assert len(parts) == n_clients
    for p in parts:
        assert p.dtype == torch.int64 and p.ndim == 1 and p.numel() > 0
        assert torch.equal(p, p.sort().values)
    everything = torch.cat(parts)
    assert everything.numel() == n, "overlap or loss"
    assert torch.equal(everything.sort().values, torch.arange(n))


def _skew(labels: torch.Tensor, parts: list[torch.Tensor]) -> float:
    """Mean total-variation distance of each client's label mix from the global one."""
    k = int(labels.max()) + 1
    glob = torch.bincount(labels, minlength=k).float() / labels.numel()
    dists = []
    for p in parts:
        local = torch.bincount(labels[p], minlength=k).float() / p.numel()
        dists.append(0.5 * (local - glob).abs().sum())
    return float(torch.stack(dists).mean())


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
@pytest.mark.parametrize("n_clients", [1, 3, 10])
def test_disjoint_and_complete(name: str, n_clients: int) -> None:
    parts = PARTITIONERS[name](LABELS, n_clients, generator("p", name))
    _assert_partition(parts, LABELS.numel(), n_clients)


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_seeded(name: str) -> None:
    fn = PARTITIONERS[name]
    a = fn(LABELS, 4, generator(1))
    b = fn(LABELS, 4, generator(1))
    c = fn(LABELS, 4, generator(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_sizes_near_equal() -> None:
    parts = PARTITIONERS["iid"](LABELS, 4, generator(0))
    sizes = [p.numel() for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_noniid_chunks_sizes_near_equal() -> None:
    parts = build_noniid_chunks(NonIIDChunksParams(chunks_per_client=3))(LABELS, 3, generator(0))
    sizes = [p.numel() for p in parts]
    assert max(sizes) - min(sizes) <= 3  # chunks differ by at most one sample each


def test_noniid_chunks_skews_labels_more_than_iid() -> None:
    chunks = build_noniid_chunks(NonIIDChunksParams(chunks_per_client=2))
    iid = PARTITIONERS["iid"]
    skew_chunks = sum(_skew(LABELS, chunks(LABELS, 5, generator(s))) for s in range(5)) / 5
    skew_iid = sum(_skew(LABELS, iid(LABELS, 5, generator(s))) for s in range(5)) / 5
    assert skew_iid < 0.05
    assert skew_chunks > skew_iid + 0.15


def test_noniid_order_keeps_dataset_order_within_chunks() -> None:
    labels = torch.zeros(20, dtype=torch.int64)
    fn = build_noniid_chunks(NonIIDChunksParams(chunks_per_client=1, sort_by="order"))
    parts = fn(labels, 4, generator(0))
    assert sorted(p.tolist() for p in parts) == [list(range(i, i + 5)) for i in range(0, 20, 5)]


def test_dirichlet_small_alpha_skews_more() -> None:
    small = build_dirichlet(DirichletParams(alpha=0.1))
    large = build_dirichlet(DirichletParams(alpha=100.0))
    skew_small = sum(_skew(LABELS, small(LABELS, 5, generator(s))) for s in range(5)) / 5
    skew_large = sum(_skew(LABELS, large(LABELS, 5, generator(s))) for s in range(5)) / 5
    assert skew_small > skew_large + 0.15


def test_dirichlet_min_per_client_and_give_up() -> None:
    fn = build_dirichlet(DirichletParams(alpha=0.3, min_per_client=20))
    parts = fn(LABELS, 6, generator(0))
    assert min(p.numel() for p in parts) >= 20
    impossible = build_dirichlet(DirichletParams(alpha=0.01, min_per_client=140, max_tries=5))
    with pytest.raises(ValueError, match="no draw in 5 tries"):
        impossible(LABELS, 10, generator(0))
    with pytest.raises(ValueError, match="exceeds"):
        fn(LABELS[:50], 6, generator(0))


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_more_clients_than_samples(name: str) -> None:
    with pytest.raises(ValueError, match="only 3 samples"):
        PARTITIONERS[name](LABELS[:3], 4, generator(0))


def test_too_many_chunks() -> None:
    fn = build_noniid_chunks(NonIIDChunksParams(chunks_per_client=5))
    with pytest.raises(ValueError, match="lower chunks_per_client"):
        fn(LABELS[:12], 3, generator(0))


def test_params_validation() -> None:
    with pytest.raises(ValidationError):
        DirichletParams(alpha=0)
    with pytest.raises(ValidationError):
        DirichletParams.model_validate({})
    with pytest.raises(ValidationError):
        NonIIDChunksParams(chunks_per_client=0)
    with pytest.raises(ValidationError):
        NonIIDChunksParams(sort_by="random")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# split_train_test
# --------------------------------------------------------------------------------------


def test_split_train_test_stratified_fractions() -> None:
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 5)
    indices = torch.arange(35)
    train, test = split_train_test(indices, labels, 0.6, generator(0))
    assert torch.bincount(labels[train], minlength=3).tolist() == [6, 12, 3]
    assert torch.bincount(labels[test], minlength=3).tolist() == [4, 8, 2]
    assert torch.equal(train, train.sort().values) and torch.equal(test, test.sort().values)
    assert torch.equal(torch.cat([train, test]).sort().values, indices)


def test_split_train_test_indexes_the_whole_dataset() -> None:
    labels = torch.tensor([0, 1] * 10)
    client = torch.tensor([1, 3, 5, 7, 4, 6])  # four of class 1, two of class 0
    train, test = split_train_test(client, labels, 0.5, generator(0))
    assert set(train.tolist()) | set(test.tolist()) == set(client.tolist())
    assert torch.bincount(labels[train], minlength=2).tolist() == [1, 2]


def test_split_train_test_seeded() -> None:
    labels = torch.tensor([0] * 10 + [1] * 10)
    idx = torch.arange(20)
    a = split_train_test(idx, labels, 0.62, generator(0))
    b = split_train_test(idx, labels, 0.62, generator(0))
    c = split_train_test(idx, labels, 0.62, generator(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("fraction", [0.9, 0.1])
def test_split_train_test_tiny_clients_get_both_sides(fraction: float) -> None:
    labels = torch.tensor([0, 1, 1])
    for idx in (torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0, 1, 2])):
        train, test = split_train_test(idx, labels, fraction, generator(0))
        assert train.numel() >= 1 and test.numel() >= 1
        assert train.numel() + test.numel() == idx.numel()
    train, test = split_train_test(torch.tensor([2]), labels, fraction, generator(0))
    assert train.numel() + test.numel() == 1


def test_split_train_test_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="train_fraction"):
        split_train_test(torch.arange(4), torch.zeros(4, dtype=torch.int64), 1.0, generator(0))


def test_registered_through_the_plugin_system() -> None:
    host = build_host(autoload=False)
    assert {"noniid_chunks", "iid", "dirichlet"} <= set(host.registry["partitioners"].names())
    fn = host.registry.build("partitioners", "dirichlet", {"alpha": 1.0})
    _assert_partition(fn(LABELS, 3, generator(0)), LABELS.numel(), 3)


def test_partition_problem_on_hand_made_splits():
    from testbed.assemble import partition_problem

    t = torch.tensor
    assert partition_problem([t([0, 3]), t([1, 2, 4])], 2, 5) is None
    assert partition_problem([t([0, 3]), t([1, 2, 3, 4])], 2, 5) == (
        "gave an image to two clients, or twice to one"
    )
    assert partition_problem([t([0, 0, 3]), t([1, 2, 4])], 2, 5).startswith("gave an image")
    assert partition_problem([t([0, 3]), t([1, 2])], 2, 5) == "left 1 of 5 images to no client"
    assert partition_problem([t([0, 3]), t([1, 2, 5])], 2, 5) == "returned indices outside 0..4"
    assert partition_problem([t([0, 1, 2, 3, 4])], 2, 5) == "returned 1 parts for 2 clients"
    assert "not a 1-D tensor" in partition_problem([t([0.0, 3.0]), t([1, 2, 4])], 2, 5)
    assert "not a 1-D tensor" in partition_problem([[0, 3], t([1, 2, 4])], 2, 5)


@pytest.mark.parametrize(
    ("name", "params"), [("iid", {}), ("noniid_chunks", {}), ("dirichlet", {"alpha": 0.3})]
)
def test_every_built_in_partitioner_is_a_partition(name, params):
    from testbed.assemble import partition_problem

    labels = torch.arange(97) % 3
    fn = build_host(autoload=False).registry.build("partitioners", name, params)
    for n in (2, 3, 5):
        assert partition_problem(fn(labels, n, generator(0, "p")), n, len(labels)) is None
