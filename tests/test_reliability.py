"""Hostile client updates, faulty plugins, and kill-and-resume of a real subprocess."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_cli import TINY, strip_timing

from testbed.cli import main
from testbed.federation import UpdatePolicy, screen_updates
from testbed.state import ClientUpdate

SABOTEUR = '''
import torch
from pydantic import Field
from testbed import hookimpl
from testbed.registry import Params


class SabotageParams(Params):
    kind: str
    client: int = 1


class Saboteur:
    """A hostile client: replaces its upload after local training."""

    def __init__(self, p):
        self.p = p

    @hookimpl
    def testbed_client_update(self, ctx, update):
        if update.client_id != self.p.client:
            return
        d = update.delta
        if self.p.kind == "nan":
            update.delta = torch.full_like(d, float("nan"))
        elif self.p.kind == "inf":
            update.delta = d.clone().index_fill_(0, torch.tensor([0]), float("inf"))
        elif self.p.kind == "shape":
            update.delta = d[:-7]
        elif self.p.kind == "norm":
            update.delta = d / d.norm() * 1e9


class Crashing:
    def __init__(self, p):
        pass

    @hookimpl
    def testbed_before_aggregation(self, ctx, updates):
        raise RuntimeError("boom in round %d" % ctx.round)


class Hollow:
    """A defence whose hook lacks @hookimpl: it would never run."""

    def __init__(self, p):
        pass

    def testbed_before_aggregation(self, ctx, updates):
        updates.clear()


@hookimpl
def testbed_register_defences(registry):
    registry.add("sabotage", Saboteur, params=SabotageParams)
    registry.add("crashing", Crashing)
    registry.add("hollow", Hollow)
'''


@pytest.fixture()
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "hostile_plugin.py").write_text(SABOTEUR)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "hostile_plugin"
    sys.modules.pop("hostile_plugin", None)


def run_with(tmp_path, module, defence: str, extra: str = "") -> tuple[int, dict | None]:
    scenario = tmp_path / "s.toml"
    scenario.write_text(TINY + extra + f"\n[[defences]]\n{defence}\n")
    out = tmp_path / "run"
    code = main(["-p", module, "run", str(scenario), "--out", str(out), "--no-progress"])
    metrics = out / "metrics.json"
    return code, json.loads(metrics.read_text()) if metrics.exists() else None


@pytest.mark.parametrize(
    ("kind", "extra", "action"),
    [
        ("nan", "", "dropped"),
        ("inf", "", "dropped"),
        ("shape", "", "dropped"),
        ("norm", "", "dropped"),
        ("norm", 'max_update_norm = 100.0\non_excess_norm = "clip"\n', "clipped"),
    ],
)
def test_hostile_update_is_recorded_and_survived(tmp_path, plugin_module, kind, extra, action):
    text = TINY.replace('device = "cpu"\n', 'device = "cpu"\n' + extra)
    scenario = tmp_path / "s.toml"
    defence = f'\n[[defences]]\nname = "sabotage"\nparams = {{ kind = "{kind}" }}\n'
    scenario.write_text(text + defence)
    out = tmp_path / "run"
    args = ["-p", plugin_module, "run", str(scenario), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    rep = json.loads((out / "metrics.json").read_text())["tasks"]["synthetic"]["repeats"][0]
    events = rep["events"]
    assert [e["round"] for e in events] == [1, 2]  # every round, client 1
    assert all(e["client"] == 1 and e["kind"] == kind and e["action"] == action for e in events)
    for r in rep["rounds"]:
        assert ("1" in r["dropped"]) == (action == "dropped")
        assert r["included"] == ([0, 2] if action == "dropped" else [0, 1, 2])
    assert all(0 <= a <= 1 for a in rep["acc"].values())


def test_screening_on_hand_made_updates():
    g = torch.zeros(4)
    ups = [
        ClientUpdate(0, torch.tensor([1.0, 0, 0, 0]), 1, 0.0),
        ClientUpdate(1, torch.tensor([float("nan"), 0, 0, 0]), 1, 0.0),
        ClientUpdate(2, torch.zeros(3), 1, 0.0),
        ClientUpdate(3, torch.tensor([0.0, 300, 400, 0]), 1, 0.0),  # norm 500
    ]
    events = screen_updates(ups, g, UpdatePolicy(max_norm=50.0, on_excess_norm="clip"))
    assert [(e["client"], e["kind"], e["action"]) for e in events] == [
        (1, "nan", "dropped"),
        (2, "shape", "dropped"),
        (3, "norm", "clipped"),
    ]
    assert ups[0].dropped is None and ups[3].dropped is None
    assert torch.allclose(ups[3].delta, torch.tensor([0.0, 30, 40, 0]))


def test_exception_in_plugin_hook_names_plugin_and_hook(tmp_path, plugin_module, capsys):
    code, metrics = run_with(tmp_path, plugin_module, 'name = "crashing"')
    err = capsys.readouterr().err
    assert code == 2 and metrics is None
    assert "hostile_plugin" in err and "testbed_before_aggregation" in err
    assert "boom in round 1" in err and "Traceback" not in err


def test_a_defence_whose_object_implements_no_hook_stops_the_run(tmp_path, plugin_module, capsys):
    code, metrics = run_with(tmp_path, plugin_module, 'name = "hollow"')
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and metrics is None and "Traceback" not in err
    assert "plugin 'hostile_plugin.Hollow#" in err and "implements no testbed hook" in err
    assert list(tmp_path.glob("*run*")) == []  # no folder, not even a partial one


@pytest.mark.parametrize(
    ("module", "source", "named"),
    [
        # a misspelt hook name
        ("typo_plugin", "@hookimpl\ndef testbed_before_aggregaton(ctx, updates):\n    pass\n",
         "testbed_before_aggregaton"),
        # a spec's hook with an argument it does not have
        ("badargs_plugin", "@hookimpl\ndef testbed_broadcast(ctx, broadcast, extra):\n    pass\n",
         "is invalid"),
        # spelt right but not marked: pluggy would register the module and never call it, so
        # the run would go ahead without the plugin the user asked for
        ("unmarked_plugin", "def testbed_before_aggregation(ctx, updates):\n    pass\n",
         "implements no testbed hook"),
    ],
)  # fmt: skip
def test_a_faulty_plugin_module_is_rejected_at_load(tmp_path, monkeypatch, capsys, module,
                                                    source, named):  # fmt: skip
    (tmp_path / f"{module}.py").write_text("from testbed import hookimpl\n\n" + source)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["-p", module, "plugins"]) == 2
    err = capsys.readouterr().err
    assert module in err and named in err and "Traceback" not in err


KILLABLE = (
    TINY.replace("rounds = 2", "rounds = 8").replace("n_samples = 90", "n_samples = 240")
    + """
[[attacks]]
name = "bim"
label = "BIM-slow"
params = { eps = 0.05, eps_step = 0.005, max_iter = 60 }
"""
)


def _wait_for(proc: subprocess.Popen, predicate, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"run ended (code {proc.returncode}) before the kill point")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("kill point not reached in time")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["training", "attacks"])
def test_sigkill_then_resume_gives_identical_metrics(tmp_path, kill_at):
    scenario = tmp_path / "k.toml"
    scenario.write_text(KILLABLE)
    ref = tmp_path / "ref"
    assert main(["run", str(scenario), "--out", str(ref), "--no-progress", "--no-cache"]) == 0

    out = tmp_path / "killed"
    ckpt = tmp_path / ".killed.partial" / "checkpoint" / "synthetic"
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed.cli", "run", str(scenario), "--out", str(out),
         "--no-progress", "--no-cache"],
        env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def past_round_3() -> bool:
        try:
            return torch.load(ckpt / "seed5.train.pt", weights_only=True)["round"] >= 3
        except Exception:  # not written yet, or caught mid-rename
            return False

    if kill_at == "training":
        _wait_for(proc, past_round_3)
    else:
        _wait_for(proc, lambda: (ckpt / "seed5.attacks.json").exists())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and (tmp_path / ".killed.partial").is_dir()

    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    assert not (tmp_path / ".killed.partial").exists()
    assert not (out / "checkpoint").exists()
    got = json.loads((out / "metrics.json").read_text())
    want = json.loads((ref / "metrics.json").read_text())
    assert strip_timing(got) == strip_timing(want)
