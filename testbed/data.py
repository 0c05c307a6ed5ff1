"""In-memory image datasets: decoded and resized once, uint8, augmented on tensors."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        if self.x.shape[-2] != self.x.shape[-1]:
            raise ValueError(f"ImageDataset.x must hold square images, not {self.x.shape[-2:]}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError("ImageDataset.y must have one label per image")
        if self.y.dtype.is_floating_point or self.y.dtype == torch.bool:
            raise ValueError(f"ImageDataset.y must be integer class indices, not {self.y.dtype}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"ImageDataset.classes must name two or more classes once each: "
                             f"{self.classes}")  # fmt: skip
        # a label past the classes would train against an output the model does not have,
        # or crash mid-run in the loss
        if len(self.y) and not (int(self.y.min()) >= 0 and int(self.y.max()) < len(self.classes)):
            raise ValueError(
                f"ImageDataset.y must lie in 0..{len(self.classes) - 1} (one per class), "
                f"got {int(self.y.min())}..{int(self.y.max())}"
            )

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


MEMORY_SHARE = 0.5
"""A dataset may take at most this share of the memory available when it is built: the
model, the optimiser and the attacks need the rest."""


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup v2 limit
    (in a container /proc/meminfo shows the whole host). None where neither is readable."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        cg = Path("/sys/fs/cgroup")
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((cg / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    if not found and hasattr(os, "sysconf"):
        with contextlib.suppress(OSError, ValueError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return max(0, min(found)) if found else None


def check_fits_in_memory(
    name: str, what: str, n: int, channels: int, size: int, bytes_per_value: int
) -> None:
    """Refuse, before allocating, a dataset whose peak memory would not fit.

    ``bytes_per_value`` is the peak bytes per pixel value while building: the uint8 result
    plus the float copies the loader (and ``channel_stats``) make on the way.
    """
    need = n * channels * size * size * bytes_per_value
    free = available_memory()
    if free is not None and need > MEMORY_SHARE * free:
        raise DatasetError(
            f"dataset {name!r}: {what} images of {channels} x {size} x {size} need about "
            f"{_gib(need)} of memory, more than {MEMORY_SHARE:.0%} of the {_gib(free)} "
            "available; lower image_size or n_samples"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """16-bit images (16-bit PNG greyscale or RGB) scaled to 8 bits, rounding; others as
    they are. Without this a uint16 tensor reaches the uint8 stack and fails there."""
    if img.dtype == torch.uint8:
        return img
    if img.dtype == torch.uint16:
        return ((img.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    raise ValueError(f"unsupported pixel type {img.dtype}")


def pil_to_array(im: Any, mode: str) -> Any:
    """A PIL image as a uint8 array in ``mode`` ("L" or "RGB"). PIL's own convert clips
    16-bit greyscale ('I;16', 'I') at 255 instead of scaling it; palette images ('P')
    convert through their palette."""
    import numpy as np

    if im.mode.startswith("I;16") or im.mode == "I":
        wide = np.asarray(im, dtype=np.float64).clip(0, 65535)
        grey = np.rint(wide * 255 / 65535).astype(np.uint8)
        arr = grey if mode == "L" else np.repeat(grey[..., None], 3, axis=-1)
        return np.ascontiguousarray(arr)
    return np.asarray(im.convert(mode), dtype=np.uint8)
