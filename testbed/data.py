"""In-memory image datasets: decoded and resized once, uint8, augmented on tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torchvision.transforms.v2.functional as TF


class DatasetError(Exception):
    """A dataset is missing or malformed; the message names the path."""


@dataclass(frozen=True)
class ImageDataset:
    x: torch.Tensor
    """uint8, N x C x H x W."""
    y: torch.Tensor
    """int64, N."""
    classes: tuple[str, ...]
    ids: tuple[str, ...] = ()
    """Per-sample identifiers (file names), for reports and leakage checks."""
    info: dict[str, object] = field(default_factory=dict)
    """Free-form facts the loader found (duplicates, source layout); saved in the report."""

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise ValueError("ImageDataset.x must be uint8 N x C x H x W")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError("ImageDataset.y must have one label per image")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x.shape[-1])

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the pixels in [0, 1]."""
        xf = self.x.float().div_(255)
        mean = xf.mean(dim=(0, 2, 3))
        std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return mean.tolist(), std.tolist()


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255)


def augment(
    x: torch.Tensor, g: torch.Generator, hflip: bool, vflip: bool, rotate_degrees: float
) -> torch.Tensor:
    """Random flips per image and one random rotation per batch, on float tensors."""
    n = x.shape[0]
    # Draws come from the CPU generator so that a seed gives the same flips on any device.
    if hflip:
        m = (torch.rand(n, generator=g) < 0.5).to(x.device)
        x = torch.where(m[:, None, None, None], x.flip(-1), x)
    if vflip:
        m = (torch.rand(n, generator=g) < 0.5).to(x.device)
        x = torch.where(m[:, None, None, None], x.flip(-2), x)
    if rotate_degrees > 0:
        angle = (torch.rand((), generator=g).item() * 2 - 1) * rotate_degrees
        x = TF.rotate(x, angle)
    return x
