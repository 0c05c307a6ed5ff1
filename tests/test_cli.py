"""The CLI end to end: the quickstart, reproducibility, and user mistakes as exit code 2."""

import json
import math

import pytest
import torch
from conftest import REPO

from testbed.cli import main
from testbed.pluginmanager import build_host
from testbed.scenario_load import load_scenario

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
    # what decides whether another machine repeats the run bitwise
    assert metrics["hardware"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert metrics["hardware"]["threads"] == torch.get_num_threads()
    task = metrics["tasks"]["synthetic"]
    assert len(task["repeats"]) == 3 and metrics["seeds"] == [0, 1, 2]
    # clean accuracy well above chance (two balanced classes)
    assert task["summary"]["acc_mean"]["mean"] > 0.75
    # per-client downlink noise (z = 0.005) leaves the deployed client models apart
    spread = task["repeats"][0]["client_models"]
    assert 0 < spread["distance_mean"] < spread["norm_mean"]
    assert task["summary"]["client_distance"]["mean"] > 0
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


@pytest.mark.parametrize("command", ["run", "compare", "search"])
def test_an_output_folder_that_cannot_be_made_is_one_line_before_any_work(
    command, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path / "cache"))
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(
        TINY + '[search]\nattack = "PGD-3"\nspace = { eps = { low = 0.01, high = 0.1 } }\n'
    )
    (tmp_path / "a_file").write_text("")  # a file stands where the output's folder must go
    out = tmp_path / "a_file" / "out"
    assert main([command, str(scenario), "--out", str(out), "--no-progress"]) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps lines
    assert f"cannot create the {'search' if command == 'search' else 'run'} folder" in err
    assert ("a file, not a folder" in err or "Not a directory" in err) and "Traceback" not in err
    assert len(err.split("error:")) == 2  # one error line
    assert not (tmp_path / "cache").exists()  # before any training


def test_a_later_tasks_or_scenarios_missing_data_stops_before_any_training(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TESTBED_DATA_ROOT", raising=False)
    synthetic = TINY[TINY.index("[data]") : TINY.index("[model]")]
    two_tasks = TINY.replace(
        synthetic,
        '[[tasks]]\nname = "a"\n[tasks.data]\nname = "synthetic"\n'
        "params = { n_samples = 90, image_size = 16 }\n"
        '[[tasks]]\nname = "b"\n[tasks.data]\nname = "brain_mri"\n'
        'params = { task = "meningioma" }\n',
    )
    (tmp_path / "two.toml").write_text(two_tasks)
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "two.toml"), "--out", str(out), "--no-progress"]) == 2
    assert "dataset 'brain_mri' needs a data root" in capsys.readouterr().err
    (tmp_path / "tiny.toml").write_text(TINY)
    (tmp_path / "mri.toml").write_text(two_tasks.replace('name = "tiny"', 'name = "mri"'))
    files = [str(tmp_path / "tiny.toml"), str(tmp_path / "mri.toml")]
    assert main(["compare", *files, "--out", str(tmp_path / "cmp"), "--no-progress"]) == 2
    assert f"{tmp_path / 'mri.toml'}: dataset 'brain_mri' needs" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "federations").exists()  # task a, tiny: never trained
    assert not out.exists() and not (tmp_path / "cmp").exists()


def test_task_flag_names_the_scenarios_tasks(capsys):
    assert main(["run", str(REPO / "scenarios" / "paper_baseline.toml"), "--task", "x"]) == 2
    err = capsys.readouterr().err
    assert "--task x: not a task of this scenario (its tasks: meningioma, glioma, pathology)" in err
    assert main(["run", str(REPO / "scenarios" / "quickstart.toml"), "--task", "synthetic"]) == 2
    assert "--task picks among [[tasks]]; this scenario has one [data]" in capsys.readouterr().err


def test_unknown_plugin_module_is_a_user_error(capsys):
    assert main(["-p", "no_such_module_xyz", "plugins"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err


def test_plugins_lists_builtins_with_hooks(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("datasets", "attacks", "testbed_register_attacks", "paper_dp", "pgd", "fedavg"):
        assert name in out


# --------------------------------------------------------------------------------------
# Issue 10: --seed/--repeats validated like the file, validate --set, Ctrl-C at start-up,
# an incomplete metrics.json for `report`, params in `testbed plugins`
# --------------------------------------------------------------------------------------


def error_lines(capsys) -> list[str]:
    cap = capsys.readouterr()
    assert "Traceback" not in cap.out + cap.err
    return [x for x in (cap.out + cap.err).splitlines() if x.strip()]


@pytest.mark.parametrize(
    ("flag", "value", "expect"),
    [
        ("--seed", "-1", "scenario.seed: Input should be greater than or equal to 0"),
        ("--seed", str(2**63), "scenario.seed: Input should be less than or equal to"),
        ("--seed", str(2**64), "scenario.seed: Input should be less than or equal to"),
        ("--repeats", "0", "evaluation.repeats: Input should be greater than or equal to 1"),
        ("--repeats", str(10**9), "evaluation.repeats: Input should be less than or equal to"),
    ],
)
def test_seed_and_repeats_flags_are_validated_like_the_file(flag, value, expect, tmp_path, capsys):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), flag, value, "--no-progress"]) == 2
    (line,) = error_lines(capsys)
    assert expect in line and str(scenario) in line
    assert not out.exists()


def test_seed_flag_replaces_the_files_seeds(tmp_path):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY + "\n[evaluation]\nseeds = [1, 2]\n")
    registry = build_host(autoload=False).registry
    s = load_scenario(scenario, registry, seed=2**63 - 2, repeats=2)
    assert s.seeds() == [2**63 - 2, 2**63 - 1]


def test_validate_accepts_set(tmp_path, capsys):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    assert main(["validate", str(scenario), "--set", "federation.rounds=0"]) == 2
    (line,) = error_lines(capsys)
    assert "federation.rounds: Input should be greater than or equal to 1" in line
    assert main(["validate", str(scenario), "--set", "federation.rounds=4"]) == 0


@pytest.mark.parametrize("where", ["parser", "build_host"])
def test_ctrl_c_during_start_up_is_one_line_exit_2(where, monkeypatch, capsys):
    import testbed.cli
    import testbed.pluginmanager

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "parser":
        monkeypatch.setattr(testbed.cli, "_parser", interrupted)
    else:
        monkeypatch.setattr(testbed.pluginmanager, "build_host", interrupted)
    assert main(["plugins"]) == 2
    (line,) = error_lines(capsys)
    assert line == "error: interrupted"


def test_plugins_shows_each_components_params(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    rows = [x for x in out.splitlines() if "eps_step" in x]
    assert any("float" in r and "(required)" in r for r in rows), out
    assert any("hdf5_splits" in x and "tuple[str, ...]" in x for x in out.splitlines())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run whose task is named like the paper's (so Table I is drawn too)."""
    tmp = tmp_path_factory.mktemp("finished")
    scenario = tmp / "tiny.toml"
    scenario.write_text(
        TINY.replace(
            '[data]\nname = "synthetic"\nparams = { n_samples = 90, image_size = 16 }',
            '[[tasks]]\nname = "glioma"\n[tasks.data]\nname = "synthetic"\n'
            "params = { n_samples = 90, image_size = 16 }",
        ).replace("rounds = 2", "rounds = 1")
    )
    out = tmp / "run"
    assert main(["run", str(scenario), "--out", str(out), "--no-progress"]) == 0
    return out


def _drop(path: str):
    def edit(metrics):
        *parents, last = path.split("/")
        node = metrics
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        del node[int(last) if isinstance(node, list) else last]

    return edit


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (_drop("hardware"), "hardware: Field required"),
        (_drop("timing/total_s"), "timing.total_s: Field required"),
        (_drop("tasks/glioma/summary"), "tasks.glioma.summary: Field required"),
        (_drop("tasks/glioma/repeats/0/acc/1"), "no accuracy for client(s) 1"),
        (_drop("tasks/glioma/summary/attacks/PGD-3"), "attack 'PGD-3' missing"),
        (_drop("tasks/glioma/repeats/0/attacks/PGD-3/asr/0"), "asr: expected 3 rows"),
        (_drop("tasks/glioma/repeats/0/privacy/0/delta"), "privacy[0].delta: Field required"),
        (lambda m: m["tasks"]["glioma"].update(repeats=[]), "repeats: List should have at least"),
    ],
)
def test_report_of_incomplete_metrics_is_one_line(finished_run, edit, expect, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert main(["report", str(run)]) == 0  # the complete file renders
    capsys.readouterr()
    metrics = json.loads((run / "metrics.json").read_text())
    edit(metrics)
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(run)]) == 2
    (line,) = error_lines(capsys)
    assert "incomplete metrics" in line and expect in line and str(run / "metrics.json") in line
