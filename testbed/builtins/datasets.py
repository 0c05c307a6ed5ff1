"""Built-in datasets: the paper's brain MRI tasks, PatchCamelyon and an offline synthetic set.

Every loader returns an in-memory ``ImageDataset`` (uint8, N x C x H x W) and fails with a
one-line ``DatasetError`` naming the offending path, so that a user with a half-copied
data folder learns what to fix rather than reading a traceback.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from pydantic import Field
from torchvision.io import ImageReadMode, decode_image

from testbed import hookimpl
from testbed.data import DatasetError, ImageDataset, check_fits_in_memory, pil_to_array, to_uint8
from testbed.registry import KindRegistry, Params

CACHE_ENV = "TESTBED_CACHE_DIR"
# Bump when the cached payload or the decoding changes, so old caches are never reused.
CACHE_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PCAM_CLASSES = ("normal", "metastatic")
HDF5_PREFIX = "camelyonpatch_level_2_split_"
_TV_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


MAX_SEED = 2**63 - 1


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


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "testbed"


def _cache_key(*parts: object) -> str:
    return hashlib.blake2b(repr((CACHE_VERSION, *parts)).encode(), digest_size=16).hexdigest()


def _file_stamp(files: Sequence[Path], base: Path) -> list[tuple[str, int, int]]:
    """Names, sizes and mtimes: cheap to read, and any edit to the data changes them."""
    out = []
    for f in files:
        st = f.stat()
        out.append((f.relative_to(base).as_posix(), st.st_size, st.st_mtime_ns))
    return out


def _load_cache(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(payload, dict) or payload.get("version") != CACHE_VERSION:
            return None
        x, y = payload["x"], payload["y"]
        ok = (
            isinstance(x, torch.Tensor)
            and isinstance(y, torch.Tensor)
            and x.dtype == torch.uint8
            and x.ndim == 4
            and y.dtype == torch.int64
            and y.shape == (x.shape[0],)
            and len(payload["ids"]) == x.shape[0]
            and isinstance(payload["info"], dict)
        )
        return payload if ok else None
    except Exception:
        # A truncated or foreign file is just a cache miss; it is rebuilt and replaced.
        return None


def _save_cache(path: Path, payload: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(payload, fh)
            # Atomic, so a concurrent reader never sees a half-written cache.
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        # An unwritable cache folder costs only speed, never a run.
        pass


def cached(
    kind: str, key_parts: tuple[object, ...], build: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """The payload ``build()`` returns ({x, y, ids, info}), kept on disk across runs."""
    path = cache_dir() / f"{kind}-{_cache_key(*key_parts)}.pt"
    # Whether it was a hit stays out of ``info``: reports of equal runs must be equal.
    payload = _load_cache(path)
    if payload is None:
        payload = {"version": CACHE_VERSION, **build()}
        _save_cache(path, payload)
    return payload


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


# --------------------------------------------------------------------------------------
# Brain tumour MRI (Bhuvaji et al. 2020), the paper's two binary tasks
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# PatchCamelyon (Veeling et al. 2018), in its three common distributions
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Synthetic lesions: offline, deterministic, fast
# --------------------------------------------------------------------------------------


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


@hookimpl
def testbed_register_datasets(registry: KindRegistry) -> None:
    registry.add(
        "brain_mri",
        load_brain_mri,
        params=BrainMRIParams,
        description="Kaggle brain tumour MRI (Bhuvaji 2020): meningioma or glioma vs no tumour",
    )
    registry.add(
        "pcam",
        load_pcam,
        params=PCamParams,
        description="PatchCamelyon lymph-node patches, 96x96 RGB: metastatic vs normal",
    )
    registry.add(
        "synthetic",
        load_synthetic,
        params=SyntheticParams,
        description="Generated offline: smooth tissue with or without a small lesion",
    )
