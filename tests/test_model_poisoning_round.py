"""Model poisoning through `finish_round`: on a hand-made round of three benign updates and
one compromised client, each attack uploads what its paper says, only the compromised
client's upload changes, and the round record counts what screening dropped."""

from __future__ import annotations

import pytest
import torch

from testbed.federation import FederationState, UpdatePolicy, finish_round
from testbed.pluginmanager import build_host
from testbed.poisoning import alie, alie_z, min_max, min_sum
from testbed.poisoning_run import Threat
from testbed.robust_extra import Screening
from testbed.state import ClientUpdate, RoundContext


@pytest.fixture(scope="module")
def host():
    return build_host(autoload=False)


G = torch.tensor([1.0, 1.0, 0.0])
BENIGN = torch.tensor([[0.5, 0.0, 1.0], [1.5, -1.0, 0.0], [1.0, 1.0, 2.0]])
HONEST = torch.tensor([0.2, 0.4, -0.6])


def threat(host, name: str, params=None, collude: bool = True, malicious=(3,)) -> Threat:
    attack = host.registry.build("poisoning", name, params or {})
    return Threat(tuple(malicious), collude, [(name, attack)])


def run_round(host, threat_, deltas, aggregator=None, sizes=None, g=G):
    n = len(deltas)
    updates = [
        ClientUpdate(c, d.clone(), sizes[c] if sizes else 10, 0.0) for c, d in enumerate(deltas)
    ]
    state = FederationState(0, g.clone(), {c: g.clone() for c in range(n)})
    ctx = RoundContext(
        seed=0, round=1, rounds=1, n_clients=n, sampled=tuple(range(n)),
        weights={c: 1 / n for c in range(n)},
    )  # fmt: skip
    agg = aggregator or host.registry.build("aggregators", "fedavg", {})
    new = finish_round(state, ctx, updates, agg, host.hook, UpdatePolicy(), threat=threat_)
    return new, updates


def deltas_with_honest() -> list[torch.Tensor]:
    return [*BENIGN, HONEST]


def test_sign_flip_changes_only_the_compromised_upload(host):
    _, ups = run_round(host, threat(host, "sign_flip", collude=False), deltas_with_honest())
    assert torch.equal(ups[3].delta, -HONEST)
    for u, b in zip(ups[:3], BENIGN, strict=True):
        assert torch.equal(u.delta, b)


def test_gaussian_is_noise_of_sigma_reproducible_per_round(host):
    big = [torch.zeros(4000)] * 3 + [torch.ones(4000)]
    t = threat(host, "gaussian", {"sigma": 2.0}, collude=False)
    _, a = run_round(host, t, big, g=torch.zeros(4000))
    _, b = run_round(host, t, big, g=torch.zeros(4000))
    assert torch.equal(a[3].delta, b[3].delta)
    assert float(a[3].delta.std()) == pytest.approx(2.0, rel=0.1)
    assert all(torch.equal(u.delta, torch.zeros(4000)) for u in a[:3])


def test_scaled_replacement_puts_fedavg_at_the_attackers_target(host):
    # Benign clients that have converged (zero updates); the attacker wants X.
    x = torch.tensor([3.0, -1.0, 0.5])
    deltas = [torch.zeros(3)] * 3 + [x - G]
    new, ups = run_round(host, threat(host, "scaled_replacement", collude=False), deltas)
    assert torch.allclose(ups[3].delta, 4 * (x - G))  # boost n / eta = 4 / 1
    assert torch.allclose(new.global_weights, x)


def test_scaled_replacement_norm_bound_caps_the_upload(host):
    deltas = [torch.zeros(3)] * 3 + [torch.tensor([3.0, 4.0, 0.0])]
    t = threat(host, "scaled_replacement", {"norm_bound": 2.0}, collude=False)
    _, ups = run_round(host, t, deltas)
    assert float(torch.linalg.vector_norm(ups[3].delta)) == pytest.approx(2.0)


def test_alie_uploads_mean_minus_z_std_of_the_benign(host):
    _, ups = run_round(host, threat(host, "alie"), deltas_with_honest())
    z = alie_z(4, 1)  # n = 4 sampled, m = 1 compromised
    assert torch.allclose(ups[3].delta, alie(BENIGN, z))
    assert torch.allclose(ups[3].delta, BENIGN.mean(0) - z * BENIGN.std(0))


def test_ipm_uploads_minus_epsilon_benign_mean(host):
    _, ups = run_round(host, threat(host, "ipm", {"epsilon": 0.5}), deltas_with_honest())
    assert torch.allclose(ups[3].delta, -0.5 * BENIGN.mean(0))


@pytest.mark.parametrize(("name", "fn"), [("min_max", min_max), ("min_sum", min_sum)])
def test_min_max_and_min_sum_use_the_round_benign_updates(host, name, fn):
    _, ups = run_round(host, threat(host, name), deltas_with_honest())
    assert torch.allclose(ups[3].delta, fn(BENIGN))
    assert not torch.allclose(ups[3].delta, HONEST)


def test_colluding_attack_without_enough_benign_uploads_sends_the_honest_one(host):
    t = threat(host, "alie", malicious=(1, 2, 3))  # one benign update: no std
    new, ups = run_round(host, t, deltas_with_honest())
    assert torch.equal(ups[3].delta, HONEST)
    events = [e for e in new.history[-1]["events"] if e["kind"] == "poisoning"]
    assert [e["client"] for e in events] == [1, 2, 3]
    assert all(e["action"] == "honest update uploaded" for e in events)


def test_round_record_has_the_detection_matrix(host):
    class DropsTwo:
        """A screening rule that rejects clients 1 and 3 (the rows at those places)."""

        def aggregate(self, updates, sizes, ctx, clients):
            kept = torch.tensor([c not in (1, 3) for c in clients])
            w = kept.float()
            return Screening((w / w.sum()) @ updates, w, kept)

    deltas = [*BENIGN, HONEST, torch.full((3,), float("nan"))]  # client 4 breaks its upload
    t = threat(host, "sign_flip", collude=False, malicious=(3, 4))
    new, _ = run_round(host, t, deltas, aggregator=DropsTwo())
    rec = new.history[-1]
    assert rec["malicious"] == [3, 4]
    assert rec["screening"]["rejected"] == [1, 3]
    assert rec["detection"] == {
        "malicious_dropped": 2, "malicious": 2, "benign_dropped": 1, "benign": 3,
    }  # fmt: skip


def test_krum_and_multi_krum_report_whom_they_left_out(host):
    # Benign updates close together, the compromised one (sign-flipped x10) far away.
    deltas = [torch.tensor([1.0, 0, 0]), torch.tensor([1.1, 0, 0]), torch.tensor([0.9, 0, 0]),
              torch.tensor([1.0, 0.1, 0]), torch.tensor([1.0, 0, 0.1])]  # fmt: skip
    for name, params in (("krum", {"f": 1}), ("multi_krum", {"f": 1, "m": 3})):
        agg = host.registry.build("aggregators", name, params)
        t = threat(host, "sign_flip", {"scale": 10.0}, collude=False, malicious=(4,))
        new, ups = run_round(host, t, deltas, aggregator=agg)
        rec = new.history[-1]
        stacked = torch.stack([u.delta for u in ups])
        assert torch.allclose(new.global_weights - G, agg(stacked, torch.ones(5)))  # same rule
        assert 4 in rec["screening"]["rejected"]
        assert len(rec["screening"]["rejected"]) == 5 - params.get("m", 1)
        assert rec["detection"]["malicious_dropped"] == 1


def test_scaled_replacement_waits_for_its_start_round(host):
    deltas = [torch.zeros(3)] * 3 + [HONEST]
    t = threat(host, "scaled_replacement", {"start_round": 2}, collude=False)
    _, ups = run_round(host, t, deltas)  # round 1
    assert torch.equal(ups[3].delta, HONEST)
