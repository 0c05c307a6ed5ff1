"""The broken-scenario catalogue: files in tests/broken/scenarios/, each opening with its
expectation (see tests/broken/README.md), and scenario paths that are no regular file."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from broken_cli import SCENARIO_FILES, USER_ERROR, assert_no_run_folder, assert_reported, run_cli

pytestmark = pytest.mark.usefixtures("isolated_cli")


def header(path: Path) -> dict[str, list[str]]:
    """`# key: value` lines at the top of the file (JSON: of NAME.json.expect)."""
    source = path.with_name(path.name + ".expect") if path.suffix == ".json" else path
    out: dict[str, list[str]] = {}
    # Read as bytes: one catalogue entry is deliberately not UTF-8 below its header.
    for line in source.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].partition(":")
        if sep and key.strip() in ("expect", "expect-also", "stage", "xfail"):
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _scenario_param(path: Path):
    meta = header(path)
    assert meta.get("expect"), f"{path.name}: no `# expect:` line"
    marks = [pytest.mark.xfail(strict=True, reason=r) for r in meta.get("xfail", [])]
    return pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.parametrize("path", [_scenario_param(p) for p in SCENARIO_FILES])
def test_broken_scenario(path, tmp_path, capsys):
    meta = header(path)
    expected = meta["expect"] + meta.get("expect-also", [])
    at_run_only = meta.get("stage") == ["run"]

    rc, lines = run_cli(["validate", str(path)], capsys)
    if at_run_only:  # valid as written; only the data or the partition it meets is wrong
        assert rc == 0, "\n".join(lines)
    else:
        assert_reported(lines, expected, [str(path)])
        assert rc == USER_ERROR

    out = tmp_path / "run"
    rc, lines = run_cli(["run", str(path), "--out", str(out), "--no-progress"], capsys)
    assert_reported(lines, expected, [str(path)])
    assert rc == USER_ERROR
    assert_no_run_folder(tmp_path, out)


@pytest.mark.parametrize("kind", ["missing", "directory", "fifo", "device"])
def test_unreadable_scenario_path(kind, tmp_path, capsys):
    path = tmp_path / "scenario.toml"
    expect = {
        "missing": "file not found",
        "directory": "cannot read: not a regular file (a directory)",
        "fifo": "cannot read: not a regular file (a FIFO)",
        "device": "cannot read: not a regular file (a character device)",
    }[kind]
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # nobody writes: reading it would block forever
    elif kind == "device":
        path.symlink_to("/dev/zero")  # endless: reading it would fill the memory
    for argv in (["validate", str(path)], ["run", str(path), "--out", str(tmp_path / "run")]):
        rc, lines = run_cli_within(argv, capsys, seconds=30)
        assert_reported(lines, [expect], [str(path)])
        assert rc == USER_ERROR
    assert_no_run_folder(tmp_path, tmp_path / "run")


def run_cli_within(argv: list[str], capsys, seconds: float) -> tuple[int, list[str]]:
    """run_cli in a daemon thread: a CLI that blocks fails the test instead of hanging it."""
    result: list[tuple[int, list[str]]] = []
    worker = threading.Thread(target=lambda: result.append(run_cli(argv, capsys)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert result, f"testbed {' '.join(argv)} still running after {seconds} s"
    return result[0]
