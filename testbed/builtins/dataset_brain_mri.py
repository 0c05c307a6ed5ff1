"""The brain tumour MRI dataset (Bhuvaji et al. 2020): the paper's two binary tasks.

Kaggle's folder layout (<split>/<class>/<image>), meningioma or glioma against no
tumour, both splits pooled into one grey dataset for the federation to re-split, with
byte-identical duplicates counted (and dropped on request). Registered as ``brain_mri``
by datasets.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torchvision.io import ImageReadMode

from testbed.builtins.dataset_cache import _file_stamp, cached
from testbed.builtins.dataset_files import _dataset, _decode_files, resolve_path
from testbed.data import DatasetError, ImageDataset, check_fits_in_memory
from testbed.registry import Params

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class BrainMRIParams(Params):
    task: Literal["meningioma", "glioma"] = Field(
        description="Tumour class set against no_tumor (the paper's two detection tasks)."
    )
    image_size: int = Field(100, ge=8, description="Images are resized to this square size.")
    path: str = Field(
        "brain-tumor-mri",
        description="Dataset folder, relative to the data root or absolute.",
    )
    splits: tuple[str, ...] = Field(
        ("Training", "Testing"),
        min_length=1,
        description="Split folders pooled into one dataset (the federation re-splits it).",
    )
    dedupe: bool = Field(
        False,
        description="Drop byte-identical duplicate files, keeping the first in load order.",
    )


def _list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"dataset 'brain_mri': class folder not found: {folder}")
    files = sorted(
        (f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda f: f.name,
    )
    if not files:
        raise DatasetError(f"dataset 'brain_mri': no images in class folder {folder}")
    return files


def load_brain_mri(params: BrainMRIParams, data_root: Path | None = None) -> ImageDataset:
    """Meningioma or glioma vs no tumour; grey, 1 channel, both splits pooled.

    Load order is split (as listed), then class (no_tumor first), then file name; ``dedupe``
    keeps the first copy in that order, so a Training copy wins over a Testing one.
    """
    root = resolve_path("brain_mri", params.path, data_root)
    classes = ("no_tumor", f"{params.task}_tumor")
    files: list[Path] = []
    labels: list[int] = []
    for split in params.splits:
        if not (root / split).is_dir():
            raise DatasetError(f"dataset 'brain_mri': split folder not found: {root / split}")
        for label, cls in enumerate(classes):
            found = _list_images(root / split / cls)
            files += found
            labels += [label] * len(found)

    check_fits_in_memory("brain_mri", str(len(files)), len(files), 1, params.image_size, 6)
    key = (
        "brain_mri",
        str(root),
        _file_stamp(files, root),
        params.model_dump(exclude={"path"}),
    )

    def build() -> dict[str, Any]:
        digests = [hashlib.blake2b(f.read_bytes(), digest_size=16).digest() for f in files]
        first: dict[bytes, int] = {}
        group_sizes: dict[bytes, int] = {}
        conflicts: set[bytes] = set()
        for i, d in enumerate(digests):
            group_sizes[d] = group_sizes.get(d, 0) + 1
            if d in first:
                if labels[first[d]] != labels[i]:
                    conflicts.add(d)
            else:
                first[d] = i
        dup_groups = sum(1 for n in group_sizes.values() if n > 1)
        dup_files = sum(n - 1 for n in group_sizes.values())
        keep = (
            [i for i, d in enumerate(digests) if first[d] == i]
            if params.dedupe
            else list(range(len(files)))
        )
        kept = [files[i] for i in keep]
        x = _decode_files(kept, ImageReadMode.GRAY, params.image_size)
        y = torch.tensor([labels[i] for i in keep], dtype=torch.int64)
        info: dict[str, Any] = {
            "source": str(root),
            "splits": list(params.splits),
            "files": len(files),
            "duplicate_groups": dup_groups,
            "duplicate_files": dup_files,
            "duplicate_label_conflicts": len(conflicts),
            "dropped_duplicates": len(files) - len(keep),
        }
        ids = [f.relative_to(root).as_posix() for f in kept]
        return {"x": x, "y": y, "ids": ids, "info": info}

    return _dataset(cached("brain_mri", key, build), classes)
