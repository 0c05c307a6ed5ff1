import math

import pytest
import torch

from testbed.builtins.dp import PaperDP, PaperDPParams
from testbed.state import Aggregate, Broadcast, ClientUpdate, RoundContext


def ctx(rnd: int = 1, sampled=(0, 1), weights=None, n_clients: int = 2) -> RoundContext:
    return RoundContext(
        seed=0,
        round=rnd,
        rounds=10,
        n_clients=n_clients,
        sampled=tuple(sampled),
        weights=weights or {0: 0.25, 1: 0.75},
    )


def test_uplink_clipping_hand_computed():
    dp = PaperDP(PaperDPParams(clip_norm=1.0, noise_multiplier=0.5))
    u = ClientUpdate(0, torch.tensor([3.0, 4.0]), n_train=10, loss=0.0)
    dp.testbed_client_update(ctx=ctx(), update=u)
    assert torch.allclose(u.delta, torch.tensor([0.6, 0.8]))
    assert u.info["norm_before_clip"] == pytest.approx(5.0)


def test_downlink_noise_is_per_client_seeded_and_scaled():
    dp = PaperDP(PaperDPParams(clip_norm=1.0, noise_multiplier=2.0))
    c = ctx()
    dp.testbed_after_aggregation(ctx=c, aggregate=Aggregate(torch.zeros(3)))
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


def test_epsilon_from_opacus_accountant_grows_with_rounds_and_shrinks_with_noise():
    def eps(z: float, rounds: int, sampled=(0, 1)) -> float:
        dp = PaperDP(PaperDPParams(clip_norm=1.0, noise_multiplier=z, delta=1e-5))
        for r in range(rounds):
            dp.testbed_after_aggregation(
                ctx=ctx(r + 1, sampled), aggregate=Aggregate(torch.zeros(1))
            )
        return dp.testbed_privacy_spent()["epsilon"]

    assert eps(1.0, 10) > eps(1.0, 5) > 0
    assert eps(2.0, 10) < eps(1.0, 10)
    assert eps(1.0, 10, sampled=(0,)) < eps(1.0, 10)  # client sampling amplifies privacy
    assert math.isinf(eps(0.0, 3))


def test_gaussian_mechanism_matches_closed_form_rdp():
    # One round, q = 1: RDP of the Gaussian mechanism is alpha / (2 z^2); Opacus converts
    # RDP to (eps, delta) with eps = min_alpha rdp(alpha) + log((alpha-1)/alpha)
    # - (log(delta) + log(alpha)) / (alpha - 1) (Balle et al. 2020).
    z, delta = 4.0, 1e-5
    dp = PaperDP(PaperDPParams(clip_norm=1.0, noise_multiplier=z, delta=delta))
    dp.testbed_after_aggregation(ctx=ctx(), aggregate=Aggregate(torch.zeros(1)))
    from opacus.accountants import RDPAccountant

    expected = min(
        a / (2 * z * z) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        for a in RDPAccountant.DEFAULT_ALPHAS
    )
    assert dp.testbed_privacy_spent()["epsilon"] == pytest.approx(expected, rel=1e-6)
