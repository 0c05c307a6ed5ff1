"""Server-side norm bounding and central DP, on tiny hand-computed updates."""

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from testbed.builtins.dp import PaperDP, PaperDPParams
from testbed.builtins.server_defences import (
    CentralDP,
    CentralDPParams,
    NormBound,
    NormBoundParams,
)
from testbed.federation import server_step
from testbed.pluginmanager import build_host
from testbed.state import Aggregate, ClientUpdate, RoundContext


def ctx(rnd: int = 1, sampled=(0, 1, 2, 3), n_clients: int = 8, weights=None) -> RoundContext:
    return RoundContext(
        seed=0,
        round=rnd,
        rounds=10,
        n_clients=n_clients,
        sampled=tuple(sampled),
        weights=weights or {c: 1 / len(sampled) for c in sampled},
    )


def three_updates() -> list[ClientUpdate]:
    return [
        ClientUpdate(0, torch.tensor([3.0, 4.0, 0, 0]), n_train=10, loss=0.0),  # norm 5
        ClientUpdate(1, torch.tensor([0.3, 0.4, 0, 0]), n_train=10, loss=0.0),  # norm 0.5
        ClientUpdate(2, torch.tensor([0.0, 0, 6, 8]), n_train=10, loss=0.0, dropped="x"),
    ]


def test_norm_bound_clips_only_large_updates_and_records_it():
    # Prepare
    nb = NormBound(NormBoundParams(max_norm=1.0))
    updates = three_updates()
    # Execute
    nb.testbed_before_aggregation(ctx=ctx(), updates=updates)
    record: dict = {}
    nb.testbed_round_end(ctx=ctx(), record=record)
    # Assert: [3, 4] / 5; the small one untouched; the dropped one ignored
    assert torch.allclose(updates[0].delta, torch.tensor([0.6, 0.8, 0, 0]))
    assert torch.equal(updates[1].delta, torch.tensor([0.3, 0.4, 0, 0]))
    assert torch.equal(updates[2].delta, torch.tensor([0.0, 0, 6, 8]))
    assert updates[0].info["norm_before_bound"] == pytest.approx(5.0)
    assert updates[1].info["norm_before_bound"] == pytest.approx(0.5)
    assert "norm_before_bound" not in updates[2].info
    assert record["norm_bound"]["clipped"] == 1
    assert record["norm_bound"]["clipped_clients"] == [0]
    assert record["norm_bound"]["updates"] == 2


def test_norm_bound_without_noise_leaves_the_aggregate():
    nb = NormBound(NormBoundParams(max_norm=1.0))
    agg = Aggregate(torch.tensor([1.0, 2, 3, 4]))
    nb.testbed_after_aggregation(ctx=ctx(), aggregate=agg)
    assert torch.equal(agg.delta, torch.tensor([1.0, 2, 3, 4]))


def test_norm_bound_noise_is_seeded_and_scaled():
    nb = NormBound(NormBoundParams(max_norm=1.0, noise_std=0.5))

    def noisy(c: RoundContext) -> torch.Tensor:
        agg = Aggregate(torch.zeros(200_000))
        nb.testbed_after_aggregation(ctx=c, aggregate=agg)
        return agg.delta

    first, again, other_round = noisy(ctx(1)), noisy(ctx(1)), noisy(ctx(2))
    assert torch.equal(first, again)  # same seed and round: same noise
    assert not torch.equal(first, other_round)
    assert first.std().item() == pytest.approx(0.5, rel=0.02)


def test_central_dp_clips_on_the_server():
    dp = CentralDP(CentralDPParams(clip_norm=1.0, noise_multiplier=1.0))
    updates = three_updates()
    dp.testbed_before_aggregation(ctx=ctx(), updates=updates)
    assert torch.allclose(updates[0].delta, torch.tensor([0.6, 0.8, 0, 0]))
    assert torch.equal(updates[1].delta, torch.tensor([0.3, 0.4, 0, 0]))
    assert updates[0].info["norm_before_clip"] == pytest.approx(5.0)
    assert dp.clipped == 1


def test_central_dp_noise_std_is_z_c_over_m():
    # z = 1.5, C = 2, m = 4 sampled clients: std = 1.5 * 2 / 4 = 0.75
    dp = CentralDP(CentralDPParams(clip_norm=2.0, noise_multiplier=1.5))
    agg = Aggregate(torch.zeros(200_000), included=[0, 1, 2, 3])
    dp.testbed_after_aggregation(ctx=ctx(), aggregate=agg)
    assert dp.noise_std == pytest.approx(0.75)
    assert agg.delta.std().item() == pytest.approx(0.75, rel=0.02)
    assert agg.delta.mean().abs().item() < 0.01
    again = Aggregate(torch.zeros(200_000), included=[0, 1, 2, 3])
    CentralDP(dp.p).testbed_after_aggregation(ctx=ctx(), aggregate=again)
    assert torch.equal(agg.delta, again.delta)  # same seed and round: same noise


def test_central_dp_scales_noise_to_the_updates_actually_averaged():
    # a defence dropped two of four: the mean of two moves C / 2 per client
    dp = CentralDP(CentralDPParams(clip_norm=2.0, noise_multiplier=1.5))
    dp.testbed_after_aggregation(ctx=ctx(), aggregate=Aggregate(torch.zeros(3), included=[0, 1]))
    assert dp.noise_std == pytest.approx(1.5)


def test_central_dp_reports_effective_multiplier_for_size_weighted_fedavg():
    # weights 0.1, 0.1, 0.1, 0.7: z / (m * max p) = 1.5 / (4 * 0.7)
    w = {0: 0.1, 1: 0.1, 2: 0.1, 3: 0.7}
    dp = CentralDP(CentralDPParams(clip_norm=2.0, noise_multiplier=1.5))
    c = ctx(weights=w)
    dp.testbed_after_aggregation(ctx=c, aggregate=Aggregate(torch.zeros(3), included=[0, 1, 2, 3]))
    record: dict = {}
    dp.testbed_round_end(ctx=c, record=record)
    got = record["central_dp"]
    assert got["noise_multiplier_if_size_weighted"] == pytest.approx(1.5 / 2.8)
    assert got["noise_std"] == pytest.approx(0.75)
    assert got["epsilon"] == dp.testbed_privacy_spent()["epsilon"]


def run_rounds(z: float, rounds: int) -> CentralDP:
    dp = CentralDP(CentralDPParams(clip_norm=1.0, noise_multiplier=z, delta=1e-5))
    for r in range(rounds):
        dp.testbed_after_aggregation(
            ctx=ctx(r + 1), aggregate=Aggregate(torch.zeros(2), included=[0, 1, 2, 3])
        )
    return dp


def test_central_dp_epsilon_matches_opacus_rdp_stepped_by_hand():
    # Prepare: the same steps by hand. 4 of 8 clients sampled per round, but without
    # replacement ('fixed'): no amplification is proven for it, so sample rate 1 (this
    # test used to expect q = 4/8, the Poisson figure; see tests/test_privacy.py for it).
    acc = RDPAccountant()
    for _ in range(5):
        acc.step(noise_multiplier=1.1, sample_rate=1.0)
    # Execute
    spent = run_rounds(1.1, 5).testbed_privacy_spent()
    # Assert
    assert spent["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert spent["rounds_accounted"] == 5
    assert run_rounds(2.0, 5).testbed_privacy_spent()["epsilon"] < spent["epsilon"]
    assert math.isinf(run_rounds(0.0, 5).testbed_privacy_spent()["epsilon"])


def test_central_dp_privacy_report_has_the_paper_dp_keys():
    central = run_rounds(1.0, 2).testbed_privacy_spent()
    paper = PaperDP(PaperDPParams(clip_norm=1.0, noise_multiplier=1.0)).testbed_privacy_spent()
    # every DP mechanism says at what level, against whom and under which sampling
    shared = {"mechanism", "level", "against", "sampling", "epsilon", "epsilon_by_viewpoint"}
    assert shared <= central.keys() & paper.keys()
    assert central["mechanism"] == "central_dp" and central["level"] == "client"


def test_registered_and_run_through_the_engine_hooks():
    # Prepare: norm_bound ahead of the median, via the plugin manager like a run
    host = build_host(autoload=False)
    assert "norm_bound" in host.registry["defences"].names()
    assert "central_dp" in host.registry["dp_mechanisms"].names()
    nb = host.registry.build("defences", "norm_bound", {"max_norm": 1.0})
    median = host.registry.build("aggregators", "median", {})
    small = ClientUpdate(2, torch.tensor([0.0, 0.1, 0, 0]), n_train=10, loss=0.0)
    updates = [*three_updates()[:2], small]
    c = ctx(sampled=(0, 1, 2), n_clients=3)
    # Execute
    with host.active([nb]):
        new_global, downloads, agg = server_step(torch.zeros(4), updates, median, c, host.hook)
    # Assert: median of [0.6, 0.8], [0.3, 0.4], [0, 0.1] per coordinate
    assert torch.allclose(new_global, torch.tensor([0.3, 0.4, 0, 0]))
    assert agg.included == [0, 1, 2]
    assert torch.equal(downloads[2], new_global)
