"""Dataset loaders: real data counts, brain MRI trees (strict errors, the on-disk cache),
the synthetic set, parameters. PCam's layouts: test_dataset_pcam.py."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from tiny_layouts import grey16, make_brain_tree, palette_image, tensor_image, to8
from torchvision.io import write_jpeg

from testbed.builtins import dataset_brain_mri
from testbed.builtins.dataset_brain_mri import BrainMRIParams, load_brain_mri
from testbed.builtins.dataset_cache import cache_dir
from testbed.builtins.dataset_pcam import PCamParams, load_pcam
from testbed.builtins.dataset_synthetic import SyntheticParams, load_synthetic
from testbed.data import DatasetError
from testbed.pluginmanager import build_host

# The tests write fixtures with torchvision's encoders, deprecated in 0.29 (torchcodec).
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)


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
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path / "cache"))  # this test's own
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
    write_jpeg(tensor_image(99, 3), str(extra))
    grown = load_brain_mri(params, tmp_path)
    assert decodes == [12, 12, 13] and len(grown) == len(cold) + 1


def _keep_size_and_mtime(path: Path, grey: int) -> None:
    """Overwrite an image in place with a flat grey one of the same byte length (an
    uncompressed PNG's length depends on its shape alone) and restore its mtime."""
    st = path.stat()
    Image.fromarray(np.full((20, 20), grey, np.uint8)).save(path, "PNG", compress_level=0)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_an_edit_that_keeps_size_and_mtime_misses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path / "cache"))
    make_brain_tree(tmp_path / "mri")
    image = tmp_path / "mri" / "Training" / "no_tumor" / "image(0).jpg"
    Image.fromarray(np.full((20, 20), 10, np.uint8)).save(image, "PNG", compress_level=0)
    params = BrainMRIParams(task="meningioma", path="mri", image_size=20)
    before = load_brain_mri(params, tmp_path)
    i = before.ids.index("Training/no_tumor/image(0).jpg")
    assert int(before.x[i].max()) == 10
    _keep_size_and_mtime(image, 200)  # touch -r, cp -p, rsync -a: only the bytes tell
    assert int(load_brain_mri(params, tmp_path).x[i].min()) == 200


def test_stamps_key_serves_stand_ins_of_the_same_name_size_and_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a GPU lease relies on (scripts/lease): with TESTBED_DATA_KEY=stamps, empty
    files of the packed names, sizes and mtimes find the decoded cache of the real ones."""
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TESTBED_DATA_KEY", "stamps")
    make_brain_tree(tmp_path / "mri")
    params = BrainMRIParams(task="meningioma", path="mri", image_size=20)
    real = load_brain_mri(params, tmp_path)
    for f in (tmp_path / "mri").rglob("*.jpg"):
        st = f.stat()
        f.write_bytes(bytes(st.st_size))
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    stand_ins = load_brain_mri(params, tmp_path)
    assert torch.equal(stand_ins.x, real.x) and stand_ins.ids == real.ids
    monkeypatch.delenv("TESTBED_DATA_KEY")  # by content, the empty files are not images
    with pytest.raises(DatasetError, match="cannot decode image"):
        load_brain_mri(params, tmp_path)


def test_the_loaders_code_and_the_decoders_versions_key_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from testbed.builtins import dataset_cache

    src = Path(dataset_cache.__file__).parent
    copy = tmp_path / "testbed" / "builtins"
    copy.mkdir(parents=True)
    for f in src.glob("dataset_*.py"):
        shutil.copy(f, copy / f.name)
    shutil.copy(src.parent / "data.py", copy.parent / "data.py")
    digest = dataset_cache._decoder_digest.__wrapped__  # unmemoised: the copy is edited
    assert digest(copy) == dataset_cache._decoder_digest()
    for f in (copy / "dataset_files.py", copy.parent / "data.py"):  # each edit on its own
        text = f.read_text()
        f.write_text(text + "# resized another way\n")
        assert digest(copy) != dataset_cache._decoder_digest(), f.name
        f.write_text(text)
    assert digest(copy) == dataset_cache._decoder_digest()

    key = dataset_cache._cache_key("brain_mri", [("a.jpg", 1, "00")])
    monkeypatch.setattr(dataset_cache.torchvision, "__version__", "0.0.0")
    assert dataset_cache._cache_key("brain_mri", [("a.jpg", 1, "00")]) != key
    monkeypatch.setenv("TESTBED_DATA_KEY", "stamps")  # a lease: its own versions, images checked
    monkeypatch.setattr(dataset_cache.PIL, "__version__", "0.0.0")
    stamped = dataset_cache._cache_key("brain_mri", [("a.jpg", 1, 5)])
    monkeypatch.undo()
    monkeypatch.setenv("TESTBED_DATA_KEY", "stamps")
    assert dataset_cache._cache_key("brain_mri", [("a.jpg", 1, 5)]) == stamped


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


def test_brain_mri_16_bit_png_is_scaled_to_8_bits(tmp_path: Path) -> None:
    root = make_brain_tree(tmp_path / "b")
    deep = grey16(3)
    Image.fromarray(deep).save(root / "Training" / "no_tumor" / "scan16.png")
    palette_image(4).save(root / "Testing" / "no_tumor" / "scanP.png")
    ds = load_brain_mri(BrainMRIParams(task="meningioma", path=str(root), image_size=24))
    i = ds.ids.index("Training/no_tumor/scan16.png")
    assert ds.x.dtype == torch.uint8
    assert np.abs(ds.x[i, 0].numpy().astype(int) - to8(deep)).max() <= 1


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


def test_image_dataset_contract_on_hand_made_cases() -> None:
    from testbed.data import ImageDataset

    x = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    ok = ImageDataset(x, torch.tensor([0, 1, 1]), ("a", "b"))
    assert len(ok) == 3 and ok.image_size == 4
    bad = {
        "must lie in 0..1 (one per class), got 0..2": (x, torch.tensor([0, 1, 2]), ("a", "b")),
        "got -1..1": (x, torch.tensor([0, -1, 1]), ("a", "b")),
        "integer class indices, not torch.float32": (x, torch.tensor([0.0, 1.0, 1.0]), ("a", "b")),
        "two or more classes once each": (x, torch.tensor([0, 0, 0]), ("a",)),
        "once each: ('a', 'a')": (x, torch.tensor([0, 1, 1]), ("a", "a")),
        "square images": (
            torch.zeros(3, 1, 4, 5, dtype=torch.uint8),
            torch.tensor([0, 1, 1]),
            ("a", "b"),
        ),
        "one label per image": (x, torch.tensor([0, 1]), ("a", "b")),
    }
    for message, args in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            ImageDataset(*args)
