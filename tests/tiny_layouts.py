"""Tiny valid datasets in the on-disk layouts the real ones use, built at test time because
no image is committed: 8x8 ones the broken-data catalogue breaks one thing in each, and the
loaders' own trees (24x24 colour JPEGs, 96x96 PNGs, 16-bit and palette images)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import write_jpeg, write_png

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


def tensor_image(seed: int, channels: int, size: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, size, size), dtype=torch.uint8, generator=g)


def make_brain_tree(root: Path, per_class: int = 3) -> Path:
    """A tiny ImageFolder tree shaped like the Kaggle brain MRI set."""
    seed = 0
    for split in ("Training", "Testing"):
        for cls in MRI_CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                seed += 1
                write_jpeg(tensor_image(seed, 3), str(folder / f"image({i}).jpg"))
    return root


def make_pcam_png(root: Path, labels: list[int]) -> Path:
    (root / "images").mkdir(parents=True)
    rows = [["id", "label"]]
    for i, lab in enumerate(labels):
        sid = f"{i:040x}"
        write_png(tensor_image(i, 3, 96), str(root / "images" / f"{sid}.png"))
        rows.append([sid, str(lab)])
    write_labels(root / "labels.csv", rows)
    return root


def grey16(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, (size, size), dtype=np.uint16)


def to8(a: np.ndarray) -> np.ndarray:
    return np.rint(a.astype(np.float64) * 255 / 65535).astype(np.uint8)


def palette_image(seed: int, size: int = 24) -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
