"""The broken-data catalogue. Broken data cannot be committed (no images in git), so each
case builds a small valid dataset in tmp_path, breaks one thing, and runs on it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from broken_cli import SCENARIO_FILES, USER_ERROR, assert_no_run_folder, assert_reported, run_cli
from tiny_layouts import MRI, PCAM, build_kaggle, build_mri, build_pcam, image

pytestmark = pytest.mark.usefixtures("isolated_cli")


DATA_SCENARIO = """
[scenario]
name = "broken-data"

[data]
name = "{dataset}"
params = {params}

[partition]
params = {{ chunks_per_client = 1 }}

[model]
params = {{ conv_channels = [4, 4, 8, 8, 8, 8], fc_units = [16, 16, 16, 8] }}

[federation]
clients = 2
rounds = 1
local_epochs = 1
batch_size = 4
device = "cpu"

[threat_model]
samples_per_adversary = 2

[[attacks]]
name = "fgsm"
params = {{ eps = 0.03 }}

[report]
plots = false
save_weights = false
"""


def _rewrite_labels(root: Path, edit: Callable[[list[str]], list[str]]) -> None:
    path = root / PCAM / "labels.csv"
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")


def _corrupt(rel: str) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        (root / rel).write_bytes(np.random.default_rng(7).bytes(200))

    return go


def _truncate(rel: str) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[: len(data) // 2])

    return go


def _empty_folder(rel: str) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        shutil.rmtree(root / rel)
        (root / rel).mkdir()

    return go


def _remove(rel: str) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        p = root / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return go


def _only_non_images(root: Path) -> None:
    folder = root / MRI / "Training" / "no_tumor"
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "notes.txt").write_text("scans to follow\n")
    (folder / "scan0.dcm").write_bytes(b"DICM")


def _extra_image(root: Path) -> None:
    image(root / PCAM / "images" / "p99.png", 3, 99, "PNG")


@dataclass(frozen=True)
class DataCase:
    id: str
    build: Callable[[Path], None]
    expect: str
    names: tuple[str, ...] = ()
    """Paths (relative to the data root) the error line must name, besides `expect`."""
    breaks: Callable[[Path], None] | None = None
    dataset: str = "brain_mri"
    params: str = '{ task = "meningioma", image_size = 8 }'
    root: str = "data"
    """The --data-root given: "data" (built), "none" (not given), or a path under tmp_path."""
    marks: list = field(default_factory=list)


def _pcam(id: str, expect: str, names: tuple[str, ...], breaks, **kw) -> DataCase:
    kw.setdefault("params", "{ image_size = 8 }")
    return DataCase(id, build_pcam, expect, names, breaks, dataset="pcam", **kw)


LABELS = f"{PCAM}/labels.csv"

DATA_CASES = [
    # ---- brain_mri (ImageFolder layout) ----
    DataCase(
        "mri-no-data-root",
        build_mri,
        "dataset 'brain_mri' needs a data root: pass --data-root or set TESTBED_DATA_ROOT",
        root="none",
    ),
    DataCase(
        "mri-data-root-missing",
        build_mri,
        "dataset 'brain_mri': folder not found:",
        (MRI,),
        root="nowhere",
    ),
    DataCase(
        "mri-data-root-is-a-file",
        build_mri,
        "dataset 'brain_mri': folder not found:",
        (MRI,),
        breaks=lambda r: (shutil.rmtree(r), r.write_text("not a folder")),
    ),
    DataCase(
        "mri-dataset-folder-missing",
        build_pcam,
        "dataset 'brain_mri': folder not found:",
        (MRI,),
    ),
    DataCase(
        "mri-split-folder-missing",
        build_mri,
        "dataset 'brain_mri': split folder not found:",
        (f"{MRI}/Testing",),
        _remove(f"{MRI}/Testing"),
    ),
    DataCase(
        "mri-class-folder-missing",
        build_mri,
        "dataset 'brain_mri': class folder not found:",
        (f"{MRI}/Training/meningioma_tumor",),
        _remove(f"{MRI}/Training/meningioma_tumor"),
    ),
    DataCase(
        "mri-class-folder-empty",
        build_mri,
        "dataset 'brain_mri': no images in class folder",
        (f"{MRI}/Testing/no_tumor",),
        _empty_folder(f"{MRI}/Testing/no_tumor"),
    ),
    DataCase(
        "mri-class-folder-without-images",
        build_mri,
        "dataset 'brain_mri': no images in class folder",
        (f"{MRI}/Training/no_tumor",),
        _only_non_images,
    ),
    DataCase(
        "mri-corrupt-jpeg",
        build_mri,
        "cannot decode image",
        (f"{MRI}/Training/meningioma_tumor/me1.jpg",),
        _corrupt(f"{MRI}/Training/meningioma_tumor/me1.jpg"),
    ),
    DataCase(
        "mri-truncated-jpeg",
        build_mri,
        "cannot decode image",
        (f"{MRI}/Testing/no_tumor/no2.jpg",),
        _truncate(f"{MRI}/Testing/no_tumor/no2.jpg"),
    ),
    DataCase(
        "mri-zero-byte-jpeg",
        build_mri,
        "cannot decode image",
        (f"{MRI}/Training/no_tumor/no0.jpg",),
        lambda r: (r / MRI / "Training" / "no_tumor" / "no0.jpg").write_bytes(b""),
    ),
    DataCase(
        "mri-text-named-jpeg",
        build_mri,
        "cannot decode image",
        (f"{MRI}/Testing/meningioma_tumor/me0.jpg",),
        lambda r: (r / MRI / "Testing" / "meningioma_tumor" / "me0.jpg").write_text("see PACS"),
    ),
    # ---- pcam (images/<id>.png + labels.csv) ----
    _pcam(
        "pcam-label-row-without-image",
        "dataset 'pcam': labelled image missing:",
        (f"{PCAM}/images/p99.png",),
        lambda r: _rewrite_labels(r, lambda rows: [*rows, "p99,1"]),
    ),
    _pcam(
        "pcam-image-without-label-row",
        "dataset 'pcam': image has no label row:",
        (f"{PCAM}/images/p99.png",),
        _extra_image,
    ),
    _pcam(
        "pcam-image-deleted",
        "dataset 'pcam': labelled image missing:",
        (f"{PCAM}/images/p03.png",),
        _remove(f"{PCAM}/images/p03.png"),
    ),
    _pcam(
        "pcam-wrong-header",
        "header must be 'id,label', got ['name', 'target']",
        (LABELS,),
        lambda r: _rewrite_labels(r, lambda rows: ["name,target", *rows[1:]]),
    ),
    _pcam(
        "pcam-no-header",
        "header must be 'id,label', got ['p00', '0']",
        (LABELS,),
        lambda r: _rewrite_labels(r, lambda rows: rows[1:]),
    ),
    _pcam(
        "pcam-label-not-binary",
        ":3: label must be 0 or 1, got '2'",
        (LABELS,),
        lambda r: _rewrite_labels(r, lambda rows: [rows[0], rows[1], "p01,2", *rows[3:]]),
    ),
    _pcam(
        "pcam-label-as-word",
        ":2: label must be 0 or 1, got 'normal'",
        (LABELS,),
        lambda r: _rewrite_labels(r, lambda rows: [rows[0], "p00,normal", *rows[2:]]),
    ),
    _pcam(
        "pcam-duplicate-id",
        ":10: duplicate id 'p00'",
        (LABELS,),
        lambda r: _rewrite_labels(r, lambda rows: [*rows, "p00,1"]),
    ),
    _pcam(
        "pcam-three-columns",
        ":4: expected 2 columns",
        (LABELS,),
        lambda r: _rewrite_labels(r, lambda rows: [*rows[:3], "p02,0,extra", *rows[4:]]),
    ),
    _pcam(
        "pcam-header-only",
        ": no label rows",
        (LABELS,),
        lambda r: _rewrite_labels(r, lambda rows: rows[:1]),
    ),
    _pcam(
        "pcam-labels-empty-file",
        "header must be 'id,label', got None",
        (LABELS,),
        lambda r: (r / LABELS).write_bytes(b""),
    ),
    _pcam(
        "pcam-labels-not-utf8",
        ": not UTF-8 text",
        (LABELS,),
        lambda r: (r / LABELS).write_bytes(b"id,label\np00,0\np\xe9,1\n"),
    ),
    _pcam(
        "pcam-no-known-layout",
        "dataset 'pcam': no known layout in",
        (PCAM,),
        lambda r: (_remove(LABELS)(r), _remove(f"{PCAM}/images")(r)),
    ),
    _pcam(
        "pcam-images-folder-missing",
        "dataset 'pcam': image folder not found:",
        (f"{PCAM}/images",),
        _remove(f"{PCAM}/images"),
        params='{ image_size = 8, layout = "png_csv" }',
    ),
    _pcam(
        "pcam-labels-csv-missing",
        "dataset 'pcam': label file not found:",
        (LABELS,),
        _remove(LABELS),
        params='{ image_size = 8, layout = "png_csv" }',
    ),
    _pcam(
        "pcam-corrupt-png",
        "cannot decode image",
        (f"{PCAM}/images/p05.png",),
        _corrupt(f"{PCAM}/images/p05.png"),
    ),
    _pcam(
        "pcam-truncated-png",
        "cannot decode image",
        (f"{PCAM}/images/p06.png",),
        _truncate(f"{PCAM}/images/p06.png"),
    ),
    _pcam(
        "pcam-more-samples-than-available",
        "n_samples=50 exceeds the 8 samples available",
        (PCAM,),
        None,
        params="{ image_size = 8, n_samples = 50 }",
    ),
    _pcam(
        "pcam-label-field-over-csv-limit",
        ":4: malformed CSV: field larger than field limit",
        (LABELS,),
        lambda r: _rewrite_labels(r, lambda rows: [*rows[:3], "p02," + "1" * 200_000, *rows[4:]]),
    ),
    _pcam(
        "pcam-label-row-without-label-column",
        ":5: expected 2 columns",
        (LABELS,),
        lambda r: _rewrite_labels(r, lambda rows: [*rows[:4], "p03", *rows[5:]]),
    ),
    _pcam(
        "pcam-label-empty-id",
        ":6: empty id",
        (LABELS,),
        lambda r: _rewrite_labels(r, lambda rows: [*rows[:5], ",0", *rows[6:]]),
    ),
    _pcam(
        "pcam-label-not-integer",
        ":7: label must be 0 or 1, got '0.5'",
        (LABELS,),
        lambda r: _rewrite_labels(r, lambda rows: [*rows[:6], "p05,0.5", *rows[7:]]),
    ),
    _pcam(
        "pcam-image-size-beyond-memory",
        "dataset 'pcam': 8 images of 3 x 3000000 x 3000000 need about",
        (),
        None,
        params="{ image_size = 3000000 }",
    ),
    DataCase(
        "mri-image-size-beyond-memory",
        build_mri,
        "dataset 'brain_mri': 12 images of 1 x 3000000 x 3000000 need about",
        params='{ task = "meningioma", image_size = 3000000 }',
    ),
    DataCase(
        "synthetic-beyond-memory",
        lambda r: None,
        "dataset 'synthetic': n_samples=1000000000 images of 1 x 4096 x 4096 need about",
        dataset="synthetic",
        params="{ n_samples = 1000000000, image_size = 4096 }",
        root="none",
    ),
    DataCase(
        "pcam-kaggle-corrupt-tif",
        build_kaggle,
        "cannot decode image",
        (f"{PCAM}/train/p04.tif",),
        _corrupt(f"{PCAM}/train/p04.tif"),
        dataset="pcam",
        params="{ image_size = 8 }",
    ),
    DataCase(
        "pcam-kaggle-labels-missing",
        build_kaggle,
        "dataset 'pcam': label file not found:",
        (f"{PCAM}/train_labels.csv",),
        _remove(f"{PCAM}/train_labels.csv"),
        dataset="pcam",
        params='{ image_size = 8, layout = "kaggle_tif" }',
    ),
]


def _data_run(case: DataCase, tmp_path: Path) -> tuple[Path, list[str], Path]:
    data = tmp_path / "data"
    data.mkdir()
    case.build(data)
    if case.breaks is not None:
        case.breaks(data)
    scenario = tmp_path / "broken-data.toml"
    scenario.write_text(DATA_SCENARIO.format(dataset=case.dataset, params=case.params))
    out = tmp_path / "run"
    argv = ["run", str(scenario), "--out", str(out), "--no-progress"]
    root = data if case.root == "data" else tmp_path / case.root
    if case.root != "none":
        argv += ["--data-root", str(root)]
    return root, argv, out


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in DATA_CASES])
def test_broken_data(case, tmp_path, capsys):
    root, argv, out = _data_run(case, tmp_path)
    rc, lines = run_cli(argv, capsys)
    assert_reported(lines, [case.expect], [str(root / n) for n in case.names])
    assert rc == USER_ERROR
    assert_no_run_folder(tmp_path, out)


@pytest.mark.parametrize(
    "case",
    [
        DataCase("mri-valid", build_mri, ""),
        DataCase("pcam-valid", build_pcam, "", dataset="pcam", params="{ image_size = 8 }"),
        DataCase("kaggle-valid", build_kaggle, "", dataset="pcam", params="{ image_size = 8 }"),
    ],
    ids=lambda c: c.id,
)
def test_data_builders_make_valid_datasets(case, tmp_path, capsys):
    """The unbroken layouts run, so each broken case fails for its one defect only."""
    _, argv, out = _data_run(case, tmp_path)
    rc, lines = run_cli(argv, capsys)
    assert rc == 0, "\n".join(lines)
    assert (out / "metrics.json").is_file()


def test_catalogue_is_big_enough():
    assert len(SCENARIO_FILES) + len(DATA_CASES) >= 40
