"""Dataset loaders: real data counts, strict errors on broken folders, the on-disk cache."""

from __future__ import annotations

import csv
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torchvision.io import write_jpeg, write_png

from testbed.builtins import dataset_brain_mri
from testbed.builtins.dataset_brain_mri import BrainMRIParams, load_brain_mri
from testbed.builtins.dataset_cache import cache_dir
from testbed.builtins.dataset_pcam import PCamParams, load_pcam, stratified_subsample
from testbed.builtins.dataset_synthetic import SyntheticParams, load_synthetic
from testbed.data import DatasetError
from testbed.pluginmanager import build_host

# The tests write fixtures with torchvision's encoders, deprecated in 0.29 (torchcodec).
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tests never read a developer's cache nor leave files in ~/.cache."""
    path = tmp_path_factory.mktemp("testbed-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESTBED_CACHE_DIR", str(path))
        yield path


def _image(seed: int, channels: int, size: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, size, size), dtype=torch.uint8, generator=g)


def make_brain_tree(root: Path, per_class: int = 3) -> Path:
    """A tiny ImageFolder tree shaped like the Kaggle brain MRI set."""
    seed = 0
    for split in ("Training", "Testing"):
        for cls in ("no_tumor", "meningioma_tumor", "glioma_tumor"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                seed += 1
                write_jpeg(_image(seed, 3), str(folder / f"image({i}).jpg"))
    return root


def make_pcam_png(root: Path, labels: list[int]) -> Path:
    (root / "images").mkdir(parents=True)
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label"])
        for i, lab in enumerate(labels):
            sid = f"{i:040x}"
            write_png(_image(i, 3, 96), str(root / "images" / f"{sid}.png"))
            w.writerow([sid, lab])
    return root


# --------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_brain_mri_meningioma_at_paper_size(data_root: Path) -> None:
    ds = load_brain_mri(BrainMRIParams(task="meningioma"), data_root)
    assert ds.x.shape == (1437, 1, 100, 100)
    assert ds.x.dtype == torch.uint8 and ds.y.dtype == torch.int64
    assert ds.classes == ("no_tumor", "meningioma_tumor")
    assert torch.bincount(ds.y).tolist() == [500, 937]
    assert len(set(ds.ids)) == 1437
    assert ds.info["duplicate_groups"] > 0 and ds.info["dropped_duplicates"] == 0
    # Real scans, not blank decodes: a reasonable spread of grey levels.
    assert 10 < ds.x.float().mean() < 200 and ds.x.float().std() > 20


@pytest.mark.realdata
def test_brain_mri_glioma_counts(data_root: Path) -> None:
    ds = load_brain_mri(BrainMRIParams(task="glioma", image_size=16), data_root)
    assert ds.x.shape == (1426, 1, 16, 16)
    assert ds.classes == ("no_tumor", "glioma_tumor")
    assert torch.bincount(ds.y).tolist() == [500, 926]


@pytest.mark.realdata
def test_brain_mri_dedupe_drops_byte_identical_files(data_root: Path) -> None:
    ds = load_brain_mri(BrainMRIParams(task="meningioma", image_size=16, dedupe=True), data_root)
    dropped = ds.info["dropped_duplicates"]
    assert isinstance(dropped, int) and dropped > 0
    assert len(ds) == 1437 - dropped
    assert ds.info["duplicate_files"] == dropped


@pytest.mark.realdata
def test_pcam_sample(data_root: Path) -> None:
    ds = load_pcam(PCamParams(), data_root)
    assert ds.x.shape == (2500, 3, 96, 96)
    assert ds.classes == ("normal", "metastatic")
    assert torch.bincount(ds.y).tolist() == [1250, 1250]
    assert ds.info["layout"] == "png_csv"
    assert len(set(ds.ids)) == 2500


@pytest.mark.realdata
def test_pcam_stratified_subsample(data_root: Path) -> None:
    a = load_pcam(PCamParams(n_samples=2150, image_size=32), data_root)
    assert a.x.shape == (2150, 3, 32, 32)
    assert torch.bincount(a.y).tolist() == [1075, 1075]
    b = load_pcam(PCamParams(n_samples=2150, image_size=32, subsample_seed=1), data_root)
    assert a.ids != b.ids
    with pytest.raises(DatasetError, match="2501"):
        load_pcam(PCamParams(n_samples=2501, image_size=32), data_root)


# --------------------------------------------------------------------------------------
# Brain MRI on small trees built here
# --------------------------------------------------------------------------------------


def test_relative_path_needs_data_root() -> None:
    with pytest.raises(DatasetError, match="needs a data root: pass --data-root"):
        load_brain_mri(BrainMRIParams(task="glioma"), None)
    with pytest.raises(DatasetError, match="'pcam' needs a data root"):
        load_pcam(PCamParams(), None)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found") as err:
        load_brain_mri(BrainMRIParams(task="glioma"), tmp_path)
    assert str(tmp_path / "brain-tumor-mri") in str(err.value)


def test_brain_tree_loads_with_absolute_path(tmp_path: Path) -> None:
    root = make_brain_tree(tmp_path / "mri")
    ds = load_brain_mri(BrainMRIParams(task="glioma", image_size=20, path=str(root)), None)
    assert ds.x.shape == (12, 1, 20, 20)
    assert torch.bincount(ds.y).tolist() == [6, 6]
    assert ds.ids[0] == "Training/no_tumor/image(0).jpg"


def test_empty_class_folder(tmp_path: Path) -> None:
    root = make_brain_tree(tmp_path / "mri")
    for f in (root / "Testing" / "glioma_tumor").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match="no images") as err:
        load_brain_mri(BrainMRIParams(task="glioma", path="mri"), tmp_path)
    assert str(root / "Testing" / "glioma_tumor") in str(err.value)


def test_missing_split_folder(tmp_path: Path) -> None:
    root = make_brain_tree(tmp_path / "mri")
    params = BrainMRIParams(task="glioma", path="mri", splits=("Training", "Validation"))
    with pytest.raises(DatasetError, match="Validation"):
        load_brain_mri(params, tmp_path)
    assert root.is_dir()


def test_corrupt_jpg(tmp_path: Path) -> None:
    root = make_brain_tree(tmp_path / "mri")
    bad = root / "Training" / "meningioma_tumor" / "image(1).jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DatasetError, match="cannot decode") as err:
        load_brain_mri(BrainMRIParams(task="meningioma", path="mri"), tmp_path)
    assert str(bad) in str(err.value)
    assert "\n" not in str(err.value)


def test_dedupe_keeps_first_copy(tmp_path: Path) -> None:
    root = make_brain_tree(tmp_path / "mri")
    src = root / "Training" / "no_tumor" / "image(0).jpg"
    shutil.copy(src, root / "Testing" / "no_tumor" / "copy.jpg")
    params = BrainMRIParams(task="glioma", path="mri", image_size=20)
    full = load_brain_mri(params, tmp_path)
    assert len(full) == 13 and full.info["duplicate_groups"] == 1
    deduped = load_brain_mri(params.model_copy(update={"dedupe": True}), tmp_path)
    assert len(deduped) == 12 and deduped.info["dropped_duplicates"] == 1
    assert "Training/no_tumor/image(0).jpg" in deduped.ids
    assert "Testing/no_tumor/copy.jpg" not in deduped.ids


def test_cache_hit_then_rebuilt_when_corrupt_or_data_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes: list[int] = []
    real_decode = dataset_brain_mri._decode_files

    def counting(files: Sequence[Path], *args: object) -> torch.Tensor:
        decodes.append(len(files))
        return real_decode(files, *args)  # type: ignore[arg-type]

    # load_brain_mri looks the decoder up in its own module, so it is patched there
    monkeypatch.setattr(dataset_brain_mri, "_decode_files", counting)
    make_brain_tree(tmp_path / "mri")
    params = BrainMRIParams(task="meningioma", path="mri", image_size=20)
    cold = load_brain_mri(params, tmp_path)
    warm = load_brain_mri(params, tmp_path)
    assert decodes == [12], "the second load must come from the cache"
    assert torch.equal(cold.x, warm.x) and torch.equal(cold.y, warm.y)
    assert cold.ids == warm.ids and cold.info == warm.info

    files = list(cache_dir().glob("brain_mri-*.pt"))
    assert files and not list(cache_dir().glob("*.tmp"))
    for f in files:
        f.write_bytes(b"garbage")
    again = load_brain_mri(params, tmp_path)
    assert decodes == [12, 12] and torch.equal(again.x, cold.x)
    load_brain_mri(params, tmp_path)
    assert decodes == [12, 12], "the rebuilt cache is used again"

    extra = tmp_path / "mri" / "Testing" / "no_tumor" / "new.jpg"
    write_jpeg(_image(99, 3), str(extra))
    grown = load_brain_mri(params, tmp_path)
    assert decodes == [12, 12, 13] and len(grown) == len(cold) + 1


# --------------------------------------------------------------------------------------
# PCam layouts and strict checks
# --------------------------------------------------------------------------------------


def test_pcam_png_csv_small(tmp_path: Path) -> None:
    make_pcam_png(tmp_path / "p", [0, 1, 0, 1, 1, 0])
    ds = load_pcam(PCamParams(path="p", image_size=48), tmp_path)
    assert ds.x.shape == (6, 3, 48, 48)
    assert ds.y.tolist() == [0, 1, 0, 1, 1, 0]
    assert ds.info["layout"] == "png_csv"


def _rewrite_labels(root: Path, text: str) -> None:
    (root / "labels.csv").write_text(text)


def test_pcam_label_names_missing_image(tmp_path: Path) -> None:
    root = make_pcam_png(tmp_path / "p", [0, 1])
    missing = root / "images" / f"{0:040x}.png"
    missing.unlink()
    with pytest.raises(DatasetError, match="labelled image missing") as err:
        load_pcam(PCamParams(path="p"), tmp_path)
    assert str(missing) in str(err.value)


def test_pcam_image_without_label(tmp_path: Path) -> None:
    root = make_pcam_png(tmp_path / "p", [0, 1])
    stray = root / "images" / "stray.png"
    write_png(_image(5, 3, 96), str(stray))
    with pytest.raises(DatasetError, match="no label row") as err:
        load_pcam(PCamParams(path="p"), tmp_path)
    assert str(stray) in str(err.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("id,label\n{a},0\n{b},2\n", "label must be 0 or 1"),
        ("name,target\n{a},0\n{b},1\n", "header must be 'id,label'"),
        ("id,label\n{a},0\n{a},1\n{b},1\n", "duplicate id"),
        ("id,label\n{a},0,x\n{b},1\n", "expected 2 columns"),
    ],
)
def test_pcam_bad_labels_csv(tmp_path: Path, text: str, match: str) -> None:
    root = make_pcam_png(tmp_path / "p", [0, 1])
    _rewrite_labels(root, text.format(a=f"{0:040x}", b=f"{1:040x}"))
    with pytest.raises(DatasetError, match=match) as err:
        load_pcam(PCamParams(path="p"), tmp_path)
    assert str(root / "labels.csv") in str(err.value)


def test_pcam_corrupt_png(tmp_path: Path) -> None:
    root = make_pcam_png(tmp_path / "p", [0, 1])
    bad = root / "images" / f"{1:040x}.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match="cannot decode") as err:
        load_pcam(PCamParams(path="p"), tmp_path)
    assert str(bad) in str(err.value)


def test_pcam_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    with pytest.raises(DatasetError, match="no known layout"):
        load_pcam(PCamParams(path="p"), tmp_path)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_pcam_kaggle_tif(tmp_path: Path) -> None:
    root = tmp_path / "kaggle"
    (root / "train").mkdir(parents=True)
    labels = [1, 0, 0, 1, 0, 1, 1, 0]
    rows = ["id,label"]
    for i, lab in enumerate(labels):
        sid = f"{i:040x}"
        arr = _image(i, 3, 96).permute(1, 2, 0).numpy()
        Image.fromarray(arr, "RGB").save(root / "train" / f"{sid}.tif")
        rows.append(f"{sid},{lab}")
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    ds = load_pcam(PCamParams(path=str(root)), None)
    assert ds.info["layout"] == "kaggle_tif"
    assert ds.x.shape == (8, 3, 96, 96) and ds.y.tolist() == labels
    assert torch.equal(ds.x[2], _image(2, 3, 96))

    sub = load_pcam(PCamParams(path=str(root), n_samples=4, layout="kaggle_tif"), None)
    assert torch.bincount(sub.y).tolist() == [2, 2]

    (root / "train" / f"{3:040x}.tif").write_bytes(b"II*\x00 broken")
    with pytest.raises(DatasetError, match="cannot decode"):
        load_pcam(PCamParams(path=str(root)), None)


def test_pcam_hdf5(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    x = torch.stack([_image(i, 3, 96) for i in range(6)]).permute(0, 2, 3, 1).numpy()
    prefix = "camelyonpatch_level_2_split_"
    with h5py.File(tmp_path / f"{prefix}train_x.h5", "w") as f:
        f.create_dataset("x", data=x)
    with h5py.File(tmp_path / f"{prefix}train_y.h5", "w") as f:
        f.create_dataset("y", data=labels.numpy().astype("uint8").reshape(-1, 1, 1, 1))
    ds = load_pcam(PCamParams(path=str(tmp_path)), None)
    assert ds.info["layout"] == "hdf5"
    assert ds.x.shape == (6, 3, 96, 96) and ds.y.tolist() == labels.tolist()
    assert torch.equal(ds.x[4], _image(4, 3, 96))
    sub = load_pcam(PCamParams(path=str(tmp_path), n_samples=4, subsample_seed=2), None)
    assert torch.bincount(sub.y).tolist() == [2, 2]
    for sid, img, lab in zip(sub.ids, sub.x, sub.y, strict=True):
        i = int(sid.split(":")[1])
        assert torch.equal(img, _image(i, 3, 96)) and int(lab) == int(labels[i])
    with pytest.raises(DatasetError, match=r"valid_x\.h5"):
        load_pcam(PCamParams(path=str(tmp_path), hdf5_splits=("train", "valid")), None)


def test_pcam_hdf5_without_h5py(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    (tmp_path / "camelyonpatch_level_2_split_train_x.h5").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"pip install testbed\[hdf5\]"):
        load_pcam(PCamParams(path=str(tmp_path)), None)


def test_stratified_subsample_keeps_shares() -> None:
    y = torch.tensor([0] * 30 + [1] * 10)
    idx = stratified_subsample(y, 20, seed=3)
    assert torch.bincount(y[idx]).tolist() == [15, 5]
    assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == 20
    assert torch.equal(idx, stratified_subsample(y, 20, seed=3))


# --------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------


def test_synthetic_deterministic_and_seeded() -> None:
    a = load_synthetic(SyntheticParams(n_samples=64))
    b = load_synthetic(SyntheticParams(n_samples=64))
    c = load_synthetic(SyntheticParams(n_samples=64, seed=1))
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)


@pytest.mark.parametrize("channels", [1, 3])
def test_synthetic_shapes_and_balance(channels: int) -> None:
    ds = load_synthetic(SyntheticParams(n_samples=101, channels=channels, image_size=40))
    assert ds.x.shape == (101, channels, 40, 40) and ds.x.dtype == torch.uint8
    assert ds.classes == ("no_lesion", "lesion")
    counts = torch.bincount(ds.y).tolist()
    assert counts == [51, 50]
    assert len(set(ds.ids)) == 101


def test_synthetic_lesions_are_brighter_in_grey() -> None:
    ds = load_synthetic(SyntheticParams(n_samples=400))
    peak = ds.x.float().amax(dim=(1, 2, 3))
    assert peak[ds.y == 1].mean() > peak[ds.y == 0].mean() + 20


def test_synthetic_h_and_e_tint() -> None:
    ds = load_synthetic(SyntheticParams(n_samples=50, channels=3))
    r, g, b = ds.x.float().mean(dim=(0, 2, 3)).tolist()
    # Pink/purple: green absorbed most by both stains.
    assert g < r and g < b


def test_params_validation() -> None:
    with pytest.raises(ValidationError):
        BrainMRIParams(task="pituitary")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        BrainMRIParams.model_validate({"task": "glioma", "size": 64})
    with pytest.raises(ValidationError):
        SyntheticParams(n_samples=2)
    with pytest.raises(ValidationError):
        SyntheticParams(channels=2)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        PCamParams(layout="zip")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        PCamParams(n_samples=0)


def test_registered_through_the_plugin_system() -> None:
    host = build_host(autoload=False)
    names = host.registry["datasets"].names()
    assert {"brain_mri", "pcam", "synthetic"} <= set(names)
    ds = host.registry.build("datasets", "synthetic", {"n_samples": 8}, data_root=None)
    assert ds.x.shape == (8, 1, 32, 32)


# --------------------------------------------------------------------------------------
# 16-bit and palette images (issue 10): converted, never a dtype error from the stack
# --------------------------------------------------------------------------------------


def _grey16(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, (size, size), dtype=np.uint16)


def _to8(a: np.ndarray) -> np.ndarray:
    return np.rint(a.astype(np.float64) * 255 / 65535).astype(np.uint8)


def _palette(seed: int, size: int = 24) -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)


def test_pcam_png_16_bit_and_palette_images_are_converted(tmp_path: Path) -> None:
    root = make_pcam_png(tmp_path / "p", [0, 1, 0, 1])
    grey16 = _grey16(1, 96)
    Image.fromarray(grey16).save(root / "images" / f"{1:040x}.png")  # mode I;16
    pal = _palette(2, 96)
    pal.save(root / "images" / f"{2:040x}.png")
    ds = load_pcam(PCamParams(path="p"), tmp_path)
    assert ds.x.dtype == torch.uint8 and ds.x.shape == (4, 3, 96, 96)
    for c in range(3):  # grey, scaled (not clipped) to 8 bits, in all three channels
        assert np.abs(ds.x[1, c].numpy().astype(int) - _to8(grey16)).max() <= 1
    assert np.array_equal(ds.x[2].permute(1, 2, 0).numpy(), np.asarray(pal.convert("RGB")))


def test_brain_mri_16_bit_png_is_scaled_to_8_bits(tmp_path: Path) -> None:
    root = make_brain_tree(tmp_path / "b")
    grey16 = _grey16(3)
    Image.fromarray(grey16).save(root / "Training" / "no_tumor" / "scan16.png")
    _palette(4).save(root / "Testing" / "no_tumor" / "scanP.png")
    ds = load_brain_mri(BrainMRIParams(task="meningioma", path=str(root), image_size=24))
    i = ds.ids.index("Training/no_tumor/scan16.png")
    assert ds.x.dtype == torch.uint8
    assert np.abs(ds.x[i, 0].numpy().astype(int) - _to8(grey16)).max() <= 1


def test_pcam_kaggle_16_bit_tif_is_scaled_not_clipped(tmp_path: Path) -> None:
    root = tmp_path / "kaggle"
    (root / "train").mkdir(parents=True)
    grey16 = _grey16(5, 96)
    Image.fromarray(grey16).save(root / "train" / "a.tif")
    _palette(6, 96).save(root / "train" / "b.tif")
    (root / "train_labels.csv").write_text("id,label\na,0\nb,1\n")
    ds = load_pcam(PCamParams(path=str(root)), None)
    assert np.abs(ds.x[0, 0].numpy().astype(int) - _to8(grey16)).max() <= 1
    expected = np.asarray(_palette(6, 96).convert("RGB"))
    assert np.array_equal(ds.x[1].permute(1, 2, 0).numpy(), expected)


def test_pcam_labels_csv_with_bom_loads(tmp_path: Path) -> None:
    root = make_pcam_png(tmp_path / "p", [0, 1])
    text = (root / "labels.csv").read_text()
    (root / "labels.csv").write_text(text, encoding="utf-8-sig")  # as spreadsheets save it
    assert load_pcam(PCamParams(path="p"), tmp_path).y.tolist() == [0, 1]


def test_synthetic_beyond_memory_is_refused_before_allocating() -> None:
    with pytest.raises(DatasetError, match="n_samples=100000000 images of 3 x 4096 x 4096"):
        load_synthetic(SyntheticParams(n_samples=10**8, image_size=4096, channels=3))


@pytest.mark.parametrize("field", ["seed", "subsample_seed"])
def test_dataset_seeds_are_bounded(field: str) -> None:
    model = SyntheticParams if field == "seed" else PCamParams
    for bad in (-1, 2**63, 2**64):
        with pytest.raises(ValidationError):
            model(**{field: bad})
    model(**{field: 2**63 - 1})
