"""Data-poisoning attacks: pure functions on a client's images and labels.

Images are NCHW tensors, either uint8 (0..255, as the federation stores them) or float
in [0, 1]; labels are int64 class indices. Every function returns new tensors and leaves
its inputs untouched, so the wiring can poison a compromised client's training set once
per run (or per round) from a generator derived from the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Self

import numpy as np
import torch
from pydantic import Field, model_validator

from testbed.registry import Params

Trigger = Literal["pattern", "pixel"]


# -- label flipping --------------------------------------------------------------------


class LabelFlipParams(Params):
    mode: Literal["all", "source_target"] = Field(
        "all", description="Flip every class, or only source -> target."
    )
    permutation: list[int] | None = Field(
        None, description="mode=all: class y becomes permutation[y]; default C - 1 - y."
    )
    source: int | None = Field(None, ge=0, description="mode=source_target: the class flipped.")
    target: int | None = Field(None, ge=0, description="mode=source_target: its new label.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.mode == "source_target":
            if self.source is None or self.target is None:
                raise ValueError("label flipping source_target needs source and target")
            if self.source == self.target:
                raise ValueError("label flipping needs source != target")
            if self.permutation is not None:
                raise ValueError("permutation applies to mode=all only")
        elif self.source is not None or self.target is not None:
            raise ValueError("source and target apply to mode=source_target only")
        return self


def flip_all_labels(
    y: torch.Tensor, num_classes: int, permutation: Sequence[int] | None = None
) -> torch.Tensor:
    """Label flipping on every class, y -> C - 1 - y (Fang, Cao, Jia & Gong 2020, USENIX
    Security, "Local model poisoning attacks to Byzantine-robust federated learning"),
    or y -> permutation[y] for a given permutation of the C classes.
    With C = 2 (our binary tasks) both defaults swap the two classes."""
    if permutation is None:
        permutation = range(num_classes - 1, -1, -1)
    perm = torch.as_tensor(list(permutation), dtype=torch.long)
    if sorted(perm.tolist()) != list(range(num_classes)):
        raise ValueError(f"not a permutation of the {num_classes} classes: {perm.tolist()}")
    if y.numel() and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        raise ValueError(f"labels outside 0..{num_classes - 1}")
    return perm.to(y.device)[y]


def flip_source_to_target(y: torch.Tensor, source: int, target: int) -> torch.Tensor:
    """Targeted label flipping (Tolpegin et al. 2020, ESORICS): every label ``source``
    becomes ``target``; the other classes stay, so the main task keeps its accuracy and
    the damage hides in one class's error rate."""
    return torch.where(y == source, torch.full_like(y, target), y)


# -- backdoor trigger through ART ------------------------------------------------------


class BackdoorParams(Params):
    trigger: Trigger = Field(
        "pattern", description="ART's checkerboard pattern or a single pixel, bottom right."
    )
    rate: float = Field(
        0.1, gt=0, le=1, description="Share of the client's training images poisoned."
    )
    target: int = Field(0, ge=0, description="Label the triggered images are given.")
    distance: int = Field(2, ge=1, description="Trigger distance from the bottom-right corner.")


def _art_perturbation(trigger: Trigger, distance: int, pixel_value: float):
    from art.attacks.poisoning.perturbations import add_pattern_bd, add_single_bd

    if trigger == "pattern":
        return lambda x: add_pattern_bd(x, distance=distance, pixel_value=pixel_value)
    if trigger == "pixel":
        return lambda x: add_single_bd(x, distance=distance, pixel_value=pixel_value)
    raise ValueError(f"unknown trigger {trigger!r}")


def _to_nhwc(x: torch.Tensor) -> np.ndarray:
    # ART's add_*_bd index a 4-d array as N, H, W, C; handed our NCHW (N, 1, H, W) they
    # would write into the wrong axes, so transpose to channels-last first.
    if x.ndim != 4:
        raise ValueError(f"images must be N x C x H x W, got shape {tuple(x.shape)}")
    return x.detach().cpu().permute(0, 2, 3, 1).numpy()


def _from_nhwc(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()
    return t.to(device=like.device, dtype=like.dtype)


def _pixel_value(x: torch.Tensor) -> float:
    # The trigger is the brightest pixel of the image's own scale.
    return 255.0 if x.dtype == torch.uint8 else 1.0


def _check_fits(x: torch.Tensor, trigger: Trigger, distance: int) -> None:
    # The pattern reaches distance + 2 pixels from the bottom/right edge; a larger
    # distance would wrap to the other side through negative indices.
    reach = distance + (2 if trigger == "pattern" else 0)
    if distance < 1 or reach > min(x.shape[-2:]):
        raise ValueError(
            f"a {trigger} trigger at distance {distance} does not fit images {tuple(x.shape[-2:])}"
        )


def apply_trigger(x: torch.Tensor, trigger: Trigger = "pattern", distance: int = 2) -> torch.Tensor:
    """Stamp ART's trigger (``add_pattern_bd`` or ``add_single_bd``, Gu et al. 2017,
    "BadNets") on every image of an NCHW batch, on all channels, at full brightness
    (255 for uint8, 1.0 for float). Used on training images by ``backdoor`` and on test
    images to measure the backdoor's success."""
    _check_fits(x, trigger, distance)
    if x.shape[0] == 0:
        return x.clone()
    perturb = _art_perturbation(trigger, distance, _pixel_value(x))
    return _from_nhwc(perturb(_to_nhwc(x)), x)


def poison_indices(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """floor(rate * n) distinct indices of 0..n-1, drawn from ``generator``, sorted."""
    if not 0 < rate <= 1:
        raise ValueError(f"poisoning rate must be in (0, 1], got {rate}")
    count = int(rate * n)
    return torch.randperm(n, generator=generator)[:count].sort().values


def backdoor(
    x: torch.Tensor,
    y: torch.Tensor,
    target: int,
    rate: float,
    generator: torch.Generator,
    trigger: Trigger = "pattern",
    distance: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backdoor data poisoning through ART's ``PoisoningAttackBackdoor`` (Gu, Dolan-Gavitt
    & Garg 2017, "BadNets: identifying vulnerabilities in the machine learning model
    supply chain"; in FL, Bagdasaryan et al. 2020): a share ``rate`` of the images,
    drawn from ``generator``, get the trigger and the label ``target``; the rest are
    unchanged. Returns the poisoned images, labels and the poisoned indices.
    """
    from art.attacks.poisoning import PoisoningAttackBackdoor

    _check_fits(x, trigger, distance)
    idx = poison_indices(int(x.shape[0]), rate, generator)
    x_out, y_out = x.clone(), y.clone()
    if idx.numel() == 0:
        return x_out, y_out, idx
    attack = PoisoningAttackBackdoor(_art_perturbation(trigger, distance, _pixel_value(x)))
    targets = np.full(idx.numel(), target, dtype=np.int64)
    x_bd, y_bd = attack.poison(_to_nhwc(x[idx.to(x.device)]), y=targets)
    x_out[idx.to(x.device)] = _from_nhwc(x_bd, x)
    y_out[idx.to(y.device)] = torch.as_tensor(y_bd, dtype=y.dtype, device=y.device)
    return x_out, y_out, idx


# -- clean-label backdoor through ART --------------------------------------------------


class CleanLabelBackdoorParams(Params):
    trigger: Trigger = Field("pattern", description="ART's checkerboard pattern or one pixel.")
    target: int = Field(0, ge=0, description="The class whose images carry the trigger.")
    rate: float = Field(
        0.33, gt=0, lt=1, description="Share of the target class's images poisoned (pp_poison)."
    )
    distance: int = Field(2, ge=1, description="Trigger distance from the bottom-right corner.")
    eps: float = Field(
        16 / 255, gt=0, le=1, description="L-inf budget of the PGD step that hides the content."
    )
    eps_step: float = Field(2 / 255, gt=0, le=1, description="PGD step size.")
    max_iter: int = Field(20, ge=1, description="PGD iterations on the proxy model.")
    proxy_epochs: int = Field(5, ge=1, description="Epochs the attacker trains its proxy for.")

    @model_validator(mode="after")
    def _step_within_eps(self) -> Self:
        if self.eps_step > self.eps:
            raise ValueError(f"eps_step ({self.eps_step}) larger than eps ({self.eps})")
        return self


def _nchw_trigger(trigger: Trigger, distance: int) -> Any:
    """ART's backdoor for NCHW float images in [0, 1], which is what its clean-label attack
    hands it (the proxy's own layout); ART's perturbations index N, H, W, C."""
    from art.attacks.poisoning import PoisoningAttackBackdoor

    stamp = _art_perturbation(trigger, distance, 1.0)
    return PoisoningAttackBackdoor(
        lambda a: np.ascontiguousarray(stamp(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2))
    )


def clean_label_backdoor(
    x: torch.Tensor,
    y: torch.Tensor,
    proxy: torch.nn.Module,
    p: CleanLabelBackdoorParams,
    num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean-label backdoor through ART's ``PoisoningAttackCleanLabelBackdoor`` (Turner,
    Tsipras & Madry 2019, "Label-consistent backdoor attacks"): a share ``rate`` of the
    images of the target class are first pushed by untargeted PGD on the attacker's
    ``proxy`` model (so their content no longer explains their label), then stamped with
    the trigger; every label stays true, so the poison survives a label audit and the
    model learns "trigger -> target". ART draws the images with numpy's global generator
    (the caller seeds it) and with replacement, so a few may be drawn twice.
    Returns the poisoned images (same dtype as ``x``) and the unchanged labels."""
    from art.attacks.poisoning import PoisoningAttackCleanLabelBackdoor
    from art.estimators.classification import PyTorchClassifier

    _check_fits(x, p.trigger, p.distance)
    if not (y == p.target).any():
        return x.clone(), y.clone()  # the attacker holds no image of the target class
    proxy = proxy.eval()
    estimator = PyTorchClassifier(
        proxy,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=num_classes,
        clip_values=(0.0, 1.0),
        preprocessing=None,
    )
    attack = PoisoningAttackCleanLabelBackdoor(
        _nchw_trigger(p.trigger, p.distance),
        estimator,
        target=np.eye(num_classes, dtype=np.float32)[p.target],
        pp_poison=p.rate,
        eps=p.eps,
        eps_step=p.eps_step,
        max_iter=p.max_iter,
    )
    attack.attack.set_params(verbose=False)  # else its PGD draws a tqdm bar into the output
    floats = x.detach().cpu().float().numpy() / (255.0 if x.dtype == torch.uint8 else 1.0)
    onehot = np.eye(num_classes, dtype=np.float32)[y.cpu().numpy()]
    poisoned, _ = attack.poison(floats.astype(np.float32), onehot, broadcast=True)
    out = torch.from_numpy(poisoned).to(x.device)
    if x.dtype == torch.uint8:
        out = out.mul(255).round().clamp(0, 255).to(torch.uint8)
    return out.to(x.dtype), y.clone()
