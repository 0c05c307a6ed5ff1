"""Shared by the broken-input catalogue (test_broken_scenarios.py, test_broken_data.py): each
case is one line naming the file and the field or path, exit code 2, no traceback, and no
run folder left behind."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

from testbed.cli import main
from testbed.runner import partial_dir

BROKEN = REPO / "tests" / "broken" / "scenarios"
SCENARIO_FILES = sorted(p for p in BROKEN.iterdir() if p.suffix in (".toml", ".json"))
USER_ERROR = 2
STUTTER = re.compile(r"(\b\w+ '[^']+': )\1")


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    rc = main(argv)
    cap = capsys.readouterr()
    text = cap.out + cap.err
    assert "Traceback" not in text, text
    return rc, text.splitlines()


def assert_reported(lines: list[str], expected: list[str], names: list[str]) -> None:
    """Each expected text on one output line that also names every one of `names`, and
    no line that stutters (the same "partitioner 'x': " twice, from two layers)."""
    for line in lines:
        assert not STUTTER.search(line), f"a prefix repeated: {line}"
    for exp in expected:
        assert any(exp in line and all(n in line for n in names) for line in lines), (
            f"no line holds {exp!r} and names {names}; output:\n" + "\n".join(lines)
        )


def assert_no_run_folder(tmp_path: Path, out: Path) -> None:
    assert not out.exists(), f"run folder {out} left behind"
    assert not partial_dir(out).exists(), f"partial run folder {partial_dir(out)} left behind"
    assert not (tmp_path / "reports").exists()
