"""Data poisoning: label flips by hand, and ART's trigger landing where expected."""

import re

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from testbed.data_poisoning import (
    BackdoorParams,
    CleanLabelBackdoorParams,
    LabelFlipParams,
    apply_trigger,
    backdoor,
    clean_label_backdoor,
    flip_all_labels,
    flip_source_to_target,
    poison_indices,
)


def test_flip_all_labels_default_and_permutation():
    y = torch.tensor([0, 1, 2, 3, 1])
    # C = 4: y -> 3 - y
    assert torch.equal(flip_all_labels(y, 4), torch.tensor([3, 2, 1, 0, 2]))
    # y -> perm[y] with perm = [1, 2, 3, 0]
    assert torch.equal(flip_all_labels(y, 4, [1, 2, 3, 0]), torch.tensor([1, 2, 3, 0, 2]))
    # binary task: the two classes swap
    assert torch.equal(flip_all_labels(torch.tensor([0, 1, 1]), 2), torch.tensor([1, 0, 0]))
    with pytest.raises(ValueError, match="permutation"):
        flip_all_labels(y, 4, [0, 0, 1, 2])
    with pytest.raises(ValueError, match="outside"):
        flip_all_labels(torch.tensor([5]), 4)


def test_flip_source_to_target_touches_only_the_source():
    y = torch.tensor([0, 1, 2, 1, 0])
    out = flip_source_to_target(y, source=1, target=2)
    assert torch.equal(out, torch.tensor([0, 2, 2, 2, 0]))
    assert torch.equal(y, torch.tensor([0, 1, 2, 1, 0]))  # input untouched


def test_label_flip_params():
    LabelFlipParams(mode="source_target", source=1, target=0)
    with pytest.raises(ValidationError):
        LabelFlipParams(mode="source_target", source=1)
    with pytest.raises(ValidationError):
        LabelFlipParams(mode="all", target=0)


# ART's pattern at distance 2 on an H x W image sets (H-2, W-2), (H-3, W-3), (H-2, W-4)
# and (H-4, W-2); on 6 x 6: (4, 4), (3, 3), (4, 2), (2, 4). The pixel trigger: (4, 4).
PATTERN = [(4, 4), (3, 3), (4, 2), (2, 4)]


def expected(channels: int, cells: list[tuple[int, int]], value: float, dtype) -> torch.Tensor:
    e = torch.zeros(1, channels, 6, 6, dtype=dtype)
    for r, c in cells:
        e[0, :, r, c] = value
    return e


@pytest.mark.parametrize("channels", [1, 3])
def test_pattern_trigger_lands_bottom_right_on_nchw_float(channels):
    x = torch.zeros(1, channels, 6, 6)
    out = apply_trigger(x, "pattern", distance=2)
    assert torch.equal(out, expected(channels, PATTERN, 1.0, torch.float32))
    assert out.dtype == torch.float32 and x.abs().sum() == 0  # input untouched


def test_pixel_trigger_on_uint8_is_full_brightness():
    x = torch.zeros(1, 1, 6, 6, dtype=torch.uint8)
    out = apply_trigger(x, "pixel", distance=2)
    assert out.dtype == torch.uint8
    assert torch.equal(out, expected(1, [(4, 4)], 255, torch.uint8))


def test_trigger_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        apply_trigger(torch.zeros(1, 1, 3, 3), "pattern", distance=2)


def test_backdoor_poisons_the_drawn_share_with_trigger_and_target():
    # Prepare: 10 grey 6x6 images of class 1; rate 0.3 -> floor(3.0) = 3 poisoned.
    x = torch.full((10, 1, 6, 6), 100, dtype=torch.uint8)
    y = torch.ones(10, dtype=torch.long)
    # Execute
    xp, yp, idx = backdoor(x, y, target=0, rate=0.3, generator=torch.Generator().manual_seed(1))
    # Assert: the same indices as poison_indices with the same seed
    assert torch.equal(idx, poison_indices(10, 0.3, torch.Generator().manual_seed(1)))
    assert idx.numel() == 3
    others = torch.ones(10, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(yp[idx], torch.zeros(3, dtype=torch.long))
    assert torch.equal(yp[others], y[others]) and torch.equal(xp[others], x[others])
    for r, c in PATTERN:
        assert (xp[idx, 0, r, c] == 255).all()
    assert (xp[idx, 0, 0, 0] == 100).all()  # the rest of the image untouched
    assert torch.equal(xp[idx], apply_trigger(x[idx]))


def test_backdoor_params():
    assert BackdoorParams().trigger == "pattern"
    with pytest.raises(ValidationError):
        BackdoorParams(rate=0)


def _linear_proxy(side: int) -> torch.nn.Module:
    """logits = (sum x, -sum x): an image of mean > 0 is class 0, and the cross-entropy
    gradient of class 0 is negative on every pixel, so untargeted PGD lowers each pixel
    by exactly eps_step per step (sign of the gradient) until eps."""
    lin = torch.nn.Linear(side * side, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([torch.ones(side * side), -torch.ones(side * side)]))
    return torch.nn.Sequential(torch.nn.Flatten(), lin)


def test_clean_label_backdoor_hides_target_images_then_stamps_them_labels_kept():
    side = 8
    x = torch.full((20, 1, side, side), 0.5)
    y = torch.tensor([0, 1] * 10)  # ten of the target class 0
    p = CleanLabelBackdoorParams(target=0, rate=0.5, eps=0.1, eps_step=0.05, max_iter=2)
    np.random.seed(0)
    x_out, y_out = clean_label_backdoor(x, y, _linear_proxy(side), p, num_classes=2)
    assert torch.equal(y_out, y)  # clean label: no label changes
    changed = (x_out != x).flatten(1).any(1)
    assert not changed[y == 1].any()  # only the target class is touched
    # ART draws int(0.5 * 10) = 5 of them with replacement: 1 to 5 distinct images
    assert 1 <= int(changed.sum()) <= 5
    # each: 0.5 - 2 x 0.05 = 0.4 everywhere, then the trigger at full brightness
    expected = apply_trigger(torch.full((1, 1, side, side), 0.4), "pattern", 2)[0]
    for img in x_out[changed]:
        assert torch.allclose(img, expected, atol=1e-6)


def test_clean_label_backdoor_on_uint8_keeps_the_dtype_and_is_seeded():
    side = 8
    x = torch.full((10, 1, side, side), 128, dtype=torch.uint8)
    y = torch.zeros(10, dtype=torch.long)
    p = CleanLabelBackdoorParams(target=0, rate=0.5, eps=0.1, eps_step=0.05, max_iter=2)
    runs = []
    for _ in range(2):
        np.random.seed(3)
        runs.append(clean_label_backdoor(x, y, _linear_proxy(side), p, 2)[0])
    assert runs[0].dtype == torch.uint8 and torch.equal(runs[0], runs[1])
    changed = runs[0][(runs[0] != x).flatten(1).any(1)]
    # 128/255 - 0.1 = 0.402 -> 102.5: 102 or 103 off the trigger
    off = changed[apply_trigger(changed, "pattern", 2) == changed]
    assert set(off.unique().tolist()) <= {102, 103, 255}


def test_clean_label_backdoor_params():
    with pytest.raises(ValidationError, match="eps_step"):
        CleanLabelBackdoorParams(eps=0.01, eps_step=0.02)
    with pytest.raises(ValidationError):
        CleanLabelBackdoorParams(rate=1.0)  # ART needs 0 < pp_poison < 1


class _Returns:  # a data-poisoning attack returning whatever it was given to return
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.out = (x, y)

    def poison_data(self, x, y, num_classes, generator):
        return self.out


def test_poisoned_data_must_still_be_the_tasks_dataset():
    from testbed.poisoning_run import Threat
    from testbed.rundir import RunError

    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    y = torch.tensor([0, 1, 0, 1])
    cases = {
        "must lie in 0..1 (one per class), got 0..2": (x, torch.tensor([0, 1, 2, 1])),
        "must be uint8": (x.float(), y),
        "returned images of shape (1, 4, 4), not (1, 8, 8)": (x[:, :, :4, :4], y),
        "one label per image": (x, y[:3]),
    }
    for message, out in cases.items():
        threat = Threat((0,), False, [("flipper", _Returns(*out))])
        with pytest.raises(RunError, match=r"poisoning\[0\] 'flipper': .*" + re.escape(message)):
            threat.poison_data(0, x, y, 2, seed=0)
    fine = Threat((0,), False, [("flipper", _Returns(x, 1 - y))])
    assert torch.equal(fine.poison_data(0, x, y, 2, seed=0)[1], 1 - y)
    assert fine.poison_data(1, x, y, 2, seed=0)[1] is y  # an honest client: untouched
