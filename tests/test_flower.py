"""The Flower engine: the same scenario and seed train the same federation as in-process.

The equivalence tests start Flower's simulation engine (Ray) in this process; they need the
`flower` extra, which the README's test command installs.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_cli import TINY, strip_timing

from testbed.builtins.dpsgd import DPSGD, DPSGDParams
from testbed.cli import main
from testbed.flower.messages import from_record, pack, to_record, unpack
from testbed.flower.strategy import check_client_state_support
from testbed.pluginmanager import build_host
from testbed.problems import ScenarioError
from testbed.runner import RunError
from testbed.scenario_load import load_scenario


def close(a, b, path="", rel=1e-6, abs_=1e-6):
    """Assert two metrics.json trees agree: same keys and strings, floats to tolerance."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            close(a[k], b[k], f"{path}.{k}", rel, abs_)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close(x, y, f"{path}[{i}]", rel, abs_)
    elif isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None, path
        assert math.isclose(a, b, rel_tol=rel, abs_tol=abs_), f"{path}: {a} != {b}"
    else:
        assert a == b, path


def without_engine(metrics):
    m = strip_timing(metrics)
    m.pop("engine")
    return m


def run_both(tmp_path, scenario, *args):
    """The scenario on both engines. Each simulated client gets as many CPUs (so torch
    threads) as this process uses: float sums then add up in the same order."""
    runs = {}
    threads = f"engine.client_cpus={torch.get_num_threads()}"
    for engine in ("inprocess", "flower"):
        out = tmp_path / engine
        argv = ["run", str(scenario), "--out", str(out), "--no-progress", "--engine", engine]
        argv += ["--set", "report.save_round_weights=true", "--set", threads]
        assert main([*argv, *args]) == 0
        runs[engine] = out
    return runs


def assert_same_federation(runs, task, seed, rounds):
    for r in range(1, rounds + 1):
        name = f"seed{seed}_round{r}_global.pt"
        a, b = (torch.load(runs[e] / "weights" / task / name) for e in ("inprocess", "flower"))
        assert float((a - b).abs().max()) <= 1e-6, f"round {r}"
    metrics = {e: json.loads((runs[e] / "metrics.json").read_text()) for e in runs}
    assert metrics["flower"]["engine"]["name"] == "flower"
    close(without_engine(metrics["inprocess"]), without_engine(metrics["flower"]))
    return metrics


@pytest.mark.slow
def test_quickstart_same_on_flower_as_in_process(tmp_path):
    runs = run_both(
        tmp_path,
        REPO / "scenarios" / "quickstart.toml",
        "--repeats", "1", "--set", "federation.rounds=3", "--set", "federation.local_epochs=1",
        "--set", "report.plots=false",
    )  # fmt: skip
    metrics = assert_same_federation(runs, "synthetic", 0, 3)
    rep = metrics["flower"]["tasks"]["synthetic"]["repeats"][0]
    assert rep["privacy"][0]["rounds_accounted"] == 3  # paper_dp's server side ran


@pytest.mark.slow
def test_dp_sgd_and_norm_bound_same_on_flower(tmp_path):
    """Client-side state (DP-SGD's per-client accountants) travels with the messages and
    the server-side norm bound runs in the Strategy: epsilons and weights match."""
    scenario = tmp_path / "dpsgd.toml"
    scenario.write_text(
        TINY.replace(
            '[dp]\nname = "paper_dp"\nparams = { clip_norm = 1.0, noise_multiplier = 0.5 }',
            textwrap.dedent("""\
                [dp]
                name = "dp_sgd"
                params = { noise_multiplier = 1.0, max_grad_norm = 1.0 }
                [[defences]]
                name = "norm_bound"
                params = { max_norm = 0.5 }
            """),
        )
    )
    runs = run_both(tmp_path, scenario)
    metrics = assert_same_federation(runs, "synthetic", 5, 2)
    (privacy,) = metrics["flower"]["tasks"]["synthetic"]["repeats"][0]["privacy"]
    assert privacy["mechanism"] == "dp_sgd" and min(privacy["epsilon_per_client"]) > 0


@pytest.mark.slow
def test_poisoning_same_on_flower(tmp_path):
    """A compromised client poisons its data in its ClientApp (backdoor) and its upload in
    the Strategy (ALIE, reading the benign uploads there); FoolsGold keeps its state on
    the server: the same weights every round, the same detection and backdoor metrics."""
    scenario = tmp_path / "poisoned.toml"
    scenario.write_text(
        TINY.replace(
            "[threat_model]\n",
            textwrap.dedent("""\
                [aggregator]
                name = "foolsgold"
                [[poisoning]]
                name = "backdoor"
                params = { rate = 0.5, target = 1 }
                [[poisoning]]
                name = "alie"
                [threat_model]
                malicious = [2]
                collude = true
            """),
        )
    )
    runs = run_both(tmp_path, scenario)
    metrics = assert_same_federation(runs, "synthetic", 5, 2)
    rep = metrics["flower"]["tasks"]["synthetic"]["repeats"][0]
    assert rep["poisoning"]["malicious"] == [2]
    assert [r["malicious"] for r in rep["rounds"]] == [[2], [2]]


@pytest.mark.slow
def test_client_plugin_failure_on_flower_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """A -p plugin module is loaded on the clients too; its exception there comes back as
    the usual one-line error naming the plugin and the hook."""
    (tmp_path / "boom_plugin.py").write_text(
        "from testbed import hookimpl\n\n"
        "@hookimpl\n"
        "def testbed_client_update(ctx, update):\n"
        "    raise RuntimeError('boom on the client')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # for the Ray workers
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    out = tmp_path / "run"
    argv = ["-p", "boom_plugin", "run", str(scenario), "--out", str(out), "--engine", "flower"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*argv, "--no-progress"]) == 2
    # Ray's tip about a future default, printed amid the report at every start, is kept out
    assert not [w for w in caught if "future versions of Ray" in str(w.message)]
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "boom_plugin" in line and "testbed_client_update" in line
    assert "boom on the client" in line and "Traceback" not in err
    assert not out.exists()


def test_engine_shorthand_and_table(tmp_path):
    registry = build_host(autoload=False).registry
    for text, name, cpus in (
        ('engine = "flower"', "flower", 1.0),
        ('[engine]\nname = "flower"\nclient_cpus = 2', "flower", 2.0),
        ("", "inprocess", 1.0),
    ):
        f = tmp_path / "s.toml"
        f.write_text(text + "\n" + TINY if text.startswith("engine") else TINY + "\n" + text)
        s = load_scenario(f, registry)
        assert (s.engine.name, s.engine.client_cpus) == (name, cpus)


def test_unknown_engine_names_the_field(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('engine = "spark"\n' + TINY)
    with pytest.raises(ScenarioError) as exc:
        load_scenario(f, build_host(autoload=False).registry)
    assert "engine.name" in str(exc.value) and str(f) in str(exc.value)


def test_weights_and_json_survive_the_records():
    w = torch.randn(1000)
    assert torch.equal(from_record(to_record(w)), w)
    assert unpack(pack({"a": [1, 2.5, None]})) == {"a": [1, 2.5, None]}


def test_dp_sgd_client_state_round_trip():
    a = DPSGD(DPSGDParams(noise_multiplier=1.0))
    a._accountant(2).history = [(1.0, 0.1, 30)]
    a.round_steps[2] = 30
    b = DPSGD(DPSGDParams(noise_multiplier=1.0))
    b._accountant(1).history = [(1.0, 0.2, 10)]
    b.load_client_state(2, unpack(pack(a.client_state(2))))
    assert b.accountants[2].history == [(1.0, 0.1, 30)] and b.round_steps == {2: 30}
    assert b.accountants[1].history == [(1.0, 0.2, 10)]  # other clients untouched
    assert b.epsilon_of(2) == a.epsilon_of(2)


class _Counter:
    """Keeps state in an instance attribute, with no state_dict and no client_state: the
    plugin author's case of issue 10 (exit 0 on Flower, empty records)."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def testbed_client_update(self, ctx, update):
        self.seen[update.client_id] = self.seen.get(update.client_id, 0) + 1


class _Declared(_Counter):
    def client_state(self, cid):
        return self.seen.get(cid, 0)

    def load_client_state(self, cid, state):
        self.seen[cid] = state


class _Stateless(_Counter):
    stateless = True


class _InputOnly:
    def testbed_training_inputs(self, batch):
        pass


@pytest.mark.parametrize("obj", [_Counter(), _InputOnly()], ids=["client_update", "inputs"])
def test_undeclared_client_side_plugin_is_refused(obj):
    with pytest.raises(RunError, match="declares neither client_state/load_client_state nor"):
        check_client_state_support([obj])


def test_declared_and_builtin_client_side_plugins_pass():
    from testbed.builtins.adversarial_training import (
        AdversarialTraining,
        AdversarialTrainingParams,
    )
    from testbed.builtins.dp import PaperDP, PaperDPParams
    from testbed.builtins.heterogeneous import HeterogeneousParams, HeterogeneousPreprocessing
    from testbed.builtins.input_defences import JpegParams, build_jpeg

    check_client_state_support(
        [
            _Declared(),
            _Stateless(),
            DPSGD(DPSGDParams(noise_multiplier=1.0)),
            PaperDP(PaperDPParams(clip_norm=1.0, noise_multiplier=0.5)),
            AdversarialTraining(AdversarialTrainingParams()),
            HeterogeneousPreprocessing(HeterogeneousParams(pipelines=[{}])),
            build_jpeg(JpegParams()),
        ]
    )
    # `stateless` must be the class's own declaration, and True itself
    odd = _Counter()
    odd.stateless = True  # type: ignore[attr-defined]
    with pytest.raises(RunError):
        check_client_state_support([odd])


@pytest.mark.slow
def test_undeclared_stateful_defence_on_flower_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "counting_defence.py").write_text(
        textwrap.dedent("""\
            from testbed import hookimpl
            from testbed.registry import Params

            class Counting:
                def __init__(self, params):
                    self.uploads = 0

                @hookimpl
                def testbed_client_update(self, ctx, update):
                    self.uploads += 1

                @hookimpl
                def testbed_round_end(self, ctx, record):
                    record["uploads"] = self.uploads

            @hookimpl
            def testbed_register_defences(registry):
                registry.add("counting", Counting, params=Params)
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY + '\n[[defences]]\nname = "counting"\n')
    out = tmp_path / "run"
    argv = ["-p", "counting_defence", "run", str(scenario), "--out", str(out)]
    assert main([*argv, "--engine", "flower", "--no-progress"]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "counting_defence.Counting runs on the clients (testbed_client_update)" in line
    assert "Traceback" not in err and not out.exists()


@pytest.mark.slow
def test_loopback_deployment_script_runs(tmp_path):
    """scripts/flower_loopback.sh: SuperLink + one SuperNode process per site + flwr run."""
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    out = tmp_path / "run"
    env = {
        **os.environ,
        "BIN": str(Path(sys.executable).parent),
        "PORT": str(free_port_block(4)),
        "TIMEOUT_S": "900",  # a hang guard, not a speed check: CI machines can be loaded
    }
    script = REPO / "scripts" / "flower_loopback.sh"
    proc = subprocess.run(
        [str(script), str(scenario), str(out)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["engine"]["name"] == "flower"
    (rep,) = metrics["tasks"]["synthetic"]["repeats"]
    assert [r["round"] for r in rep["rounds"]] == [1, 2]
    assert rep["privacy"][0]["rounds_accounted"] == 2
    assert set(rep["acc"]) == {"0", "1", "2"}


def free_port_block(n: int) -> int:
    """A port p with p..p+n-1 free on loopback (the SuperLink and n-1 SuperNodes)."""
    for base in range(19200, 20000, n):
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def test_flower_engine_without_flwr_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import testbed.flower.simulation

    monkeypatch.delitem(sys.modules, testbed.flower.simulation.__name__)
    for name in [m for m in sys.modules if m == "flwr" or m.startswith("flwr.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if the flower extra were missing
    monkeypatch.setitem(sys.modules, "flwr", None)
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    out = tmp_path / "run"
    argv = ["run", str(scenario), "--out", str(out), "--engine", "flower", "--no-progress"]
    assert main(argv) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "needs the flower extra" in line
    assert not out.exists()
