"""The batched engine gives the in-process engine's numbers within float tolerance, and
falls back to client-by-client training where it cannot batch (issue 14)."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import TINY

import testbed.batched
from testbed.batched import train_stacked
from testbed.builtins.models import PaperCNNParams, build_paper_cnn
from testbed.cli import main
from testbed.local_training import (
    ClientData,
    LocalConfig,
    get_weights,
    local_sgd,
    seeded,
    set_weights,
)
from testbed.scenario import Augment

SIDE = 12


def _model(dropout: float = 0.0) -> torch.nn.Module:
    params = PaperCNNParams(
        conv_channels=(4, 4, 4, 4, 8, 8), fc_units=(8, 8, 8, 8), dropout=dropout
    )
    torch.manual_seed(0)
    return build_paper_cnn(params, 1, SIDE, 2, [0.5], [0.25])


def _clients(sizes: list[int]) -> list[ClientData]:
    g = torch.Generator().manual_seed(1)
    out = []
    for c, n in enumerate(sizes):
        x = torch.randint(0, 256, (n, 1, SIDE, SIDE), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 2, (n,), generator=g)
        out.append(ClientData(c, x, y, x[:0], y[:0]))
    return out


def test_stacked_training_matches_local_sgd_client_by_client():
    """Uneven sizes (7, 12, 5 with batch 4: short last batches, clients running out at
    different steps), momentum, weight decay, flips and rotation: every client ends where
    `local_sgd` puts it, and reports the same mean loss."""
    model = _model()
    cfg = LocalConfig(2, 4, 0.05, 0.9, 1e-3, Augment(hflip=True, vflip=True, rotate_degrees=10))
    clients = _clients([7, 12, 5])
    start = get_weights(model)
    received = [start + 0.01 * c for c in range(3)]  # each client its own download
    trained, losses = train_stacked(
        model, received, clients, cfg, [torch.Generator().manual_seed(10 + c) for c in range(3)]
    )
    for c, data in enumerate(clients):
        m = _model()
        set_weights(m, received[c])
        loss = local_sgd(m.train(), data, cfg, torch.Generator().manual_seed(10 + c))
        assert not torch.allclose(trained[c], received[c])  # it did train
        torch.testing.assert_close(trained[c], get_weights(m), rtol=1e-4, atol=1e-5)
        assert losses[c] == pytest.approx(loss, rel=1e-4)
    assert torch.equal(get_weights(model), start)  # the template model is left alone


def _run(
    tmp_path, engine: str, dropout: float, extra: str = "", name: str = "", cache: bool = False
) -> tuple[dict, dict[int, torch.Tensor]]:
    name = name or f"{engine}{dropout}"
    p = tmp_path / f"{name}.toml"
    fc = "fc_units = [16, 16, 16, 8]"
    text = TINY.replace(f"{fc} }}", f"{fc}, dropout = {dropout} }}")
    text = text.replace("plots = false", "plots = false\nsave_weights = true")
    p.write_text(text.replace("local_epochs = 1", "local_epochs = 2\nmomentum = 0.9") + extra)
    out = tmp_path / name
    args = ["run", str(p), "--out", str(out), "--engine", engine, "--no-progress"]
    assert main([*args] if cache else [*args, "--no-cache"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    weights = {
        c: torch.cat([t.flatten() for t in torch.load(f).values()])
        for c, f in enumerate(sorted((out / "weights").rglob("*client*.pt")))
    }
    return metrics["tasks"]["synthetic"]["repeats"][0], weights


def test_a_run_on_the_batched_engine_matches_the_inprocess_engine(tmp_path, monkeypatch):
    """Paper DP (clipping, per-client download noise) and the attack run on the same
    federation on both; dropout off, which the batched engine needs to batch."""
    a, wa = _run(tmp_path, "inprocess", 0.0)

    def sequential(*args, **kw):
        raise AssertionError("the batched engine trained a client on its own")

    monkeypatch.setattr(testbed.batched, "client_step", sequential)
    b, wb = _run(tmp_path, "batched", 0.0)
    assert len(wa) == 3
    for c in wa:
        torch.testing.assert_close(wb[c], wa[c], rtol=1e-4, atol=1e-5)
    for x, y in zip(a["rounds"], b["rounds"], strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
    assert a["acc"] == pytest.approx(b["acc"], abs=1e-6)


def test_with_dropout_the_batched_engine_trains_client_by_client_bitwise(tmp_path):
    a, wa = _run(tmp_path, "inprocess", 0.25)
    b, wb = _run(tmp_path, "batched", 0.25)
    assert all(torch.equal(wa[c], wb[c]) for c in wa)
    assert a["rounds"] == b["rounds"]


def test_stacked_dropout_draws_each_clients_masks_independently_and_reproducibly():
    """Three clients with the same weights, data and batch order differ only by their
    dropout masks: under "stacked" dropout they end apart (independent masks), the same
    seeded stream gives the same weights again, and without it a random op under vmap is
    refused rather than silently given one mask for all."""
    model = _model(dropout=0.5)
    cfg = LocalConfig(1, 4, 0.1, 0.0, 0.0, Augment(hflip=False))
    one = _clients([8])[0]
    clients = [ClientData(c, one.x_train, one.y_train, one.x_test, one.y_test) for c in range(3)]
    start = get_weights(model)

    def gens() -> list[torch.Generator]:  # the same batch order for all three
        return [torch.Generator().manual_seed(3) for _ in range(3)]

    def train() -> list[torch.Tensor]:
        with seeded(7, start.device):
            trained, _ = train_stacked(
                model, [start] * 3, clients, cfg, gens(), stacked_dropout=True
            )
        return trained

    a, b = train(), train()
    for c in range(3):
        assert torch.equal(a[c], b[c])
    assert not torch.allclose(a[0], a[1]) and not torch.allclose(a[1], a[2])
    no_dropout = _model(dropout=0.0)
    # without dropout the three stay identical: only the masks set them apart
    same, _ = train_stacked(no_dropout, [start] * 3, clients, cfg, gens())
    assert torch.equal(same[0], same[1])
    with pytest.raises(RuntimeError, match="randomness"):
        train_stacked(model, [start] * 3, clients, cfg, gens())


STACKED = '\n[engine]\nname = "batched"\nparams = { dropout = "stacked" }\n'


def test_a_stacked_dropout_run_batches_is_reproducible_and_has_its_own_cache_entries(
    tmp_path, monkeypatch
):
    """The paper CNN has dropout: with dropout = "stacked" the batched engine trains it
    stacked, the same seed gives the same run, and neither an in-process nor an "exact"
    run's cache entries serve it (its numbers are another sample of the training)."""
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path / "cache"))
    exact, _ = _run(tmp_path, "batched", 0.25, name="exact", cache=True)

    def sequential(*args, **kw):
        raise AssertionError("the batched engine trained a client on its own")

    monkeypatch.setattr(testbed.batched, "client_step", sequential)
    a, wa = _run(tmp_path, "batched", 0.25, STACKED, name="stacked", cache=True)
    assert a["cache"]["hit"] is False and a["cache"]["key"] != exact["cache"]["key"]
    b, wb = _run(tmp_path, "batched", 0.25, STACKED, name="again")
    assert all(torch.equal(wa[c], wb[c]) for c in wa)
    assert a["rounds"] == b["rounds"]
    assert a["rounds"] != exact["rounds"]
    report = (tmp_path / "stacked" / "report.md").read_text()
    assert "engine batched (dropout = stacked): dropout masks drawn stacked" in report


def test_engine_params_are_checked_against_the_engine_and_reset_by_engine_flag(tmp_path, capsys):
    p = tmp_path / "s.toml"
    p.write_text(TINY + '[engine]\nname = "inprocess"\nparams = { dropout = "stacked" }\n')
    assert main(["validate", str(p)]) == 2
    assert "engine.params" in capsys.readouterr().out
    p.write_text(TINY + STACKED.replace("stacked", "sometimes"))
    assert main(["validate", str(p)]) == 2
    assert "'exact' or 'stacked'" in capsys.readouterr().out
    # the file's batched params do not follow --engine to another engine
    p.write_text(TINY + STACKED)
    out = tmp_path / "o"
    args = ["run", str(p), "--out", str(out), "--engine", "inprocess", "--no-progress"]
    assert main([*args, "--no-cache"]) == 0
    resolved = json.loads((out / "scenario.json").read_text())
    assert resolved["engine"]["name"] == "inprocess"
    assert resolved["engine"]["params"] == {"capture": "none"}  # its own defaults


ENGINE_PLUGIN = """
from testbed import hookimpl
from testbed.builtins.engines import Direct
from testbed.engines import InProcess

ROUNDS = []


class Counting(InProcess):
    name = "counting"

    def round_step(self, setup):
        inner = super().round_step(setup)

        def step(state, on_client_done):
            ROUNDS.append(state.round + 1)
            return inner(state, on_client_done)

        return step


@hookimpl
def testbed_register_engines(registry):
    registry.add("counting", lambda p: Direct(Counting()), description="counts rounds")
"""


def test_a_third_party_engine_registers_and_runs_through_the_same_hook(
    tmp_path, monkeypatch, capsys
):
    (tmp_path / "counting_engine.py").write_text(ENGINE_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    p = tmp_path / "s.toml"
    p.write_text(TINY + '[engine]\nname = "counting"\n')
    out = tmp_path / "out"
    argv = ["-p", "counting_engine", "run", str(p), "--out", str(out), "--no-progress"]
    assert main([*argv, "--no-cache"]) == 0
    import counting_engine

    assert counting_engine.ROUNDS == [1, 2]  # TINY: 2 rounds, all through the plugin
    # without the plugin the name is unknown: one line, exit 2, before anything runs
    assert main(["run", str(p), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "unknown engine 'counting'" in err[-1], err
