"""The synthetic dataset: generated lesions, offline, deterministic and fast.

Smooth 'tissue' with noise, half the images holding a small bright lesion, grey or with
an H&E-like tint; the same seed gives the same pixels. It needs no data folder, so tests,
examples and CI run without downloads. Registered as ``synthetic`` by datasets.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from testbed.data import ImageDataset, check_fits_in_memory
from testbed.registry import Params
from testbed.scenario import MAX_SEED


class SyntheticParams(Params):
    n_samples: int = Field(600, ge=4, description="Images generated, half of them lesions.")
    channels: Literal[1, 3] = Field(1, description="1: grey (MRI-like); 3: H&E-like tint.")
    image_size: int = Field(32, ge=16, description="Square image size in pixels.")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Fixes every pixel; same seed, same dataset."
    )
    lesion_contrast: float = Field(
        0.35, ge=0, le=1, description="Mean brightness a lesion adds (0: unlearnable)."
    )
    noise: float = Field(0.08, ge=0, le=1, description="Std of the per-pixel Gaussian noise.")


# Optical density of haematoxylin and eosin per RGB channel (Ruifrok & Johnston 2001).
_HEMATOXYLIN = (0.65, 0.70, 0.29)
_EOSIN = (0.07, 0.99, 0.11)


def _smooth_field(n: int, grid: int, size: int, g: torch.Generator) -> torch.Tensor:
    coarse = torch.rand(n, 1, grid, grid, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def _blobs(n: int, size: int, r_min: float, r_max: float, g: torch.Generator) -> torch.Tensor:
    """Soft-edged ellipses of random radii, orientation and position; N x size x size."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    u = torch.rand(n, 6, generator=g)
    cx = size * (0.25 + 0.5 * u[:, 0])
    cy = size * (0.25 + 0.5 * u[:, 1])
    rx = r_min + (r_max - r_min) * u[:, 2]
    ry = (rx * (0.6 + 0.6 * u[:, 3])).clamp(r_min * 0.8, r_max * 1.2)
    theta = math.pi * u[:, 4]
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    d = ((dx * c + dy * s) / rx[:, None, None]) ** 2 + ((dy * c - dx * s) / ry[:, None, None]) ** 2
    # A steep sigmoid rather than a hard mask: lesion borders in scans are blurred.
    return torch.sigmoid((1.0 - d) * 6.0)


def load_synthetic(params: SyntheticParams, data_root: Path | None = None) -> ImageDataset:
    """Smooth 'tissue' with noise; class 1 adds a small bright elliptical lesion.

    Class 0 and 1 alike sometimes hold a larger faint structure, and lesion contrast
    varies, so a classifier has to look for size and brightness rather than any blob.
    """
    n, s = params.n_samples, params.image_size
    # About a dozen float32 N x S x S fields (tissue, blobs, noise, RGB optical density)
    # are alive at once: 48 bytes per pixel value before the uint8 result is made.
    check_fits_in_memory("synthetic", f"n_samples={n}", n, params.channels, s, 48)
    g = torch.Generator().manual_seed(params.seed)
    y = torch.zeros(n, dtype=torch.int64)
    y[: n // 2] = 1
    y = y[torch.randperm(n, generator=g)]

    tissue = 0.30 + 0.30 * _smooth_field(n, 4, s, g) + 0.12 * (_smooth_field(n, 8, s, g) - 0.5)
    lesion = _blobs(n, s, s / 10, s / 5, g)
    lesion_contrast = params.lesion_contrast * (0.5 + torch.rand(n, generator=g))
    distractor = _blobs(n, s, s / 5, s / 3, g)
    has_distractor = (torch.rand(n, generator=g) < 0.5).float()
    distractor_contrast = params.lesion_contrast * 0.35 * torch.rand(n, generator=g)
    signal = (
        lesion * (lesion_contrast * y.float())[:, None, None]
        + distractor * (distractor_contrast * has_distractor)[:, None, None]
    )
    noise = params.noise * torch.randn(n, s, s, generator=g)

    if params.channels == 1:
        img = (tissue + signal + noise).clamp(0, 1)[:, None]
    else:
        # Beer-Lambert: eosin-stained stroma everywhere, haematoxylin-dense nuclei where
        # the lesion is, which gives the pink/purple look of H&E patches.
        h = torch.tensor(_HEMATOXYLIN)[None, :, None, None]
        e = torch.tensor(_EOSIN)[None, :, None, None]
        eosin_density = 0.15 + 0.9 * tissue
        haem_density = 0.15 + 0.6 * tissue + 2.5 * signal
        od = eosin_density[:, None] * e + haem_density[:, None] * h
        img = (torch.exp(-od) + noise[:, None]).clamp(0, 1)
    x = (img * 255).round_().to(torch.uint8)
    ids = tuple(f"synthetic-{params.seed}-{i:06d}" for i in range(n))
    info = {"generator": "synthetic", "seed": params.seed}
    return ImageDataset(x=x, y=y, classes=("no_lesion", "lesion"), ids=ids, info=info)
