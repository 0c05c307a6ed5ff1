"""The PCam loader: its three layouts (PNG + CSV, Kaggle TIFFs, HDF5), strict errors on
broken files, 16-bit and palette images, and the stratified subsample."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_layouts import grey16, make_pcam_png, palette_image, tensor_image, to8
from torchvision.io import write_png

from testbed.builtins.dataset_pcam import PCamParams, load_pcam, stratified_subsample
from testbed.data import DatasetError

# The tests write fixtures with torchvision's encoders, deprecated in 0.29 (torchcodec).
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)


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


def test_pcam_label_names_missingtensor_image(tmp_path: Path) -> None:
    root = make_pcam_png(tmp_path / "p", [0, 1])
    missing = root / "images" / f"{0:040x}.png"
    missing.unlink()
    with pytest.raises(DatasetError, match="labelled image missing") as err:
        load_pcam(PCamParams(path="p"), tmp_path)
    assert str(missing) in str(err.value)


def test_pcam_image_without_label(tmp_path: Path) -> None:
    root = make_pcam_png(tmp_path / "p", [0, 1])
    stray = root / "images" / "stray.png"
    write_png(tensor_image(5, 3, 96), str(stray))
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
        arr = tensor_image(i, 3, 96).permute(1, 2, 0).numpy()
        Image.fromarray(arr, "RGB").save(root / "train" / f"{sid}.tif")
        rows.append(f"{sid},{lab}")
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    ds = load_pcam(PCamParams(path=str(root)), None)
    assert ds.info["layout"] == "kaggle_tif"
    assert ds.x.shape == (8, 3, 96, 96) and ds.y.tolist() == labels
    assert torch.equal(ds.x[2], tensor_image(2, 3, 96))

    sub = load_pcam(PCamParams(path=str(root), n_samples=4, layout="kaggle_tif"), None)
    assert torch.bincount(sub.y).tolist() == [2, 2]

    (root / "train" / f"{3:040x}.tif").write_bytes(b"II*\x00 broken")
    with pytest.raises(DatasetError, match="cannot decode"):
        load_pcam(PCamParams(path=str(root)), None)


def test_pcam_hdf5(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    x = torch.stack([tensor_image(i, 3, 96) for i in range(6)]).permute(0, 2, 3, 1).numpy()
    prefix = "camelyonpatch_level_2_split_"
    with h5py.File(tmp_path / f"{prefix}train_x.h5", "w") as f:
        f.create_dataset("x", data=x)
    with h5py.File(tmp_path / f"{prefix}train_y.h5", "w") as f:
        f.create_dataset("y", data=labels.numpy().astype("uint8").reshape(-1, 1, 1, 1))
    ds = load_pcam(PCamParams(path=str(tmp_path)), None)
    assert ds.info["layout"] == "hdf5"
    assert ds.x.shape == (6, 3, 96, 96) and ds.y.tolist() == labels.tolist()
    assert torch.equal(ds.x[4], tensor_image(4, 3, 96))
    sub = load_pcam(PCamParams(path=str(tmp_path), n_samples=4, subsample_seed=2), None)
    assert torch.bincount(sub.y).tolist() == [2, 2]
    for sid, img, lab in zip(sub.ids, sub.x, sub.y, strict=True):
        i = int(sid.split(":")[1])
        assert torch.equal(img, tensor_image(i, 3, 96)) and int(lab) == int(labels[i])
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
# 16-bit and palette images (issue 10): converted, never a dtype error from the stack
# --------------------------------------------------------------------------------------


def test_pcam_png_16_bit_and_palette_images_are_converted(tmp_path: Path) -> None:
    root = make_pcam_png(tmp_path / "p", [0, 1, 0, 1])
    deep = grey16(1, 96)
    Image.fromarray(deep).save(root / "images" / f"{1:040x}.png")  # mode I;16
    pal = palette_image(2, 96)
    pal.save(root / "images" / f"{2:040x}.png")
    ds = load_pcam(PCamParams(path="p"), tmp_path)
    assert ds.x.dtype == torch.uint8 and ds.x.shape == (4, 3, 96, 96)
    for c in range(3):  # grey, scaled (not clipped) to 8 bits, in all three channels
        assert np.abs(ds.x[1, c].numpy().astype(int) - to8(deep)).max() <= 1
    assert np.array_equal(ds.x[2].permute(1, 2, 0).numpy(), np.asarray(pal.convert("RGB")))


def test_pcam_kaggle_16_bit_tif_is_scaled_not_clipped(tmp_path: Path) -> None:
    root = tmp_path / "kaggle"
    (root / "train").mkdir(parents=True)
    deep = grey16(5, 96)
    Image.fromarray(deep).save(root / "train" / "a.tif")
    palette_image(6, 96).save(root / "train" / "b.tif")
    (root / "train_labels.csv").write_text("id,label\na,0\nb,1\n")
    ds = load_pcam(PCamParams(path=str(root)), None)
    assert np.abs(ds.x[0, 0].numpy().astype(int) - to8(deep)).max() <= 1
    expected = np.asarray(palette_image(6, 96).convert("RGB"))
    assert np.array_equal(ds.x[1].permute(1, 2, 0).numpy(), expected)


def test_pcam_labels_csv_with_bom_loads(tmp_path: Path) -> None:
    root = make_pcam_png(tmp_path / "p", [0, 1])
    text = (root / "labels.csv").read_text()
    (root / "labels.csv").write_text(text, encoding="utf-8-sig")  # as spreadsheets save it
    assert load_pcam(PCamParams(path="p"), tmp_path).y.tolist() == [0, 1]
