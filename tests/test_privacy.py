"""Client sampling that matches its accounting (issue 11): Poisson sampling, central DP
accounted with amplification under it and without under fixed-size sampling."""

import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from pydantic import ValidationError

from testbed.builtins.server_defences import CentralDP, CentralDPParams
from testbed.federation import FederationState, round_context, sample_clients
from testbed.local_training import ClientData
from testbed.privacy import cumulative_mu, fixed_denominator, gaussian_delta, gaussian_epsilon
from testbed.scenario import Federation
from testbed.state import Aggregate, RoundContext


def test_poisson_sampling_draws_each_client_with_rate_q_and_allows_empty_rounds():
    draws = [
        sample_clients(seed=1, rnd=r, n_clients=4, m=1, sampling="poisson") for r in range(1, 2001)
    ]
    sizes = [len(s) for s in draws]
    assert sum(sizes) / len(sizes) == pytest.approx(1.0, abs=0.1)  # E = q N = m
    assert 0 in sizes and max(sizes) >= 3  # sizes vary, empty rounds happen
    assert draws[0] == sample_clients(seed=1, rnd=1, n_clients=4, m=1, sampling="poisson")
    fixed = [sample_clients(seed=1, rnd=r, n_clients=4, m=2) for r in range(1, 50)]
    assert {len(s) for s in fixed} == {2}
    with pytest.raises(ValueError, match="client sampling"):
        sample_clients(seed=1, rnd=1, n_clients=4, m=2, sampling="shuffle")


def test_round_context_carries_sampling_rate_and_sizes_and_survives_an_empty_round():
    x = torch.zeros(0, 1, 2, 2, dtype=torch.uint8)
    clients = [
        ClientData(c, x, torch.zeros(n, dtype=torch.long), x, x[:0, 0, 0, 0])
        for c, n in enumerate((3, 5))
    ]
    state = FederationState(0, torch.zeros(1), {})
    rounds = [
        round_context(
            FederationState(r, torch.zeros(1), {}),
            clients,
            seed=0,
            rounds=99,
            m=1,
            sampling="poisson",
        )
        for r in range(40)
    ]
    assert any(not c.sampled for c in rounds)
    empty = next(c for c in rounds if not c.sampled)
    assert empty.weights == {} and empty.client_sampling == "poisson"
    ctx = round_context(state, clients, seed=0, rounds=1, m=1)
    assert ctx.client_sampling == "fixed" and ctx.sample_rate == 0.5
    assert ctx.client_sizes == (3, 5) and len(ctx.sampled) == 1


def test_federation_field_validates():
    assert Federation().client_sampling == "fixed"
    assert Federation(client_sampling="poisson").client_sampling == "poisson"
    with pytest.raises(ValidationError):
        Federation(client_sampling="random")


def poisson_ctx(rnd: int, sampled: tuple[int, ...]) -> RoundContext:
    sizes = (10, 10, 20, 40)
    total = sum(sizes[c] for c in sampled)
    return RoundContext(
        seed=0, round=rnd, rounds=10, n_clients=4, sampled=sampled,
        weights={c: sizes[c] / total for c in sampled},
        client_sampling="poisson", sample_rate=0.5, client_sizes=sizes,
    )  # fmt: skip


def test_central_dp_under_poisson_equals_opacus_stepped_by_hand():
    dp = CentralDP(CentralDPParams(clip_norm=1.0, noise_multiplier=1.1, delta=1e-5))
    samples = [(0, 3), (), (1,), (0, 1, 2, 3), (2,)]  # an empty round still adds noise
    for r, s in enumerate(samples, start=1):
        dp.testbed_after_aggregation(
            ctx=poisson_ctx(r, s), aggregate=Aggregate(torch.zeros(2), list(s))
        )
    acc = RDPAccountant()
    for _ in samples:
        acc.step(noise_multiplier=1.1, sample_rate=0.5)
    spent = dp.testbed_privacy_spent()
    assert spent["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert spent["sampling"].startswith("poisson, q = 0.5 (amplification")
    # fixed std z * C * max n / (q W): 1.1 * 40 / (0.5 * 80)
    assert dp.noise_std == pytest.approx(1.1)


def test_central_dp_poisson_uses_the_fixed_denominator_estimator():
    # clients 0 and 3 sampled (sizes 10 and 40 of W = 80, q = 1/2): the mean the aggregator
    # made, (10 u0 + 40 u3) / 50, becomes (10 u0 + 40 u3) / (q W) = that * 50 / 40
    dp = CentralDP(CentralDPParams(clip_norm=1.0, noise_multiplier=0.0))
    a = Aggregate(torch.tensor([1.0, -2.0]), [0, 3])
    dp.testbed_after_aggregation(ctx=poisson_ctx(1, (0, 3)), aggregate=a)
    assert torch.allclose(a.delta, torch.tensor([1.25, -2.5]))
    assert fixed_denominator((10, 10, 20, 40), 0.5, [0, 3]) == (1.25, 1.0)


def test_central_dp_fixed_sampling_claims_no_amplification():
    dp = CentralDP(CentralDPParams(clip_norm=1.0, noise_multiplier=1.1))
    fixed = RoundContext(0, 1, 1, 8, (0, 1), {0: 0.5, 1: 0.5}, sample_rate=0.25)
    dp.testbed_after_aggregation(ctx=fixed, aggregate=Aggregate(torch.zeros(2), [0, 1]))
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.1, sample_rate=1.0)
    spent = dp.testbed_privacy_spent()
    assert spent["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert "no amplification" in spent["sampling"]


def test_cumulative_mu_hand_computed():
    # contributions 1, 0, 2 under stds 1, 2, 4: running sums 1, 1, 3 -> 1 + 1/4 + 9/16
    assert cumulative_mu([1, 0, 2], [1, 2, 4]) == pytest.approx(math.sqrt(1 + 0.25 + 0.5625))
    assert cumulative_mu([0, 1], [0, 1]) == 1.0  # no noise needed before any contribution
    assert math.isinf(cumulative_mu([1, 0], [1, 0]))


def test_gaussian_epsilon_inverts_gaussian_delta():
    for mu in (0.3, 1.0, 7.0):
        e = gaussian_epsilon(mu, 1e-5)
        assert gaussian_delta(mu, e) == pytest.approx(1e-5, rel=1e-4)
    # mu = 1 at delta = 1e-5: one Gaussian with z = 1 (cross-checked with Opacus' PRV)
    from opacus.accountants import PRVAccountant

    prv = PRVAccountant()
    prv.step(noise_multiplier=1.0, sample_rate=1.0)
    assert gaussian_epsilon(1.0, 1e-5) == pytest.approx(prv.get_epsilon(delta=1e-5), rel=0.02)


def test_report_notes_state_viewpoints_sampling_and_a_broken_audit():
    from testbed.privacy import report_notes

    spent = {
        "note": "n", "level": "client", "against": "x", "sampling": "fixed",
        "epsilon_by_viewpoint": {"server": "inf", "one recipient": 3.0},  # as in metrics.json
        "audit": {"claimed_epsilon": 1.0, "lower_bound": 2.0, "confidence": 0.95,
                  "verdict": "BROKEN: audited lower bound above the claimed epsilon"},
    }  # fmt: skip
    lines = report_notes(spent)
    assert lines[0] == "n" and "holds against: x" in lines[1] and "sampling: fixed" in lines[1]
    assert "server inf" in lines[2] and "one recipient 3" in lines[2]
    assert "lower bound 2" in lines[3] and "BROKEN" in lines[3]
