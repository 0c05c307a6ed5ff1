"""scripts/reproduce_paper.sh hands the CLI arguments it accepts: a fresh run with the
engine set through --set, an interrupted one resumed as it was, a finished one skipped,
and step 1's runs checked for before its table. The GPU run itself is issue 14's; here a
stub `testbed` records what the script calls and finishes a fresh run (an empty
metrics.json), never a resumed one."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

from testbed.cli import main
from testbed.pluginmanager import build_host
from testbed.scenario import resolved_dict
from testbed.scenario_load import load_scenario

STUB = """#!/usr/bin/env bash
echo "$@" >> "$(dirname "$0")/calls"
prev=
for a in "$@"; do
  if [[ $prev == --out ]]; then mkdir -p "$a" && echo '{"tasks": {}}' > "$a/metrics.json"; fi
  prev=$a
done
"""


def _script(tmp_path, out, rc: int = 0, **env: str) -> list[list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    python = bin_dir / "python"  # step 3 measures the data's std with it
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    stub = bin_dir / "testbed"
    stub.write_text(STUB)
    stub.chmod(0o755)
    calls = bin_dir / "calls"
    calls.unlink(missing_ok=True)
    env = {
        **os.environ, "BIN": str(bin_dir), "DATA_ROOT": str(tmp_path), "STEPS": "1",
        "SEEDS": "0", "TASKS": "meningioma", **env,
    }  # fmt: skip
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "reproduce_paper.sh"), str(out)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == rc, done.stderr
    assert "expected on one H200" in done.stdout.splitlines()[1]  # the time comes first
    if not calls.exists():
        return []
    return [shlex.split(line) for line in calls.read_text().splitlines()]


@pytest.mark.parametrize(
    "env, param",
    [
        ({"ENGINE": "batched", "DROPOUT": "stacked"}, ("dropout", "stacked")),
        ({"CAPTURE": "cuda-graph"}, ("capture", "cuda-graph")),  # ENGINE's default
    ],
)
def test_a_fresh_run_sets_the_engine_the_scenario_accepts(tmp_path, env, param):
    out = tmp_path / "out"
    (call,) = _script(tmp_path, out, SEEDS="2", **env)
    assert call[:2] == ["run", "scenarios/paper_baseline.toml"]
    assert call[call.index("--out") + 1] == str(out / "baseline-meningioma-seed2")
    assert call[call.index("--task") + 1] == "meningioma"
    engine = env.get("ENGINE", "inprocess")
    sets = [call[i + 1] for i, a in enumerate(call) if a == "--set"]
    assert sets[:2] == [f"engine.name={engine}", f"engine.params.{param[0]}={param[1]}"]
    scenario = load_scenario(REPO / call[1], build_host().registry, sets)
    assert scenario.engine.name == engine and scenario.engine.params == dict([param])
    assert scenario.seeds() == [2]
    assert (out / "baseline-table.md").is_file()


def test_step_one_runs_every_task_and_seed_and_stops_where_one_did_not_finish(tmp_path):
    out = tmp_path / "out"
    calls = _script(tmp_path, out, SEEDS="0 1", TASKS="meningioma glioma", JOBS="2")
    names = sorted(c[c.index("--out") + 1].rsplit("/", 1)[1] for c in calls)
    assert names == [f"baseline-{t}-seed{s}" for t in ("glioma", "meningioma") for s in (0, 1)]
    (out / "baseline-glioma-seed1" / "metrics.json").unlink()
    (out / ".baseline-glioma-seed1.partial").mkdir()
    # the finished three are skipped; the resumed one (the stub never finishes it) stops
    # the step before a table of three runs could pass for four
    (call,) = _script(tmp_path, out, rc=1, SEEDS="0 1", TASKS="meningioma glioma", JOBS="2")
    assert call[:3] == ["run", "--resume", str(out / "baseline-glioma-seed1")]


def test_an_interrupted_run_is_resumed_as_it_was_and_a_finished_one_skipped(tmp_path, capsys):
    out = tmp_path / "out"
    (out / ".baseline-meningioma-seed0.partial").mkdir(parents=True)
    (call,) = _script(tmp_path, out, rc=1)
    final = str(out / "baseline-meningioma-seed0")
    assert call == ["run", "--resume", final, "--data-root", str(tmp_path)]
    # the CLI takes exactly that: here it finds nothing to resume, not a usage error
    assert main(call) == 2
    assert "nothing to resume" in capsys.readouterr().err
    (out / "baseline-meningioma-seed0").mkdir()
    (out / "baseline-meningioma-seed0" / "metrics.json").write_text('{"tasks": {}}')
    assert _script(tmp_path, out) == []


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("steps", "base"),
    [("1 2 3 4", "scenarios/paper_baseline.toml"), ("3 4", "scenarios/sensitivity_cpu.toml")],
)
def test_every_run_of_every_step_is_a_scenario_the_cli_accepts(tmp_path, data_root, steps, base):
    """The sensitivity study's --set lists (noise multiplier, eps after normalisation from
    the measured std, chunks, one seed per run of step 4) are checked here, not first on a
    lent GPU."""
    env = {"STEPS": steps, "DATA_ROOT": str(data_root), "SENSITIVITY": base,
           "SEEDS": "0 1 2", "TASKS": "meningioma glioma pathology"}  # fmt: skip
    calls = _script(tmp_path, tmp_path / "out", **env)
    registry = build_host().registry
    names, eps_of = [], {}
    for call in calls:
        assert call[0] == "run"
        sets = [call[i + 1] for i, a in enumerate(call) if a == "--set"]
        scenario = load_scenario(REPO / call[1], registry, sets)
        tasks = [t.name for t in scenario.task_list()]
        if "--task" in call:
            assert call[1] == base and call[call.index("--task") + 1] in tasks
        names.append(call[call.index("--out") + 1].rsplit("/", 1)[1])
        if names[-1].startswith("z-"):
            assert scenario.dp.params["noise_multiplier"] == float(names[-1].split("-")[1])
        if names[-1].endswith("eps-normalised") or names[-1].startswith("closest-"):
            eps = {a.params["eps"] for a in scenario.attacks}
            assert len(eps) == 1 and 0.001 < min(eps) < 0.03  # 0.03 x a std below 1
            assert len({a.params.get("eps_step") for a in scenario.attacks[1:]}) == 1
            eps_of.setdefault(call[call.index("--task") + 1], set()).update(eps)
        if names[-1].startswith("closest-"):
            _, task, seed = names[-1].split("-")
            assert call[call.index("--task") + 1] == task
            assert scenario.dp.params["noise_multiplier"] == 0.002
            assert scenario.evaluation.seeds == [int(seed.removeprefix("seed"))]
    study = [
        name
        for z in ("0", "0.0005", "0.002", "0.005", "0.05")
        for name in (f"z-{z}", f"z-{z}-eps-normalised")
    ]
    study += [f"chunks-{c}" for c in (1, 2, 5, 10)]
    all_tasks = ("meningioma", "glioma", "pathology")
    study += [f"closest-{t}-seed{s}" for s in range(3) for t in all_tasks]
    baseline = [f"baseline-{t}-seed{s}" for s in range(3) for t in all_tasks]
    if "1" in steps:  # step 1's runs start in the background: any order
        assert sorted(names[:9]) == sorted(baseline)
        names = names[9:]
    assert names == (["sweeps"] if "1" in steps else []) + study
    # each task's own std, the same for a task in steps 3 and 4
    assert all(len(eps) == 1 for eps in eps_of.values())
    assert len({eps.pop() for eps in eps_of.values()}) == 3


def test_the_cpu_sensitivity_base_is_the_paper_baseline_at_a_smaller_schedule():
    """Its curves stand for paper_baseline's only if nothing but the schedule differs."""
    registry = build_host().registry
    paper = resolved_dict(load_scenario(REPO / "scenarios/paper_baseline.toml", registry))
    cpu = resolved_dict(load_scenario(REPO / "scenarios/sensitivity_cpu.toml", registry))
    for doc in (paper, cpu):
        doc.pop("scenario"), doc.pop("explain")
        for key in ("rounds", "local_epochs"):
            doc["federation"].pop(key)
        doc["evaluation"].pop("repeats")
        doc["report"].pop("save_weights")
    assert cpu == paper
