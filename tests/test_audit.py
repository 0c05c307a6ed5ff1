"""The empirical privacy audit (issue 11): pure core on hand-computed cases, then the two
done-when cases on dp_sgd (a correct claim, and a test-only broken accountant)."""

import math
from pathlib import Path

import pytest
import torch

from testbed.audit import (
    CANARY_CLIP,
    audit_dp_sgd,
    clopper_pearson,
    epsilon_from_counts,
    epsilon_lower_bound,
    verdict,
)
from testbed.builtins.dpsgd import DPSGD, DPSGDParams


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_clopper_pearson_edges_have_closed_forms():
    # k = 0: upper = 1 - alpha^(1/n); k = n: lower = alpha^(1/n)
    assert clopper_pearson(0, 100, 0.025) == (0.0, pytest.approx(1 - 0.025 ** (1 / 100)))
    assert clopper_pearson(100, 100, 0.025) == (pytest.approx(0.025 ** (1 / 100)), 1.0)
    lo, hi = clopper_pearson(30, 100, 0.025)
    assert lo < 0.3 < hi


def test_epsilon_from_a_perfect_test_hand_computed():
    # 100 of 100 canary runs flagged, 0 of 100 others: TPR >= a, FPR <= 1 - a with
    # a = 0.025^(1/100), each one-sided at 2.5% (95% together)
    a = 0.025 ** (1 / 100)
    got = epsilon_from_counts(100, 100, 0, 100, delta=1e-5, alpha=0.05)
    assert got == pytest.approx(math.log((a - 1e-5) / (1 - a)))
    assert epsilon_from_counts(50, 100, 50, 100, delta=1e-5, alpha=0.05) == 0.0  # chance


def test_threshold_is_chosen_on_one_half_and_scored_on_the_other():
    # first halves separate perfectly at 1.0; second halves are swapped: no evidence
    scores_in = [1.0] * 50 + [0.0] * 50
    scores_out = [0.0] * 50 + [1.0] * 50
    eps, tpr, fpr = epsilon_lower_bound(scores_in, scores_out, delta=1e-5)
    assert (eps, tpr, fpr) == (0.0, 0.0, 1.0)
    eps, tpr, fpr = epsilon_lower_bound([1.0] * 100, [0.0] * 100, delta=1e-5)
    assert eps == pytest.approx(epsilon_from_counts(50, 50, 0, 50, 1e-5, 0.05)) and tpr == 1.0


def test_verdict_flags_a_lower_bound_above_the_claim():
    assert verdict(1.0, 2.0).startswith("BROKEN")
    assert verdict(2.0, 1.0).startswith("consistent")


class OverclaimingDPSGD(DPSGD):
    """Test-only: reports the epsilon of ten times the noise it really adds."""

    def epsilon_of(self, cid: int) -> float:
        acc = self.accountants.get(cid)
        return 0.0 if acc is None else self._epsilon([(10 * z, q, k) for z, q, k in acc.history])


def test_audit_of_dp_sgd_stays_below_its_claim():
    # z = 1, one full-batch step: claim ~4.7 (RDP); the canary test certifies some privacy
    # loss (a positive bound: the audit has power) but not more than claimed.
    p = DPSGDParams(noise_multiplier=1.0, max_grad_norm=CANARY_CLIP)
    result = audit_dp_sgd(lambda: DPSGD(p), trials=2000, seed=0)
    assert 0 < result.lower_bound < result.claimed_epsilon
    assert not result.broken


def test_audit_catches_a_broken_accountant():
    # adds z = 0.2 but claims the epsilon of z = 2 (~2.2): the audit certifies more
    p = DPSGDParams(noise_multiplier=0.2, max_grad_norm=CANARY_CLIP)
    result = audit_dp_sgd(lambda: OverclaimingDPSGD(p), trials=2000, seed=0)
    assert result.lower_bound > result.claimed_epsilon
    assert result.broken and result.as_dict()["verdict"].startswith("BROKEN")


def test_audit_command(capsys):
    from testbed.cli import main

    repo = Path(__file__).resolve().parents[1]
    assert main(["audit", str(repo / "scenarios/defenses/dp_sgd.toml"), "--trials", "40"]) == 0
    out = capsys.readouterr().out
    assert "audited lower bound" in out and "consistent" in out
    assert main(["audit", str(repo / "scenarios/quickstart.toml")]) == 2
    assert "dp_sgd only, the scenario has dp.name = 'paper_dp'" in capsys.readouterr().err
    assert main(["audit", str(repo / "scenarios/defenses/none.toml")]) == 2
    assert "dp_sgd only, the scenario has no [dp] table" in capsys.readouterr().err
