"""Model-poisoning attacks on tiny hand-computed updates."""

import math

import pytest
import torch
from pydantic import ValidationError

from testbed.pluginmanager import build_host
from testbed.poisoning import (
    ALIEParams,
    MinMaxParams,
    ScaledReplacementParams,
    alie,
    alie_z,
    gaussian_update,
    inner_product_manipulation,
    min_max,
    min_sum,
    perturbation,
    replacement_boost,
    scaled_replacement,
    sign_flip,
)

# Three benign updates on a line (min-max and min-sum share them).
LINE = torch.tensor([[0.0, 0], [1, 0], [5, 0]])


def test_sign_flip_is_exactly_minus_the_update():
    u = torch.tensor([1.0, -2, 0.5])
    assert torch.equal(sign_flip(u), torch.tensor([-1.0, 2, -0.5]))
    assert torch.equal(sign_flip(u, scale=3), torch.tensor([-3.0, 6, -1.5]))


def test_gaussian_update_is_reproducible_and_has_the_right_scale():
    u = torch.zeros(20_000)
    a = gaussian_update(u, 2.0, torch.Generator().manual_seed(7))
    b = gaussian_update(u, 2.0, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert a.std().item() == pytest.approx(2.0, rel=0.03)
    assert a.mean().item() == pytest.approx(0.0, abs=0.05)


def test_scaled_replacement_under_fedavg_puts_the_global_model_at_the_target():
    # Prepare: n = 4 clients, server lr eta = 1 (our server adds the aggregate as is).
    # Global G = [1, 1]; the attacker wants X = [3, -1], so its update is X - G = [2, -2].
    # Benign updates that cancel (near convergence): [1, 0], [-1, 0.5], [0, -0.5].
    registry = build_host(autoload=False).registry
    fedavg = registry.build("aggregators", "fedavg", {})
    g = torch.tensor([1.0, 1])
    target = torch.tensor([3.0, -1])
    benign = torch.tensor([[1.0, 0], [-1, 0.5], [0, -0.5]])
    # Execute: boost gamma = n / eta = 4, so the upload is [8, -8].
    boost = replacement_boost(4, server_lr=1.0)
    mal = scaled_replacement(target - g, boost)
    new_g = g + fedavg(torch.cat([benign, mal[None]]), torch.full((4,), 0.25))
    # Assert: G + (0 + [8, -8]) / 4 = G + [2, -2] = X
    assert boost == 4
    assert torch.equal(mal, torch.tensor([8.0, -8]))
    assert torch.allclose(new_g, target)


def test_scaled_replacement_norm_evasion_scales_down_to_the_bound():
    # [3, 4] boosted x2 = [6, 8], norm 10 > 5: scaled to [3, 4] (norm 5)
    out = scaled_replacement(torch.tensor([3.0, 4]), 2.0, norm_bound=5.0)
    assert torch.allclose(out, torch.tensor([3.0, 4]))
    # below the bound: untouched
    assert torch.equal(
        scaled_replacement(torch.tensor([0.3, 0.4]), 2.0, 5.0), torch.tensor([0.6, 0.8])
    )


def test_alie_z_follows_the_papers_formula():
    # n = 4, m = 1: s = floor(3) - 1 = 2, z = Phi^-1(2/4) = 0
    assert alie_z(4, 1) == pytest.approx(0.0, abs=1e-12)
    # n = 10, m = 2: s = 6 - 2 = 4, z = Phi^-1(0.6) = 0.253347 (normal table)
    assert alie_z(10, 2) == pytest.approx(0.253347, abs=1e-6)
    # n = 50, m = 12: s = 26 - 12 = 14, z = Phi^-1(0.72) = 0.582842
    assert alie_z(50, 12) == pytest.approx(0.582842, abs=1e-6)
    # attackers already a majority: s <= 0, no finite z
    with pytest.raises(ValueError, match="ALIE"):
        alie_z(4, 3)


def test_alie_is_mean_minus_z_std():
    # columns {1, 3, 5}: mean 3, sample var (4 + 0 + 4)/2 = 4, std 2
    #         {2, 8, 5}: mean 5, sample var (9 + 9 + 0)/2 = 9, std 3
    benign = torch.tensor([[1.0, 2], [3, 8], [5, 5]])
    assert torch.allclose(alie(benign, 1.0), torch.tensor([1.0, 2]))
    z = alie_z(10, 2)
    assert torch.allclose(alie(benign, z), torch.tensor([3 - 2 * z, 5 - 3 * z]))
    with pytest.raises(ValueError, match="k >= 2"):
        alie(benign[:1], 1.0)


def test_inner_product_manipulation_is_minus_epsilon_mean():
    benign = torch.tensor([[1.0, 2], [3, 8], [5, 5]])  # mean [3, 5]
    out = inner_product_manipulation(benign, 0.1)
    assert torch.allclose(out, torch.tensor([-0.3, -0.5]))
    # the point of the attack: a negative inner product with the benign mean
    assert float(out @ benign.mean(dim=0)) < 0


def test_min_max_hand_computed():
    # mean [2, 0], p = -mean/||mean|| = [-1, 0], malicious [2 - g, 0].
    # Largest benign squared distance: (5 - 0)^2 = 25. The malicious update's largest is
    # to [5, 0]: (3 + g)^2 <= 25  ->  g = 2, malicious [0, 0].
    out = min_max(LINE)
    assert torch.allclose(out, torch.tensor([0.0, 0]), atol=1e-4)


def test_min_sum_hand_computed():
    # Sums of squared distances of each benign update to the others: 0 -> 1 + 25 = 26,
    # 1 -> 1 + 16 = 17, 5 -> 25 + 16 = 41; bound 41. For [2 - g, 0]:
    # (2 - g)^2 + (1 - g)^2 + (3 + g)^2 = 14 + 3 g^2 <= 41  ->  g = 3, malicious [-1, 0].
    out = min_sum(LINE)
    assert torch.allclose(out, torch.tensor([-1.0, 0]), atol=1e-4)


def test_perturbation_directions():
    benign = torch.tensor([[1.0, -2], [3, -8], [5, -5]])  # mean [3, -5], std [2, 3]
    assert torch.allclose(perturbation(benign, "unit_vec"), torch.tensor([-3.0, 5]) / math.sqrt(34))
    assert torch.equal(perturbation(benign, "sign"), torch.tensor([-1.0, 1]))
    assert torch.allclose(perturbation(benign, "std"), torch.tensor([-2.0, -3]))


@pytest.mark.parametrize("direction", ["unit_vec", "sign", "std"])
def test_min_max_and_min_sum_stay_inside_their_bounds(direction):
    # Property: on random updates, the result satisfies the oracle it was searched for,
    # and is strictly away from the mean (the attack does something).
    g = torch.Generator().manual_seed(3)
    benign = torch.randn(6, 5, generator=g) + 1.0
    d2 = torch.cdist(benign, benign).square()
    mm = min_max(benign, direction)
    assert torch.cdist(mm[None], benign).square().max() <= d2.max() + 1e-4
    ms = min_sum(benign, direction)
    assert torch.cdist(ms[None], benign).square().sum() <= d2.sum(dim=1).max() + 1e-4
    assert not torch.allclose(mm, benign.mean(dim=0))


def test_params_are_validated():
    assert MinMaxParams().direction == "unit_vec"
    with pytest.raises(ValidationError):
        MinMaxParams(direction="up")
    with pytest.raises(ValidationError):
        ScaledReplacementParams(boost=-1)
    with pytest.raises(ValidationError):
        ALIEParams(zz=1)
