"""Defences against training-time attacks on tiny hand-computed updates."""

import torch

from testbed.robust_extra import (
    centred_clipping,
    flame,
    fltrust,
    foolsgold,
    foolsgold_weights,
    geometric_median,
)

# -- centred clipping ------------------------------------------------------------------

CC = torch.tensor([[3.0, 4], [0, 0.5], [0, -0.5]])


def test_centred_clipping_one_iteration():
    # v0 = 0, tau = 1: [3, 4] has norm 5 -> clipped to [0.6, 0.8] (factor 0.2); the other
    # two have norm 0.5 and stay. v1 = ([0.6, 0.8] + [0, 0.5] + [0, -0.5]) / 3 = [0.2, 0.8/3]
    out = centred_clipping(CC, torch.zeros(2), tau=1.0)
    assert torch.allclose(out.delta, torch.tensor([0.2, 0.8 / 3]))
    assert torch.allclose(out.weights, torch.tensor([0.2, 1, 1]))
    assert out.kept.all()


def test_centred_clipping_two_iterations():
    # v1 = (1/3) [0.6, 0.8]. [3, 4] - v1 = (14/3) [0.6, 0.8], norm 14/3 -> clipped to
    # [0.6, 0.8]; the others are within 1 of v1 (norms 0.31 and 0.79) and stay. Sum of the
    # differences: [0.6, 0.8] + ([0, 0.5] + [0, -0.5]) - 2 v1 = (1/3) [0.6, 0.8];
    # v2 = v1 + (1/9) [0.6, 0.8] = (4/9) [0.6, 0.8].
    out = centred_clipping(CC, torch.zeros(2), tau=1.0, iterations=2)
    assert torch.allclose(out.delta, torch.tensor([0.6, 0.8]) * 4 / 9)
    assert torch.allclose(out.weights, torch.tensor([3 / 14, 1, 1]))


def test_centred_clipping_with_a_large_radius_is_the_mean_from_any_start():
    prev = torch.tensor([10.0, -10])
    out = centred_clipping(CC, prev, tau=1e6)
    assert torch.allclose(out.delta, CC.mean(dim=0), atol=1e-5)


# -- geometric median ------------------------------------------------------------------


def test_geometric_median_ignores_a_far_outlier():
    # At the data point 0 the unit vectors to the others, (-1,0), (1,0), (0,-1), (0,1),
    # sum to 0, which is within its own weight 1: 0 is the geometric median, although
    # the mean is [0, 19.8].
    u = torch.tensor([[-1.0, 0], [1, 0], [0, 0], [0, -1], [0, 100]])
    out = geometric_median(u)
    assert torch.allclose(out.delta, torch.zeros(2), atol=1e-4)
    assert int(out.weights.argmax()) == 2 and out.kept.all()


def test_geometric_median_on_a_line_is_the_median():
    # 1-d: the geometric median of {0, 1, 10} is the median, 1
    u = torch.tensor([[0.0, 0], [1, 0], [10, 0]])
    assert torch.allclose(geometric_median(u).delta, torch.tensor([1.0, 0]), atol=1e-4)
    # alpha = [5, 1, 1]: the point 0 carries more weight than the rest together
    w = torch.tensor([5.0, 1, 1])
    assert torch.allclose(geometric_median(u, w).delta, torch.zeros(2), atol=1e-4)


def test_geometric_median_is_translation_equivariant():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(7, 4, generator=g, dtype=torch.float64)
    c = torch.tensor([3.0, -1, 2, 0.5], dtype=torch.float64)
    a = geometric_median(u, tol=1e-12, max_iter=500).delta
    b = geometric_median(u + c, tol=1e-12, max_iter=500).delta
    assert torch.allclose(a + c, b, atol=1e-6)


# -- FLTrust ---------------------------------------------------------------------------


def test_fltrust_hand_computed():
    # g0 = [1, 0], ||g0|| = 1. cos: [2, 0] -> 1; [0, 3] -> 0; [3, 4] -> 0.6; [-1, 0] -> -1.
    # TS = [1, 0, 0.6, 0]. Rescaled to norm 1: [1, 0] and [0.6, 0.8].
    # (1 [1, 0] + 0.6 [0.6, 0.8]) / 1.6 = [1.36, 0.48] / 1.6 = [0.85, 0.3]
    u = torch.tensor([[2.0, 0], [0, 3], [3, 4], [-1, 0]])
    out = fltrust(u, torch.tensor([1.0, 0]))
    assert torch.allclose(out.delta, torch.tensor([0.85, 0.3]))
    assert torch.allclose(out.weights, torch.tensor([1 / 1.6, 0, 0.6 / 1.6, 0]))
    assert out.kept.tolist() == [True, False, True, False]


def test_fltrust_all_opposed_gives_zero():
    out = fltrust(torch.tensor([[-1.0, 0], [0, -2]]), torch.tensor([1.0, 1]))
    assert torch.equal(out.delta, torch.zeros(2)) and not out.kept.any()


# -- FLAME -----------------------------------------------------------------------------

FL = torch.tensor([[1.0, 0], [3, 0], [3, 4], [-2, 0]])


def test_flame_clusters_out_the_opposite_update_and_clips_to_the_median_norm():
    # Cosine distances: 0-1: 0, 0-2 and 1-2: 0.4, to [-2, 0]: 2, 2, 1.6. HDBSCAN with
    # min_cluster_size = 4//2 + 1 = 3 keeps {0, 1, 2}; [-2, 0] is an outlier.
    # Norms 1, 3, 5, 2: median S = (2 + 3) / 2 = 2.5. Clipped: [1, 0] (factor 1),
    # [2.5, 0] (2.5/3), [1.5, 2] (0.5). Mean: [5, 2] / 3. lambda = 0: no noise.
    out = flame(FL, 0.0, torch.Generator().manual_seed(0))
    assert out.kept.tolist() == [True, True, True, False]
    assert torch.allclose(out.delta, torch.tensor([5 / 3, 2 / 3]))
    assert torch.allclose(out.weights, torch.tensor([1 / 3, 2.5 / 9, 0.5 / 3, 0]))


def test_flame_noise_is_lambda_times_the_median_norm_from_the_generator():
    out = flame(FL, 0.1, torch.Generator().manual_seed(5))
    noise = torch.randn(2, generator=torch.Generator().manual_seed(5))
    # sigma = lambda * S = 0.1 * 2.5
    assert torch.allclose(out.delta, torch.tensor([5 / 3, 2 / 3]) + 0.25 * noise)


def test_flame_with_one_update_admits_it():
    out = flame(torch.tensor([[3.0, 4]]), 0.0, torch.Generator())
    assert out.kept.tolist() == [True]
    assert torch.allclose(out.delta, torch.tensor([3.0, 4]))


# -- FoolsGold -------------------------------------------------------------------------


def test_foolsgold_zeroes_identical_sybils():
    # cs: 0-1 = 1, others 0. v = [1, 1, 0]; alpha = 1 - max cs = [0, 0, 1] -> /1 ->
    # [0, 0, 0.99] -> logit: ln 0 = -inf -> 0; ln(99) + 0.5 = 5.1 -> 1.
    h = torch.tensor([[1.0, 0], [1, 0], [0, 1]])
    assert torch.equal(foolsgold_weights(h), torch.tensor([0.0, 0, 1]))


def test_foolsgold_weights_with_pardoning_hand_computed():
    # H = [1, 0], [1, 1.2], [0, 1]; ||[1, 1.2]|| = sqrt(2.44) = 1.562050.
    # cs01 = 1/1.562050 = 0.640184, cs12 = 1.2/1.562050 = 0.768221, cs02 = 0.
    # v = [0.640184, 0.768221, 0.768221]. Pardon (v0 < v1): cs01 = 0.640184^2 / 0.768221
    # = 0.533488. alpha = 1 - max: [0.466512, 0.231779, 0.231779]; / 0.466512 ->
    # [1, 0.496834, 0.496834]; 1 -> 0.99 -> logit 5.1 -> 1;
    # ln(0.496834 / 0.503166) + 0.5 = -0.012665 + 0.5 = 0.487335.
    h = torch.tensor([[1.0, 0], [1, 1.2], [0, 1]])
    assert torch.allclose(foolsgold_weights(h), torch.tensor([1, 0.487335, 0.487335]), atol=1e-5)


def test_foolsgold_aggregates_the_weighted_mean_and_returns_the_new_history():
    # History zero: the new history is this round's updates, weights as above.
    # ([1, 0] + 0.487335 ([1, 1.2] + [0, 1])) / 1.974670 = [1.487335, 1.072137] / 1.974670
    u = torch.tensor([[1.0, 0], [1, 1.2], [0, 1]])
    out, hist = foolsgold(u, torch.zeros(3, 2))
    assert torch.equal(hist, u)
    assert torch.allclose(out.delta, torch.tensor([0.753206, 0.542950]), atol=1e-5)
    assert out.kept.all()


def test_foolsgold_history_remembers_past_sybils():
    # This round clients 0 and 2 look different, but their history shows them as twins:
    # H0 = [1, 0] + [0, 1] = [1, 1], H2 = [0, 0] + [1, 1] = [1, 1] -> both weight 0.
    h = torch.tensor([[1.0, 0], [0, 1], [0, 0]])
    u = torch.tensor([[0.0, 1], [-1, 2], [1, 1]])
    out, hist = foolsgold(u, h)
    assert torch.equal(hist, h + u)
    assert out.weights[0] == 0 and out.weights[2] == 0 and out.weights[1] == 1
    assert torch.allclose(out.delta, torch.tensor([-1.0, 2]))
