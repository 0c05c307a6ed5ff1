import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from scipy.stats import norm

from testbed.builtins.dp import PaperDP, PaperDPParams
from testbed.privacy import gaussian_epsilon
from testbed.state import Aggregate, Broadcast, ClientUpdate, RoundContext


def ctx(rnd: int = 1, sampled=(0, 1), weights=None, n_clients: int = 2, **kw) -> RoundContext:
    return RoundContext(
        seed=0,
        round=rnd,
        rounds=10,
        n_clients=n_clients,
        sampled=tuple(sampled),
        weights=weights or {0: 0.25, 1: 0.75},
        **kw,
    )


def agg(included=(0, 1), d: int = 1) -> Aggregate:
    return Aggregate(torch.zeros(d), list(included))


def run(dp: PaperDP, rounds: int, make=ctx, included=(0, 1)) -> dict:
    for r in range(1, rounds + 1):
        dp.testbed_after_aggregation(ctx=make(r), aggregate=agg(included))
    return dp.testbed_privacy_spent()


def test_uplink_clipping_hand_computed():
    dp = PaperDP(PaperDPParams(clip_norm=1.0, noise_multiplier=0.5))
    u = ClientUpdate(0, torch.tensor([3.0, 4.0]), n_train=10, loss=0.0)
    dp.testbed_client_update(ctx=ctx(), update=u)
    assert torch.allclose(u.delta, torch.tensor([0.6, 0.8]))
    assert u.info["norm_before_clip"] == pytest.approx(5.0)


def test_downlink_noise_is_per_client_seeded_and_scaled():
    dp = PaperDP(PaperDPParams(clip_norm=1.0, noise_multiplier=2.0))
    c = ctx()
    dp.testbed_after_aggregation(ctx=c, aggregate=agg(d=3))
    # sensitivity of FedAvg to one clipped update is max_i p_i * C = 0.75
    assert dp.noise_std == pytest.approx(1.5)
    w = torch.zeros(200_000)
    got = []
    for cid in (0, 1, 0):
        b = Broadcast(cid, w.clone())
        dp.testbed_broadcast(ctx=c, broadcast=b)
        got.append(b.weights)
    assert torch.equal(got[0], got[2])  # same seed, round and client: same noise
    assert not torch.equal(got[0], got[1])  # each client receives its own model
    assert got[0].std().item() == pytest.approx(1.5, rel=0.02)
    assert got[0].mean().abs().item() < 0.02


def test_issue_example_per_download_reports_at_least_the_exact_single_pair_epsilon():
    # 2 clients of equal weight, C = 1, z = 2, 8 rounds. Round r's download carries the
    # running sum of r clipped updates of weight 1/2 under noise of std z/2: against one
    # recipient, one pair of federations is a Gaussian mechanism with
    # mu = sqrt(sum_r r^2) / z = sqrt(204) / 2. The old per-round composition said 7.08.
    dp = PaperDP(PaperDPParams(clip_norm=1.0, noise_multiplier=2.0, delta=1e-5))
    equal = lambda r: ctx(r, weights={0: 0.5, 1: 0.5})  # noqa: E731
    spent = run(dp, 8, equal)
    mu1 = math.sqrt(sum(r * r for r in range(1, 9))) / 2
    # exact epsilon of that Gaussian (Balle & Wang 2018), solved here with scipy alone
    delta_at = lambda e: norm.cdf(mu1 / 2 - e / mu1) - math.exp(e) * norm.cdf(-mu1 / 2 - e / mu1)  # noqa: E731
    exact = next(e / 100 for e in range(1, 20_000) if delta_at(e / 100) <= 1e-5)
    assert 54 < exact < 56  # the issue's "~55"
    assert spent["epsilon_one_pair_lower_bound"] == pytest.approx(exact, abs=0.011)
    assert spent["epsilon"] >= exact
    old = RDPAccountant()
    for _ in range(8):
        old.step(noise_multiplier=2.0, sample_rate=1.0)
    assert old.get_epsilon(delta=1e-5) == pytest.approx(7.08, abs=0.01)  # what was reported
    # the reported bound: both recipients' downloads, mu = sqrt(2) * mu1, via Opacus RDP
    acc = RDPAccountant()
    acc.step(noise_multiplier=1 / (math.sqrt(2) * mu1), sample_rate=1.0)
    assert spent["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert spent["level"] == "client" and spent["epsilon_by_viewpoint"]["server"] == math.inf
    assert "no amplification" in spent["sampling"]


def test_noise_after_a_dropped_upload_uses_the_kept_weights():
    # Both sampled with weight 1/2; client 0's upload is dropped, so the survivor has
    # weight 1 after renormalisation and moves the mean by C: the std must be z * C * 1.
    dp = PaperDP(PaperDPParams(clip_norm=1.0, noise_multiplier=2.0))
    dp.testbed_after_aggregation(ctx=ctx(weights={0: 0.5, 1: 0.5}), aggregate=agg((1,)))
    assert dp.noise_std == pytest.approx(2.0)
    assert dp.sensitivity == [pytest.approx(1.0)]


def test_fixed_sampling_reports_no_amplification_poisson_does():
    def eps(sampling: str, sampled=(0,)) -> float:
        dp = PaperDP(
            PaperDPParams(clip_norm=1.0, noise_multiplier=1.0, noise_placement="persistent")
        )
        make = lambda r: ctx(  # noqa: E731
            r, sampled, {0: 1.0}, n_clients=2, client_sampling=sampling, sample_rate=0.5,
            client_sizes=(10, 10),
        )  # fmt: skip
        return run(dp, 10, make, included=sampled)["epsilon"]

    by_hand = {}
    for q in (1.0, 0.5):
        acc = RDPAccountant()
        for _ in range(10):  # two recipients' fresh noises: multiplier z / sqrt(2)
            acc.step(noise_multiplier=1 / math.sqrt(2), sample_rate=q)
        by_hand[q] = acc.get_epsilon(delta=1e-5)
    assert eps("fixed") == pytest.approx(by_hand[1.0], rel=1e-9)
    assert eps("poisson") == pytest.approx(by_hand[0.5], rel=1e-9)
    assert eps("poisson", sampled=()) == pytest.approx(by_hand[0.5], rel=1e-9)  # empty rounds too
    assert by_hand[0.5] < by_hand[1.0]


def test_per_download_epsilon_grows_with_rounds_and_shrinks_with_noise():
    def eps(z: float, rounds: int) -> float:
        return run(PaperDP(PaperDPParams(clip_norm=1.0, noise_multiplier=z)), rounds)["epsilon"]

    assert eps(1.0, 10) > eps(1.0, 5) > 0
    assert eps(2.0, 10) < eps(1.0, 10)
    assert math.isinf(eps(0.0, 3))


def test_persistent_noise_is_a_random_walk_and_is_redrawn_identically_after_a_resume():
    p = PaperDPParams(clip_norm=1.0, noise_multiplier=2.0, noise_placement="persistent")
    a = PaperDP(p)
    w = torch.zeros(100_000)
    got = {}
    for r in (1, 2, 3):
        a.testbed_after_aggregation(ctx=ctx(r), aggregate=agg())
        if r == 2:
            state = a.state_dict()
        for cid in (0, 1):
            b = Broadcast(cid, w.clone())
            a.testbed_broadcast(ctx=ctx(r), broadcast=b)
            got[r, cid] = b.weights
    step = got[2, 0] - got[1, 0]  # the aggregate is zero: only the new noise
    assert step.std().item() == pytest.approx(1.5, rel=0.02)  # z * C * 0.75
    assert got[3, 0].std().item() == pytest.approx(1.5 * math.sqrt(3), rel=0.02)
    resumed = PaperDP(p)
    resumed.load_state_dict(state)
    resumed.testbed_after_aggregation(ctx=ctx(3), aggregate=agg())
    b = Broadcast(1, w.clone())
    resumed.testbed_broadcast(ctx=ctx(3), broadcast=b)
    assert torch.equal(b.weights, got[3, 1])
    assert resumed.epsilon() == a.epsilon()


def test_gaussian_epsilon_is_monotone_and_zero_without_signal():
    assert gaussian_epsilon(0.0, 1e-5) == 0.0
    assert 0 < gaussian_epsilon(0.5, 1e-5) < gaussian_epsilon(1.0, 1e-5) < gaussian_epsilon(2, 1e-5)


def test_gaussian_mechanism_matches_closed_form_rdp():
    # One round, one recipient, q = 1: RDP of the Gaussian mechanism is alpha / (2 z^2);
    # Opacus converts RDP to (eps, delta) with eps = min_alpha rdp(alpha)
    # + log((alpha-1)/alpha) - (log(delta) + log(alpha)) / (alpha - 1) (Balle et al. 2020).
    z, delta = 4.0, 1e-5
    dp = PaperDP(PaperDPParams(clip_norm=1.0, noise_multiplier=z, delta=delta))
    one = ctx(sampled=(0,), weights={0: 1.0}, n_clients=1)
    dp.testbed_after_aggregation(ctx=one, aggregate=agg((0,)))
    expected = min(
        a / (2 * z * z) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        for a in RDPAccountant.DEFAULT_ALPHAS
    )
    assert dp.testbed_privacy_spent()["epsilon"] == pytest.approx(expected, rel=1e-6)
