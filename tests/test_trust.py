"""A wrong result must never look valid: the federation cache, run folders and resume
refuse or recompute when their inputs differ, and finished work is never deleted."""

from __future__ import annotations

import fcntl
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_cli import TINY, strip_timing

from testbed.builtins.dataset_cache import cache_dir
from testbed.cli import main
from testbed.hostinfo import cpu_flags_digest

# A dataset read from the data root (so two roots give two datasets under one spec), an
# attack that stops the run while a marker file exists (Ctrl-C mid-run), and an
# inference-only defence that draws from the batch's generator.
PLUGIN = """
import os
from pathlib import Path

import numpy as np
import torch
from art.attacks.evasion import FastGradientMethod

from testbed import hookimpl
from testbed.data import ImageDataset
from testbed.registry import Params


class FileDataParams(Params):
    pass


def load(p, data_root=None):
    x, y = torch.load(Path(data_root) / "filedata.pt", weights_only=True)
    return ImageDataset(x, y, ("a", "b"))


class StopParams(Params):
    marker: str


class Stopping(FastGradientMethod):
    def __init__(self, estimator, marker):
        super().__init__(estimator, eps=0.05)
        self.marker = marker

    def generate(self, x, y=None, **kw):
        if os.path.exists(self.marker):
            raise KeyboardInterrupt
        return super().generate(x, y, **kw)


class NoiseParams(Params):
    std: float = 0.1


class Noise:
    stateless = True

    def __init__(self, p):
        self.std = p.std

    @hookimpl
    def testbed_inference_input(self, batch):
        noise = torch.randn(batch.x.shape, generator=batch.generator) * self.std
        batch.x = (batch.x + noise.to(batch.x.device)).clamp(0, 1)


def edit_own_source():  # as when an editable install is edited under a long run
    with open(__file__, "a") as f:
        f.write("\\n# edited while a run was going\\n")


def load_and_edit(p, data_root=None):
    edit_own_source()
    return load(p, data_root)


class Editing(FastGradientMethod):
    def generate(self, x, y=None, **kw):
        edit_own_source()
        return super().generate(x, y, **kw)


@hookimpl
def testbed_register_datasets(registry):
    registry.add("filedata", load, params=FileDataParams)
    registry.add("filedata_editing", load_and_edit, params=FileDataParams)


@hookimpl
def testbed_register_attacks(registry):
    registry.add("stopping", lambda p, estimator: Stopping(estimator, p.marker), params=StopParams)
    registry.add("editing", lambda p, estimator: Editing(estimator, eps=0.05), params=NoiseParams)


@hookimpl
def testbed_register_defences(registry):
    registry.add("input_noise", Noise, params=NoiseParams, stage="inference")
"""

NO_DP = TINY.replace(
    '[dp]\nname = "paper_dp"\nparams = { clip_norm = 1.0, noise_multiplier = 0.5 }\n', ""
)
FILEDATA = NO_DP.replace(
    'name = "synthetic"\nparams = { n_samples = 90, image_size = 16 }', 'name = "filedata"'
)


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    (tmp_path / "trust_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "trust_plugin"
    sys.modules.pop("trust_plugin", None)


def make_root(path: Path, n: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 2
    x[y == 1, :, 4:8, 4:8] = 255  # learnable
    path.mkdir(parents=True)
    torch.save((x, y), path / "filedata.pt")
    return path


def run(tmp_path, args, name="run", text=TINY, extra_args=()):
    scenario = tmp_path / f"{name}.toml"
    scenario.write_text(text)
    out = tmp_path / name
    code = main([*args, "run", str(scenario), "--out", str(out), "--no-progress", *extra_args])
    metrics = out / "metrics.json"
    return code, (json.loads(metrics.read_text()) if metrics.exists() else None)


def repeat0(metrics):
    return next(iter(metrics["tasks"].values()))["repeats"][0]


# --------------------------------------------------------------------------------------
# The federation cache
# --------------------------------------------------------------------------------------


def test_cache_key_covers_the_data_content_not_just_its_spec(tmp_path, plugin):
    a = make_root(tmp_path / "a", 90, 1)
    b = make_root(tmp_path / "b", 60, 2)
    code, m1 = run(tmp_path, ["-p", plugin], "one", FILEDATA, ["--data-root", str(a)])
    assert code == 0 and not repeat0(m1)["cache"]["hit"]
    code, m2 = run(tmp_path, ["-p", plugin], "two", FILEDATA, ["--data-root", str(b)])
    assert code == 0 and not repeat0(m2)["cache"]["hit"]
    assert repeat0(m2)["cache"]["key"] != repeat0(m1)["cache"]["key"]
    code, m3 = run(tmp_path, ["-p", plugin], "three", FILEDATA, ["--data-root", str(a)])
    assert code == 0 and repeat0(m3)["cache"]["hit"]


def test_cache_key_covers_plugin_code(tmp_path, plugin):
    root = make_root(tmp_path / "a", 90, 1)
    assert run(tmp_path, ["-p", plugin], "one", FILEDATA, ["--data-root", str(root)])[0] == 0
    path = tmp_path / "trust_plugin.py"
    path.write_text(path.read_text() + "\n# the same plugin, other code\n")
    code, m2 = run(tmp_path, ["-p", plugin], "two", FILEDATA, ["--data-root", str(root)])
    assert code == 0 and not repeat0(m2)["cache"]["hit"]


def _entry(metrics) -> Path:
    return cache_dir() / "federations" / f"{repeat0(metrics)['cache']['key']}.pt"


def _rewrite(path: Path, change) -> None:
    """Change a cache entry's payload, with a valid checksum or with the old one."""
    import hashlib
    import io

    head, _, blob = path.read_bytes().partition(b"\n")
    payload = torch.load(io.BytesIO(blob), weights_only=True)
    change(payload)
    buf = io.BytesIO()
    torch.save(payload, buf)
    new = buf.getvalue()
    fmt = head.partition(b" ")[0]
    path.write_bytes(fmt + b" " + hashlib.sha256(new).hexdigest().encode() + b"\n" + new)


@pytest.mark.parametrize("damage", ["bit flip", "nan weights", "wrong shape", "truncated"])
def test_a_bad_cache_entry_is_discarded_and_retrained(tmp_path, damage, capsys):
    code, ref = run(tmp_path, [], "ref", TINY)
    assert code == 0
    entry = _entry(ref)
    if damage == "bit flip":
        raw = bytearray(entry.read_bytes())
        raw[-200] ^= 0x10
        entry.write_bytes(bytes(raw))
    elif damage == "nan weights":
        _rewrite(entry, lambda p: p["clients"][0].fill_(float("nan")))
    elif damage == "wrong shape":
        _rewrite(entry, lambda p: p.update({"global": p["global"][:-3]}))
    else:
        entry.write_bytes(entry.read_bytes()[:500])
    capsys.readouterr()
    code, again = run(tmp_path, [], "again", TINY)
    assert code == 0
    assert "discarded" in capsys.readouterr().err
    assert not repeat0(again)["cache"]["hit"]
    assert strip_timing(again)["tasks"] == strip_timing(ref)["tasks"]
    code, third = run(tmp_path, [], "third", TINY)  # the retrained entry replaced it
    assert code == 0 and repeat0(third)["cache"]["hit"]


def test_inference_only_defence_params_reuse_the_trained_federation(tmp_path, plugin):
    defence = '\n[[defences]]\nname = "input_noise"\nparams = {{ std = {} }}\n'
    code, m1 = run(tmp_path, ["-p", plugin], "one", TINY + defence.format(0.1))
    assert code == 0
    code, m2 = run(tmp_path, ["-p", plugin], "two", TINY + defence.format(0.3))
    assert code == 0 and repeat0(m2)["cache"]["hit"]
    assert repeat0(m2)["cache"]["key"] == repeat0(m1)["cache"]["key"]


def test_randomised_inference_is_the_same_from_cache_and_from_training(tmp_path, plugin):
    text = TINY + '\n[[defences]]\nname = "input_noise"\nparams = { std = 0.3 }\n'
    code, trained = run(tmp_path, ["-p", plugin], "trained", text, ["--no-cache"])
    assert code == 0 and not repeat0(trained)["cache"]["hit"]
    code, _ = run(tmp_path, ["-p", plugin], "fill", text)
    code, cached = run(tmp_path, ["-p", plugin], "cached", text)
    assert code == 0 and repeat0(cached)["cache"]["hit"]
    assert strip_timing(cached)["tasks"] == strip_timing(trained)["tasks"]


# --------------------------------------------------------------------------------------
# Run folders and resume
# --------------------------------------------------------------------------------------

STOPPABLE = FILEDATA + textwrap.dedent("""
    [[attacks]]
    name = "stopping"
    label = "STOP"
    params = { marker = "MARKER" }
""")


def interrupted(tmp_path, plugin, root: Path, extra=()) -> tuple[Path, Path]:
    """A run stopped by Ctrl-C in its second attack, after a cached federation."""
    marker = tmp_path / "stop-now"
    text = STOPPABLE.replace("MARKER", str(marker))
    # the same training: the stopped run gets its federation from the cache
    assert run(tmp_path, ["-p", plugin], "fill", FILEDATA, ["--data-root", str(root)])[0] == 0
    marker.touch()
    code, _ = run(tmp_path, ["-p", plugin], "stopped", text, ["--data-root", str(root), *extra])
    assert code == 2
    marker.unlink()
    return tmp_path / "stopped", tmp_path / ".stopped.partial"


def test_ctrl_c_during_attacks_on_a_cached_federation_keeps_finished_attacks(tmp_path, plugin):
    root = make_root(tmp_path / "a", 90, 1)
    out, partial = interrupted(tmp_path, plugin, root)
    assert partial.is_dir()
    assert (partial / "checkpoint" / "filedata" / "seed5.attacks.json").exists()
    args = ["-p", plugin, "run", "--resume", str(out), "--no-progress", "--data-root", str(root)]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(repeat0(metrics)["attacks"]) == {"PGD-3", "STOP"}
    assert "hosts" not in metrics["hardware"]  # resumed where it started
    timing = metrics["timing"]  # this process's total, and the span since the first start
    assert timing["since_first_start_s"] > timing["total_s"] > 0
    assert "since the run first started" in (out / "report.md").read_text()


def test_resume_refuses_other_data(tmp_path, plugin, capsys):
    root = make_root(tmp_path / "a", 90, 1)
    other = make_root(tmp_path / "b", 90, 2)
    out, partial = interrupted(tmp_path, plugin, root)
    capsys.readouterr()
    args = ["-p", plugin, "run", "--resume", str(out), "--no-progress", "--data-root", str(other)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "data differs" in err and "Traceback" not in err
    assert partial.is_dir()


def test_resume_refuses_an_edited_scenario_and_a_damaged_checkpoint(tmp_path, plugin, capsys):
    root = make_root(tmp_path / "a", 90, 1)
    out, partial = interrupted(tmp_path, plugin, root)
    args = ["-p", plugin, "run", "--resume", str(out), "--no-progress", "--data-root", str(root)]
    stored = partial / "scenario.json"
    original = stored.read_text()
    doc = json.loads(original)
    doc["threat_model"]["samples_per_adversary"] = 7
    stored.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(args) == 2
    assert "scenario.json changed" in capsys.readouterr().err
    stored.write_text(original)
    attacks = partial / "checkpoint" / "filedata" / "seed5.attacks.json"
    finished = attacks.read_text()
    attacks.write_text("{not json")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "Traceback" not in err
    attacks.write_text(finished)
    training = partial / "checkpoint" / "filedata" / "seed5.train.pt"
    training.write_bytes(b"PK\x03\x04 not a checkpoint")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "seed5.train.pt is damaged" in err and "Traceback" not in err
    torch.save({"round": 1, "global": torch.zeros(3), "clients": {}, "history": [{}]}, training)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not belong to this run" in err and "Traceback" not in err
    assert partial.is_dir()


def test_a_second_writer_is_refused(tmp_path, plugin, capsys):
    root = make_root(tmp_path / "a", 90, 1)
    out, partial = interrupted(tmp_path, plugin, root)
    fd = os.open(partial / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running testbed process holds it
    try:
        capsys.readouterr()
        args = ["-p", plugin, "run", "--resume", str(out), "--no-progress"]
        assert main([*args, "--data-root", str(root)]) == 2
        assert "in use by another testbed process" in capsys.readouterr().err
        code, _ = run(tmp_path, ["-p", plugin], "stopped", FILEDATA, ["--data-root", str(root)])
        assert code == 2
        assert "in use by another testbed process" in capsys.readouterr().err
    finally:
        os.close(fd)
    assert partial.is_dir()


def test_a_diverged_federation_finishes_with_its_report(tmp_path):
    text = NO_DP.replace("plots = false", "plots = true").replace(
        "rounds = 2", "rounds = 3\nlr = 1e30\nmax_update_norm = 1e38"
    )
    code, metrics = run(tmp_path, [], "diverged", text)
    assert code == 0
    rep = repeat0(metrics)
    losses = [v for r in rep["rounds"] for v in r["train_loss"].values()]
    assert None in losses  # NaN losses, written as null
    # models with non-finite outputs: argmax would have named class 0 and passed for an
    # accuracy; their rates are null (n/a) instead, and an event says why
    diverged = [e["client"] for e in rep["events"] if e["kind"] == "diverged"]
    assert diverged and all(rep["acc"][str(c)] is None for c in diverged)
    assert rep["acc_mean"] is None
    assert all(rep["attacks"][label]["aasr"] is None for label in rep["attacks"])
    report = (tmp_path / "diverged" / "report.md").read_text()
    assert "diverged" in report and "non-finite outputs on" in report
    assert (tmp_path / "diverged" / "plots" / "synthetic" / "training_loss.png").exists()


def test_a_resume_on_another_host_finishes_and_says_so_in_every_report(tmp_path, plugin, capsys):
    root = make_root(tmp_path / "a", 90, 1)
    out, partial = interrupted(tmp_path, plugin, root)
    manifest_path = partial / "checkpoint" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    [here] = manifest["hosts"]
    assert here["cpu_flags"] == cpu_flags_digest()
    args = ["-p", plugin, "run", "--resume", str(out), "--no-progress", "--data-root", str(root)]
    for missing in ("hosts", "started"):  # a manifest that cannot say where and when: refused
        manifest_path.write_text(json.dumps({k: v for k, v in manifest.items() if k != missing}))
        capsys.readouterr()
        assert main(args) == 2
        assert "does not record its host and start" in capsys.readouterr().err
    # the run started on a CPU with other flags and another thread count
    manifest["hosts"] = [{**here, "cpu_flags": "0123456789ab", "threads": here["threads"] + 1}]
    manifest_path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(args) == 0
    err = " ".join(capsys.readouterr().err.split())  # rich wraps lines
    assert "resumed on 2 hosts (cpu_flags, threads differ)" in err
    metrics = json.loads((out / "metrics.json").read_text())
    hosts = metrics["hardware"]["hosts"]
    assert [h["cpu_flags"] for h in hosts] == ["0123456789ab", cpu_flags_digest()]
    assert "resumed on 2 hosts" in (out / "report.md").read_text()
    assert "resumed on 2 hosts" in (out / "report.html").read_text()


@pytest.mark.parametrize("when", ["training", "attacks"])
def test_code_edited_during_a_run_records_nothing_more(tmp_path, plugin, capsys, when):
    """Edited before training ends, no cache entry; before the end, no metrics.json."""
    root = make_root(tmp_path / "a", 90, 1)
    if when == "training":
        text = FILEDATA.replace('name = "filedata"', 'name = "filedata_editing"')
    else:
        text = FILEDATA + '\n[[attacks]]\nname = "editing"\nlabel = "EDIT"\n'
    federations = cache_dir() / "federations"
    before = set(federations.glob("*.pt"))
    capsys.readouterr()
    code, metrics = run(tmp_path, ["-p", plugin], "edited", text, ["--data-root", str(root)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and metrics is None and "Traceback" not in err
    assert "the code changed on disk while the run was going (trust_plugin)" in err
    assert ("before caching the federation" if when == "training" else "metrics.json") in err
    if when == "training":
        assert set(federations.glob("*.pt")) == before
