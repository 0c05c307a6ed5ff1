"""scripts/paper_table.py pools runs by task and seed: a Student's t interval computed by
hand, a figure an older record lacks shown as "-", the same seed disagreeing refused, and
a folder's other JSON files passed over but a named one refused."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import REPO

_spec = importlib.util.spec_from_file_location("paper_table", REPO / "scripts" / "paper_table.py")
paper_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paper_table)


def _run(path, seed: int, acc: float, true_label: bool = True) -> None:
    attack = {"aasr": 0.5, "aetr": 0.75, **({"aasr_true": 0.25} if true_label else {})}
    rep = {
        "seed": seed, "acc_mean": acc, "client_models": {"distance_mean": 2.0},
        "attacks": {"FGSM": attack, "PGD-20": attack, "PGD-40": attack},
    }  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.json").write_text(json.dumps({"tasks": {"glioma": {"repeats": [rep]}}}))


def test_two_seeds_pool_into_the_t_interval(tmp_path, capsys):
    _run(tmp_path / "a", 0, 0.90)
    _run(tmp_path / "b", 1, 0.80, true_label=False)
    (tmp_path / "bench.json").write_text('{"benchmarks": []}')  # passed over in a folder
    paper_table.main([str(tmp_path)])
    out = capsys.readouterr().out
    # mean 85, sd 7.071, t(0.975, 1 df) = 12.706: half-width 12.706 x 7.071 / sqrt(2) = 63.5
    assert "| ACC | 90.0 / 80.0 | 85.0 [21.5, 148.5] | 61.84 |" in out
    assert "| PGD-20 AASR, true label | 25.0 / - | - | 51.83 |" in out
    assert "| PGD-20 AASR | 50.0 / 50.0 | 50.0 [50.0, 50.0] | 51.83 |" in out
    # PGD-40's 50 against the paper's 63.77 is the largest of the four gaps
    assert "largest gap of the four (ASR against the prediction): 13.8 (PGD-40 AASR)" in out


def test_a_seed_seen_twice_must_agree_and_a_named_file_must_be_a_run(tmp_path):
    _run(tmp_path / "a", 0, 0.90)
    _run(tmp_path / "b", 0, 0.80)
    with pytest.raises(SystemExit, match="glioma seed 0 differs"):
        paper_table.collect([str(tmp_path / "a"), str(tmp_path / "b")])
    (tmp_path / "bench.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"not a run's metrics\.json"):
        paper_table.collect([str(tmp_path / "bench.json")])
    assert list(paper_table.collect([str(tmp_path / "a"), str(tmp_path / "a")])) == ["glioma"]
