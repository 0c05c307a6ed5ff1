"""Tiny valid datasets in the on-disk layouts the real ones use (8x8 images, built at test
time because no image is committed): the broken-data catalogue breaks one thing in each."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

MRI = "brain-tumor-mri"
PCAM = "pcam-sample"
MRI_CLASSES = ("no_tumor", "meningioma_tumor", "glioma_tumor")


def image(path: Path, channels: int, seed: int, fmt: str) -> None:
    rng = np.random.default_rng(seed)
    shape = (8, 8) if channels == 1 else (8, 8, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, fmt)


def build_mri(root: Path, per_class: int = 3) -> None:
    """<root>/brain-tumor-mri/{Training,Testing}/<class>/*.jpg, grey 8x8."""
    for s, split in enumerate(("Training", "Testing")):
        for c, cls in enumerate(MRI_CLASSES):
            folder = root / MRI / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                image(folder / f"{cls[:2]}{i}.jpg", 1, 100 * s + 10 * c + i, "JPEG")


def write_labels(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def build_pcam(root: Path, n: int = 8) -> None:
    """<root>/pcam-sample/images/pNN.png (RGB 8x8) + labels.csv (id,label)."""
    images = root / PCAM / "images"
    images.mkdir(parents=True)
    for i in range(n):
        image(images / f"p{i:02d}.png", 3, i, "PNG")
    write_labels(
        root / PCAM / "labels.csv",
        [["id", "label"]] + [[f"p{i:02d}", str(i % 2)] for i in range(n)],
    )


def build_kaggle(root: Path, n: int = 8) -> None:
    """<root>/pcam-sample/train/pNN.tif + train_labels.csv (the Kaggle layout)."""
    train = root / PCAM / "train"
    train.mkdir(parents=True)
    for i in range(n):
        image(train / f"p{i:02d}.tif", 3, i, "TIFF")
    rows = [["id", "label"]] + [[f"p{i:02d}", str(i % 2)] for i in range(n)]
    write_labels(root / PCAM / "train_labels.csv", rows)
