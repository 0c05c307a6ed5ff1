"""Helpers the built-in file-backed loaders share: paths, decoding, one-line errors.

Resolving a dataset folder against the data root, decoding and resizing image files on
two threads, and turning a cached payload into an ``ImageDataset``; every failure is a
one-line ``DatasetError`` naming the offending path. The brain MRI and PCam loaders
(dataset_brain_mri.py, dataset_pcam.py) both build on these.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_image

from testbed.data import DatasetError, ImageDataset, to_uint8

_TV_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def resolve_path(name: str, path: str, data_root: Path | None) -> Path:
    """``path`` if absolute, else under ``data_root``; the folder must exist."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        if data_root is None:
            raise DatasetError(
                f"dataset {name!r} needs a data root: pass --data-root or set TESTBED_DATA_ROOT"
            )
        p = Path(data_root) / p
    if not p.is_dir():
        raise DatasetError(f"dataset {name!r}: folder not found: {p}")
    return p


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    if img.shape[-2:] == (size, size):
        return img
    return TF.resize(img, [size, size], antialias=True)


def _decode_files(files: Sequence[Path], mode: ImageReadMode, size: int) -> torch.Tensor:
    """Decode and resize images with two threads (torchvision releases the GIL)."""

    def one(f: Path) -> torch.Tensor:
        try:
            data = torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8)
            img = to_uint8(decode_image(data, mode=mode))
        except Exception as exc:
            raise DatasetError(f"cannot decode image {f}: {_one_line(exc)}") from None
        return _resize(img, size)

    if not files:
        channels = 1 if mode == ImageReadMode.GRAY else 3
        return torch.empty(0, channels, size, size, dtype=torch.uint8)
    # torchvision 0.29 deprecates its decoders in favour of torchcodec, warning on every
    # call; the filter is set here in the calling thread because the filter list is global
    # and catch_warnings is not safe to enter from the worker threads themselves.
    with warnings.catch_warnings(), ThreadPool(2) as pool:
        warnings.filterwarnings("ignore", message=_TV_DEPRECATION, category=DeprecationWarning)
        images = pool.map(one, files, chunksize=16)
    return torch.stack(images)


def _dataset(payload: dict[str, Any], classes: tuple[str, ...]) -> ImageDataset:
    return ImageDataset(
        x=payload["x"],
        y=payload["y"],
        classes=classes,
        ids=tuple(payload["ids"]),
        info=dict(payload["info"]),
    )
