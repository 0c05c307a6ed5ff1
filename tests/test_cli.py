"""The CLI end to end: the quickstart, reproducibility, and user mistakes as exit code 2."""

import json
import math

import pytest
from conftest import REPO

from testbed.cli import main
from testbed.pluginmanager import build_host
from testbed.scenario import load_scenario

TINY = """
[scenario]
name = "tiny"
seed = 5
[data]
name = "synthetic"
params = { n_samples = 90, image_size = 16 }
[model]
params = { conv_channels = [4, 4, 8, 8, 8, 8], fc_units = [16, 16, 16, 8] }
[federation]
clients = 3
rounds = 2
local_epochs = 1
device = "cpu"
[dp]
name = "paper_dp"
params = { clip_norm = 1.0, noise_multiplier = 0.5 }
[threat_model]
samples_per_adversary = 10
[[attacks]]
name = "pgd"
params = { eps = 0.05, eps_step = 0.01, max_iter = 3 }
[report]
plots = false
"""


def strip_timing(obj):
    """metrics.json without the fields that measure time or say where a result came from."""
    if isinstance(obj, dict):
        return {
            k: strip_timing(v)
            for k, v in obj.items()
            if k not in ("timing", "cost_s", "hardware", "cache") and not k.endswith("_s")
        }
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    assert main(["run", str(REPO / "scenarios" / "quickstart.toml"), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["schema_version"] == 1
    task = metrics["tasks"]["synthetic"]
    assert len(task["repeats"]) == 3 and metrics["seeds"] == [0, 1, 2]
    # clean accuracy well above chance (two balanced classes)
    assert task["summary"]["acc_mean"]["mean"] > 0.75
    for label in ("FGSM", "PGD-10"):
        summary = task["summary"]["attacks"][label]
        assert 0 < summary["aasr"]["mean"] <= 1
        assert 0 <= summary["aetr"]["mean"] <= 1
        assert summary["cost_s"]["mean"] > 0
        for rep in task["repeats"]:
            assert rep["attacks"][label]["linf_max"] <= 0.05 + 1e-6
    # iterative attacks are stronger than one step, as in the paper
    assert (
        task["summary"]["attacks"]["PGD-10"]["aasr"]["mean"]
        > (task["summary"]["attacks"]["FGSM"]["aasr"]["mean"])
    )
    (privacy,) = task["repeats"][0]["privacy"]
    assert privacy["mechanism"] == "paper_dp" and privacy["rounds_accounted"] == 8
    assert privacy["epsilon"] > 0
    # the run folder is complete, and its resolved scenario is itself a valid scenario
    assert (out / "run.log").stat().st_size > 0
    assert len(list((out / "weights" / "synthetic").glob("*.pt"))) == 9
    assert {p.name for p in (out / "plots" / "synthetic").iterdir()} >= {"asr_PGD-10.png"}
    resolved = load_scenario(out / "scenario.json", build_host(autoload=False).registry)
    assert resolved.federation.rounds == 8


def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    runs = []
    for name, extra in (("a", []), ("b", []), ("c", ["--seed", "6"])):
        assert (
            main(["run", str(scenario), "--out", str(tmp_path / name), "--no-progress", *extra])
            == 0
        )
        runs.append(strip_timing(json.loads((tmp_path / name / "metrics.json").read_text())))
    assert runs[0] == runs[1]
    assert runs[0]["seeds"] == [5] and runs[2]["seeds"] == [6]
    assert runs[0]["tasks"] != runs[2]["tasks"]
    # strict JSON: no NaN or Infinity tokens
    text = (tmp_path / "a" / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert not math.isnan(runs[0]["tasks"]["synthetic"]["summary"]["acc_mean"]["mean"])


def test_missing_data_root_is_one_line_exit_2_and_no_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TESTBED_DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    scenario = tmp_path / "mri.toml"
    scenario.write_text(
        '[scenario]\nname = "mri"\n[data]\nname = "brain_mri"\nparams = { task = "meningioma" }\n'
    )
    assert main(["run", str(scenario), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "needs a data root" in err and "Traceback" not in err
    assert main(["run", str(scenario), "--data-root", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    (tmp_path / "taken").mkdir()
    assert main(["run", str(scenario), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_unknown_plugin_module_is_a_user_error(capsys):
    assert main(["-p", "no_such_module_xyz", "plugins"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err


def test_plugins_lists_builtins_with_hooks(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("datasets", "attacks", "testbed_register_attacks", "paper_dp", "pgd", "fedavg"):
        assert name in out
