"""scripts/lease/full_schedule.py, the driver of a short GPU lease: its data restore (images
as sparse stamp files, label lists whole, caches unpacked, never over a file that differs)
and its end-of-run prediction (start-up round left out), on cases computed by hand. A bug
here costs a lease's minutes, and the lent machine is the only place it would show."""

from __future__ import annotations

import importlib.util
import lzma
import os
import sys
from pathlib import Path

import pytest
from conftest import REPO

from testbed.pluginmanager import build_host
from testbed.scenario_load import load_scenario

_spec = importlib.util.spec_from_file_location(
    "full_schedule", REPO / "scripts" / "lease" / "full_schedule.py"
)
driver = importlib.util.module_from_spec(_spec)
sys.modules["full_schedule"] = driver  # dataclasses resolve their module by name
_spec.loader.exec_module(driver)

MTIME = 1_700_000_000_123_456_789


def _lease(tmp_path: Path) -> tuple[dict, Path]:
    lease = tmp_path / "lease"
    (lease / "files" / "set").mkdir(parents=True)
    (lease / "files" / "set" / "labels.csv").write_text("id,label\na,1\n")
    (lease / "cache").mkdir()
    with lzma.open(lease / "cache" / "set-abc.pt.xz", "wb") as fh:
        fh.write(b"decoded images")
    manifest = {
        "data_root": str(tmp_path / "data"),
        "files": [["set/images/a.png", 5000, MTIME], ["set/labels.csv", 13, MTIME + 1]],
    }
    return manifest, lease


def test_restore_makes_stamps_copies_labels_and_unpacks_caches(tmp_path: Path) -> None:
    manifest, lease = _lease(tmp_path)
    cache, log = tmp_path / "cache", tmp_path / "lease.log"
    driver.restore_data(manifest, cache, log, lease)
    image = tmp_path / "data" / "set" / "images" / "a.png"
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (5000, MTIME)
    assert image.read_bytes() == bytes(5000)  # a stamp, not an image
    labels = tmp_path / "data" / "set" / "labels.csv"
    assert labels.read_text() == "id,label\na,1\n"  # read by the loader: whole
    assert labels.stat().st_mtime_ns == MTIME + 1
    assert (cache / "set-abc.pt").read_bytes() == b"decoded images"
    driver.restore_data(manifest, cache, log, lease)  # again: the same stamps are left alone
    assert "2 stamp files made" in log.read_text().splitlines()[0]
    assert "0 stamp files made" in log.read_text().splitlines()[1]


def test_restore_refuses_a_real_file_that_differs(tmp_path: Path) -> None:
    manifest, lease = _lease(tmp_path)
    real = tmp_path / "data" / "set" / "images" / "a.png"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"a real image")
    with pytest.raises(SystemExit, match="differs from the packed data"):
        driver.restore_data(manifest, tmp_path / "cache", tmp_path / "log", lease)
    assert real.read_bytes() == b"a real image"


def test_restore_refuses_a_label_list_of_another_size(tmp_path: Path) -> None:
    manifest, lease = _lease(tmp_path)
    manifest["files"][1][1] = 14
    with pytest.raises(SystemExit, match="size differs"):
        driver.restore_data(manifest, tmp_path / "cache", tmp_path / "log", lease)


def test_predicted_end_leaves_out_the_start_up_round() -> None:
    run = driver.Run("glioma", 0, 0)
    run.stamps = [0.0, 20.0]
    assert run.predicted_end(rounds=10, tail=5) is None  # one steady gap is not enough
    # round 1 took 20 s (start-up), rounds 2-5 10 s each: 50 + 5 rounds x 10 + tail 5
    run.stamps = [0.0, 20.0, 30.0, 40.0, 50.0]
    assert run.predicted_end(rounds=10, tail=5) == pytest.approx(105.0)


def test_read_rounds_takes_the_round_lines_of_the_log(tmp_path: Path) -> None:
    folder = tmp_path / ".glioma-seed0.partial"
    folder.mkdir()
    (folder / "run.log").write_text(
        "2026-12-04 16:02:35,000 INFO loading data\n"
        "2026-12-04 16:02:48,909 INFO glioma seed 0 round 1: loss {'0': 0.4} (13.47 s)\n"
        "2026-12-04 16:02:56,409 INFO glioma seed 0 round 2: loss {'0': 0.3} (7.20 s)\n"
    )
    run = driver.Run("glioma", 0, 0)
    run.read_rounds(tmp_path)
    assert len(run.stamps) == 2
    assert run.stamps[1] - run.stamps[0] == pytest.approx(7.5)
    os.rename(folder, tmp_path / "glioma-seed0")  # finished: the run folder's log is read
    run.read_rounds(tmp_path)
    assert len(run.stamps) == 2


def test_the_data_check_passes_what_was_packed_and_refuses_anything_else(tmp_path: Path) -> None:
    """The sparse stamps key the cache by name, size and mtime alone: this check, on the
    images the loader actually returns, is what stops a lease from training on other data."""
    scenario = REPO / "scenarios" / "quickstart.toml"
    (task,) = [t.name for t in load_scenario(scenario, build_host().registry).task_list()]
    packed = driver.task_signatures(scenario, tmp_path, [task])
    assert packed[task]["shape"] == [1200, 1, 32, 32] and packed[task]["folder"] is None
    manifest = {"data_root": str(tmp_path), "tasks": packed}
    assert driver.check_data(manifest, scenario) is None
    for key, wrong in (("sum", packed[task]["sum"] + 1), ("labels", 0)):
        other = {"data_root": str(tmp_path), "tasks": {task: {**packed[task], key: wrong}}}
        assert "packed" in driver.check_data(other, scenario)
    missing = {"data_root": str(tmp_path), "tasks": {**packed, "glioma": packed[task]}}
    assert driver.check_data(missing, scenario).startswith("task glioma: loaded None")
