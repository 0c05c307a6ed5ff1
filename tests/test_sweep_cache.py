"""Attack sweeps expand at validation; trained federations are reused across runs."""

import json
from pathlib import Path

import torch
from test_cli import TINY, strip_timing

from testbed.cache import FederationCache
from testbed.cli import main
from testbed.hostinfo import float_path
from testbed.pluginmanager import build_host
from testbed.problems import ScenarioError
from testbed.scenario_load import load_scenario

SWEEP = """
[[attacks]]
name = "pgd"
params = { eps = 0.03, eps_step = 0.005, max_iter = 3 }
sweep = { eps = [0.01, 0.03], max_iter = [2, 4] }
"""


def scenario_file(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_sweep_expands_to_validated_attacks(tmp_path):
    s = load_scenario(scenario_file(tmp_path, TINY + SWEEP), build_host(autoload=False).registry)
    swept = [a for a in s.attacks if a.sweep_of]
    assert [a.label for a in swept] == [
        "PGD eps=0.01 max_iter=2",
        "PGD eps=0.01 max_iter=4",
        "PGD eps=0.03 max_iter=2",
        "PGD eps=0.03 max_iter=4",
    ]
    assert swept[1].params["eps"] == 0.01 and swept[1].params["max_iter"] == 4
    assert swept[1].params["eps_step"] == 0.005  # unswept params carried over
    assert swept[1].sweep_point == {"eps": 0.01, "max_iter": 4}


def test_sweep_values_are_validated_with_their_path(tmp_path):
    bad = SWEEP.replace("eps = [0.01, 0.03]", "eps = [0.01, -1.0]")
    try:
        load_scenario(scenario_file(tmp_path, TINY + bad), build_host(autoload=False).registry)
    except ScenarioError as exc:
        msgs = [str(p) for p in exc.problems]
    else:
        raise AssertionError("a negative eps in a sweep must not validate")
    assert any("attacks[1].sweep.eps" in m and "eps=-1" in m for m in msgs), msgs


def run(tmp_path: Path, scenario: Path, name: str, *extra: str) -> dict:
    out = tmp_path / name
    assert main(["run", str(scenario), "--out", str(out), "--no-progress", *extra]) == 0
    return json.loads((out / "metrics.json").read_text())["tasks"]["synthetic"]["repeats"][0]


def test_attack_only_changes_hit_the_cache_training_changes_miss(tmp_path, monkeypatch):
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path / "cache"))  # empty: first run trains
    first = run(tmp_path, scenario_file(tmp_path, TINY), "a")
    assert first["cache"]["hit"] is False

    again = run(tmp_path, scenario_file(tmp_path, TINY), "b")
    assert again["cache"] == {"key": first["cache"]["key"], "hit": True}
    assert again["acc"] == first["acc"] and again["rounds"] == first["rounds"]
    assert again["attacks"]["PGD-3"]["asr"] == first["attacks"]["PGD-3"]["asr"]

    swept = run(tmp_path, scenario_file(tmp_path, TINY + SWEEP, "sweep.toml"), "c")
    assert swept["cache"]["hit"] is True and len(swept["attacks"]) == 5

    lr = TINY.replace('device = "cpu"', 'device = "cpu"\nlr = 0.02')
    changed = run(tmp_path, scenario_file(tmp_path, lr, "lr.toml"), "d")
    assert changed["cache"]["hit"] is False and changed["cache"]["key"] != first["cache"]["key"]

    forced = run(tmp_path, scenario_file(tmp_path, TINY), "e", "--no-cache")
    assert forced["cache"]["hit"] is False
    assert forced["acc"] == first["acc"]  # retraining reproduces the cached federation


def test_a_federation_cached_on_another_host_is_used_and_said_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path / "cache"))
    first = run(tmp_path, scenario_file(tmp_path, TINY), "a")
    cache = FederationCache(tmp_path / "cache" / "federations")
    entry = cache.load(first["cache"]["key"])
    here = entry["host"]
    assert here == float_path(torch.device("cpu"))
    # as if trained on a CPU with other flags (a cache folder copied from another machine)
    cache.save(first["cache"]["key"], {**entry, "host": {**here, "cpu_flags": "0123456789ab"}})
    capsys.readouterr()
    again = run(tmp_path, scenario_file(tmp_path, TINY), "b")
    assert again["cache"]["hit"] is True and again["acc"] == first["acc"]
    assert again["cache"]["trained_on"]["cpu_flags"] == "0123456789ab"
    err = " ".join(capsys.readouterr().err.split())  # rich wraps lines
    assert "trained on another host (cpu_flags differ)" in err
    report = (tmp_path / "b" / "report.md").read_text()
    assert "federations from the cache trained on another host (synthetic seed" in report


def test_a_cache_that_cannot_be_written_costs_the_cache_not_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path / "cache"))
    written = run(tmp_path, scenario_file(tmp_path, TINY), "a")
    blocked = tmp_path / "blocked"
    blocked.write_text("")  # a file where the cache folder must go: unwritable, even for root
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(blocked))
    capsys.readouterr()
    unwritten = run(tmp_path, scenario_file(tmp_path, TINY), "b")
    assert unwritten["cache"]["hit"] is False
    assert "Not a directory" in unwritten["cache"]["not_stored"]
    assert strip_timing(unwritten) == strip_timing(written)  # the same results, uncached
    err = " ".join(capsys.readouterr().err.split())  # rich wraps lines
    assert "the trained federation could not be cached" in err and "Traceback" not in err
    assert not list(tmp_path.glob("**/*.tmp"))  # no half-written entry left behind


def test_another_opacus_or_art_is_other_code_a_federation_is_retrained(tmp_path, monkeypatch):
    from importlib import metadata

    from testbed import fingerprint

    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path / "cache"))
    first = run(tmp_path, scenario_file(tmp_path, TINY), "a")
    real = metadata.version
    for lib in ("opacus", "adversarial-robustness-toolbox"):
        monkeypatch.setattr(
            fingerprint.metadata, "version", lambda n, lib=lib: "0.0.1" if n == lib else real(n)
        )
        other = run(tmp_path, scenario_file(tmp_path, TINY), f"with-{lib}")
        assert other["cache"]["hit"] is False and other["cache"]["key"] != first["cache"]["key"]
    monkeypatch.setattr(fingerprint.metadata, "version", real)
    assert run(tmp_path, scenario_file(tmp_path, TINY), "back")["cache"]["hit"] is True
