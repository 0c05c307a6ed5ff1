"""`--mlflow`: a run logged to a temporary MLflow store and read back with MLflow's client;
a missing mlflow is one line before anything runs. MLflow (the test extra has it) is
mandatory in CI."""

import json
import os
import sys

import pytest
from test_cli import TINY

from testbed.cli import main
from testbed.tracking import flatten, key, tracking_uri


@pytest.fixture(scope="module")
def mlflow_client():
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        msg = "mlflow not installed (pip install -e '.[test]')"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + ": it is mandatory in CI")
        pytest.skip(msg)
    return MlflowClient


@pytest.fixture(scope="module")
def logged(tmp_path_factory, mlflow_client):
    tmp = tmp_path_factory.mktemp("mlflow")
    scenario = tmp / "tiny.toml"
    scenario.write_text(
        TINY.replace("[report]\nplots = false", "[report]\nplots = true").replace(
            "[federation]", "[evaluation]\nrepeats = 2\n[federation]"
        )
    )
    uri = (tmp / "mlruns").as_uri()
    out = tmp / "run"
    args = ["run", str(scenario), "--out", str(out), "--no-progress", f"--mlflow={uri}"]
    assert main(args) == 0
    client = mlflow_client(tracking_uri=uri)
    exp = client.get_experiment_by_name("testbed")
    runs = client.search_runs([exp.experiment_id])
    return client, runs, json.loads((out / "metrics.json").read_text())


def test_the_scenario_run_holds_params_summary_and_files(logged):
    client, runs, metrics = logged
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.run_name == "tiny" and parent.info.status == "FINISHED"
    params = parent.data.params
    assert params["federation.rounds"] == "2"
    assert params["dp.params.noise_multiplier"] == "0.5"
    assert params["attacks.0.params.eps"] == "0.05"
    summary = metrics["tasks"]["synthetic"]["summary"]
    assert parent.data.metrics["acc_mean/mean"] == pytest.approx(summary["acc_mean"]["mean"])
    balanced = summary["acc_balanced_mean"]["mean"]
    assert parent.data.metrics["acc_balanced_mean/mean"] == pytest.approx(balanced)
    aasr = summary["attacks"]["PGD-3"]["aasr"]["mean"]
    assert parent.data.metrics["attacks/PGD-3/aasr/mean"] == pytest.approx(aasr)
    files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.html", "metrics.json", "scenario.json"} <= files
    figures = {f.path for f in client.list_artifacts(parent.info.run_id, "plots/synthetic")}
    assert {f"plots/synthetic/{name}" for name in ("asr_PGD-3.png", "training_loss.png")} <= figures


def test_one_nested_run_per_task_and_seed_with_per_round_metrics(logged):
    client, runs, metrics = logged
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert set(children) == {"synthetic seed 5", "synthetic seed 6"}
    for rep in metrics["tasks"]["synthetic"]["repeats"]:
        child = children[f"synthetic seed {rep['seed']}"]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params == {"task": "synthetic", "seed": str(rep["seed"]),
                                     "dataset": "synthetic"}  # fmt: skip
        assert child.data.metrics["acc_mean"] == pytest.approx(rep["acc_mean"])
        assert child.data.metrics["acc_balanced_mean"] == pytest.approx(rep["acc_balanced_mean"])
        assert child.data.metrics["acc_balanced/client/0"] == pytest.approx(
            rep["acc_balanced"]["0"]
        )
        assert child.data.metrics["attack/PGD-3/aasr"] == pytest.approx(
            rep["attacks"]["PGD-3"]["aasr"]
        )
        history = client.get_metric_history(child.info.run_id, "round/train_loss/mean")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2]
        first = rep["rounds"][0]["train_loss"]
        mean = sum(first.values()) / len(first)
        assert sorted(history, key=lambda m: m.step)[0].value == pytest.approx(mean)
        eps = client.get_metric_history(child.info.run_id, "round/paper_dp/epsilon")
        assert len(eps) == 2


def test_without_mlflow_it_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # find_spec then says: not installed
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), "--mlflow", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--mlflow needs MLflow" in err and ".[mlflow]" in err
    assert not out.exists() and not (tmp_path / ".run.partial").exists()
    assert main(["compare", str(scenario), "--out", str(tmp_path / "c"), "--mlflow"]) == 2
    assert "--mlflow needs MLflow" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_scenario_file_taken_as_the_uri_is_one_line(tmp_path, capsys):
    scenario = tmp_path / "a.toml"
    scenario.write_text(TINY)
    other = tmp_path / "b.toml"
    other.write_text(TINY.replace('name = "tiny"', 'name = "b"'))
    assert (
        main(["compare", "--mlflow", str(scenario), str(other), "--out", str(tmp_path / "c")]) == 2
    )
    assert "put --mlflow after the scenario files" in capsys.readouterr().err


def test_keys_and_params():
    assert key("attack/FGSM eps=0.01/aasr") == "attack/FGSM eps_0.01/aasr"
    assert key("a/../b") == "a/_/b"
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "t": [{"x": True}], "n": None}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "t.0.x": "true",
        "n": "",
    }
    assert tracking_uri("http://host:5000") == "http://host:5000"
    assert tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert tracking_uri("mlruns").startswith("file:///") and tracking_uri("mlruns").endswith(
        "/mlruns"
    )
