import pytest
import torch

from testbed.numerics import clip_to_norm, weighted_mean


def test_weighted_mean_hand_computed():
    # Prepare: three clients, four numbers, sizes 1, 1, 2.
    updates = torch.tensor([[1.0, 0, 0, 4], [3, 0, 2, 0], [0, 4, 1, 2]])
    sizes = torch.tensor([1.0, 1.0, 2.0])
    # Execute
    out = weighted_mean(updates, sizes)
    # Assert: (u1 + u2 + 2 u3) / 4
    assert torch.allclose(out, torch.tensor([1.0, 2.0, 1.0, 2.0]))


def test_weighted_mean_rejects_bad_shapes_and_zero_weights():
    with pytest.raises(ValueError):
        weighted_mean(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError):
        weighted_mean(torch.zeros(2, 3), torch.zeros(2))


def test_clip_to_norm_scales_only_when_outside():
    v = torch.tensor([3.0, 4.0])  # norm 5
    assert torch.allclose(clip_to_norm(v, 1.0), torch.tensor([0.6, 0.8]))
    assert torch.allclose(clip_to_norm(v, 10.0), v)
    assert torch.allclose(clip_to_norm(torch.zeros(2), 1.0), torch.zeros(2))
