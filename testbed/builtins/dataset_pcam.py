"""PatchCamelyon (Veeling et al. 2018), in its three common distributions.

A folder of PNGs with labels.csv, Kaggle's TIFFs with train_labels.csv, or the original
HDF5 files; the layout is detected from which files exist. Labels and images are
checked one against the other, and a class-stratified subsample is drawn before any
pixel is read. Registered as ``pcam`` by datasets.py.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torchvision.io import ImageReadMode

from testbed.builtins.dataset_cache import _file_stamp, cached
from testbed.builtins.dataset_files import (
    _dataset,
    _decode_files,
    _one_line,
    _resize,
    resolve_path,
)
from testbed.data import DatasetError, ImageDataset, check_fits_in_memory, pil_to_array
from testbed.registry import Params
from testbed.scenario import MAX_SEED

PCAM_CLASSES = ("normal", "metastatic")
HDF5_PREFIX = "camelyonpatch_level_2_split_"


class PCamParams(Params):
    path: str = Field(
        "pcam-sample", description="Dataset folder, relative to the data root or absolute."
    )
    layout: Literal["auto", "png_csv", "kaggle_tif", "hdf5"] = Field(
        "auto",
        description=(
            "png_csv: images/<id>.png + labels.csv; kaggle_tif: train/<id>.tif + "
            "train_labels.csv; hdf5: the original PCam .h5 files; auto: by which files exist."
        ),
    )
    n_samples: int | None = Field(
        None, ge=1, description="Class-stratified random subsample of this size (None: all)."
    )
    subsample_seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the subsample.")
    image_size: int = Field(96, ge=8, description="Images are resized to this square size.")
    hdf5_splits: tuple[str, ...] = Field(
        ("train",), min_length=1, description="PCam splits pooled (hdf5 layout only)."
    )


def _detect_layout(root: Path) -> str:
    if (root / "labels.csv").is_file() and (root / "images").is_dir():
        return "png_csv"
    if (root / "train_labels.csv").is_file() and (root / "train").is_dir():
        return "kaggle_tif"
    if any(root.glob(f"{HDF5_PREFIX}*_x.h5")):
        return "hdf5"
    raise DatasetError(
        f"dataset 'pcam': no known layout in {root} (expected labels.csv + images/, "
        f"train_labels.csv + train/, or {HDF5_PREFIX}<split>_x.h5)"
    )


def _read_labels_csv(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise DatasetError(f"dataset 'pcam': label file not found: {path}")
    labels: dict[str, int] = {}
    rows: Any = None
    try:
        # utf-8-sig: a spreadsheet's BOM must not turn the header into '\ufeffid'
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = csv.reader(fh)
            header = next(rows, None)
            if header is None or [h.strip() for h in header] != ["id", "label"]:
                raise DatasetError(
                    f"dataset 'pcam': {path}: header must be 'id,label', got {header!r}"
                )
            for lineno, row in enumerate(rows, start=2):
                if not row:
                    continue
                if len(row) != 2:
                    raise DatasetError(f"dataset 'pcam': {path}:{lineno}: expected 2 columns")
                sid, lab = row[0].strip(), row[1].strip()
                if not sid:
                    raise DatasetError(f"dataset 'pcam': {path}:{lineno}: empty id")
                if lab not in ("0", "1"):
                    raise DatasetError(
                        f"dataset 'pcam': {path}:{lineno}: label must be 0 or 1, got {lab!r}"
                    )
                if sid in labels:
                    raise DatasetError(f"dataset 'pcam': {path}:{lineno}: duplicate id {sid!r}")
                labels[sid] = int(lab)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"dataset 'pcam': {path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:  # a NUL byte, a field over the csv module's size limit
        line = rows.line_num if rows is not None else 1
        raise DatasetError(f"dataset 'pcam': {path}:{line}: malformed CSV: {exc}") from None
    if not labels:
        raise DatasetError(f"dataset 'pcam': {path}: no label rows")
    return labels


def _match_images(labels: dict[str, int], folder: Path, suffix: str) -> list[str]:
    """Ids, sorted; every label row must have its image and every image its label row."""
    if not folder.is_dir():
        raise DatasetError(f"dataset 'pcam': image folder not found: {folder}")
    on_disk = {f.stem for f in folder.iterdir() if f.suffix.lower() == suffix and f.is_file()}
    for sid in sorted(labels):
        if sid not in on_disk:
            raise DatasetError(f"dataset 'pcam': labelled image missing: {folder / (sid + suffix)}")
    for sid in sorted(on_disk):
        if sid not in labels:
            raise DatasetError(f"dataset 'pcam': image has no label row: {folder / (sid + suffix)}")
    return sorted(labels)


def stratified_subsample(y: torch.Tensor, n: int, seed: int, where: str = "") -> torch.Tensor:
    """Sorted indices of ``n`` samples, each class kept at its share (largest remainder)."""
    total = y.numel()
    if n > total:
        prefix = f"{where}: " if where else ""
        raise DatasetError(f"{prefix}n_samples={n} exceeds the {total} samples available")
    classes, counts = torch.unique(y, return_counts=True)
    exact = [n * int(c) / total for c in counts]
    take = [math.floor(e) for e in exact]
    # Hand the samples lost to flooring to the classes with the largest remainders.
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - take[i]), i))
    for i in by_remainder[: n - sum(take)]:
        take[i] += 1
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for cls, k in zip(classes.tolist(), take, strict=True):
        members = torch.nonzero(y == cls).flatten()
        chosen.append(members[torch.randperm(members.numel(), generator=g)[:k]])
    return torch.cat(chosen).sort().values


def _decode_tifs(files: Sequence[Path], size: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    def one(f: Path) -> torch.Tensor:
        try:
            with Image.open(f) as im:
                arr = pil_to_array(im, "RGB")
        except Exception as exc:
            raise DatasetError(f"cannot decode image {f}: {_one_line(exc)}") from None
        return _resize(torch.from_numpy(np.array(arr)).permute(2, 0, 1), size)

    if not files:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    with ThreadPool(2) as pool:
        return torch.stack(pool.map(one, files, chunksize=16))


def _load_pcam_files(params: PCamParams, root: Path, layout: str) -> dict[str, Any]:
    if layout == "png_csv":
        label_file, folder, suffix = root / "labels.csv", root / "images", ".png"
    else:
        label_file, folder, suffix = root / "train_labels.csv", root / "train", ".tif"
    labels = _read_labels_csv(label_file)
    ids = _match_images(labels, folder, suffix)
    y_all = torch.tensor([labels[i] for i in ids], dtype=torch.int64)
    if params.n_samples is not None:
        sel = stratified_subsample(
            y_all, params.n_samples, params.subsample_seed, f"dataset 'pcam' at {root}"
        ).tolist()
        ids = [ids[i] for i in sel]
    files = [folder / (i + suffix) for i in ids]
    check_fits_in_memory("pcam", str(len(files)), len(files), 3, params.image_size, 6)
    key = (
        "pcam",
        str(root),
        layout,
        _file_stamp([label_file, *files], root),
        params.model_dump(exclude={"path", "layout"}),
    )

    def build() -> dict[str, Any]:
        if layout == "png_csv":
            x = _decode_files(files, ImageReadMode.RGB, params.image_size)
        else:
            x = _decode_tifs(files, params.image_size)
        y = torch.tensor([labels[i] for i in ids], dtype=torch.int64)
        info = {"source": str(root), "layout": layout, "available": len(labels)}
        return {"x": x, "y": y, "ids": list(ids), "info": info}

    return cached("pcam", key, build)


def _load_pcam_hdf5(params: PCamParams, root: Path) -> dict[str, Any]:
    try:
        import h5py
    except ImportError:
        raise DatasetError(
            f"dataset 'pcam': {root} holds HDF5 files; reading them needs h5py: "
            "pip install testbed[hdf5]"
        ) from None
    files: list[tuple[str, Path, Path]] = []
    ys: list[torch.Tensor] = []
    for split in params.hdf5_splits:
        xf = root / f"{HDF5_PREFIX}{split}_x.h5"
        yf = root / f"{HDF5_PREFIX}{split}_y.h5"
        for f in (xf, yf):
            if not f.is_file():
                raise DatasetError(f"dataset 'pcam': HDF5 file not found: {f}")
        try:
            with h5py.File(yf, "r") as fy:
                y = torch.from_numpy(fy["y"][()].reshape(-1).astype("int64"))
        except Exception as exc:
            raise DatasetError(f"dataset 'pcam': cannot read {yf}: {_one_line(exc)}") from None
        bad = ~((y == 0) | (y == 1))
        if bad.any():
            raise DatasetError(f"dataset 'pcam': {yf}: label must be 0 or 1, got {int(y[bad][0])}")
        files.append((split, xf, yf))
        ys.append(y)
    y_all = torch.cat(ys)
    # Choose first and read only the chosen rows: the full train split is 7 GB of pixels.
    if params.n_samples is not None:
        sel = stratified_subsample(
            y_all, params.n_samples, params.subsample_seed, f"dataset 'pcam' at {root}"
        )
    else:
        sel = torch.arange(y_all.numel())
    check_fits_in_memory("pcam", str(sel.numel()), sel.numel(), 3, params.image_size, 6)
    keep = torch.zeros(y_all.numel(), dtype=torch.bool)
    keep[sel] = True
    xs: list[torch.Tensor] = []
    ids: list[str] = []
    offset = 0
    for (split, xf, _), y in zip(files, ys, strict=True):
        mine = keep[offset : offset + y.numel()]
        try:
            with h5py.File(xf, "r") as fx:
                dx = fx["x"]
                if dx.ndim != 4 or dx.shape[0] != y.numel() or dx.shape[3] != 3:
                    raise DatasetError(
                        f"dataset 'pcam': {xf}: expected x of shape N x H x W x 3 matching "
                        f"{y.numel()} labels, got {tuple(dx.shape)}"
                    )
                for start in range(0, y.numel(), 4096):
                    rows = mine[start : start + 4096]
                    if not rows.any():
                        continue
                    block = torch.from_numpy(dx[start : start + 4096])[rows]
                    xs.append(_resize(block.permute(0, 3, 1, 2).contiguous(), params.image_size))
        except DatasetError:
            raise
        except Exception as exc:
            raise DatasetError(f"dataset 'pcam': cannot read {xf}: {_one_line(exc)}") from None
        ids += [f"{split}:{i}" for i in torch.nonzero(mine).flatten().tolist()]
        offset += y.numel()
    size = params.image_size
    x = torch.cat(xs) if xs else torch.empty(0, 3, size, size, dtype=torch.uint8)
    info = {"source": str(root), "layout": "hdf5", "available": int(y_all.numel())}
    return {"x": x, "y": y_all[keep], "ids": ids, "info": info}


def load_pcam(params: PCamParams, data_root: Path | None = None) -> ImageDataset:
    """PatchCamelyon patches, RGB; label 1 = tumour in the centre 32 x 32 pixels."""
    root = resolve_path("pcam", params.path, data_root)
    layout = _detect_layout(root) if params.layout == "auto" else params.layout
    if layout == "hdf5":
        payload = _load_pcam_hdf5(params, root)
    else:
        payload = _load_pcam_files(params, root, layout)
    return _dataset(payload, PCAM_CLASSES)
