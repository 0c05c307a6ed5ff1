"""The in-process engine's captured local training (`testbed.captured`, issue 14): the
step it records as a CUDA graph is `local_sgd`'s, bitwise where it runs eagerly (CPU);
the GPU tests at the end run on a lent GPU (scripts/lease/full_schedule.py --bench)."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import TINY

from testbed.builtins.models import PaperCNNParams, build_paper_cnn
from testbed.captured import CapturedSGD
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
CFG = LocalConfig(2, 4, 0.05, 0.9, 1e-3, Augment(hflip=True, vflip=True, rotate_degrees=10))
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(dropout: float, device: str = "cpu") -> torch.nn.Module:
    params = PaperCNNParams(
        conv_channels=(4, 4, 4, 4, 8, 8), fc_units=(8, 8, 8, 8), dropout=dropout
    )
    torch.manual_seed(0)
    return build_paper_cnn(params, 1, SIDE, 2, [0.5], [0.25]).to(device).train()


def _clients(sizes: list[int], device: str = "cpu") -> list[ClientData]:
    g = torch.Generator().manual_seed(1)
    out = []
    for c, n in enumerate(sizes):
        x = torch.randint(0, 256, (n, 1, SIDE, SIDE), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 2, (n,), generator=g)
        x, y = x.to(device), y.to(device)
        out.append(ClientData(c, x, y, x[:0], y[:0]))
    return out


def _train(trainer, model, received, data, seed) -> tuple[torch.Tensor, float]:
    set_weights(model, received)
    with seeded(seed, received.device):
        loss = trainer(model, data, CFG, torch.Generator().manual_seed(seed))
    return get_weights(model), loss


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_one_trainer_for_the_whole_run_is_local_sgd_bitwise(dropout):
    """One CapturedSGD, run eagerly, trains three clients in turn (sizes 7, 12, 5 with batch
    4: short last batches; momentum, weight decay, flips, rotation, dropout) and each ends
    exactly where a fresh `local_sgd` puts it, with the same mean loss: the momentum a
    client leaves behind is not carried to the next, the model copy it trains is loaded
    from the caller's and written back."""
    trainer = CapturedSGD(capture=False)
    model = _model(dropout)
    start = get_weights(model)
    for c, data in enumerate(_clients([7, 12, 5])):
        received = start + 0.01 * c
        got, loss = _train(trainer, model, received, data, seed=10 + c)
        want, want_loss = _train(local_sgd, _model(dropout), received, data, seed=10 + c)
        assert not torch.equal(want, received)  # it did train
        assert torch.equal(got, want)
        assert loss == want_loss


def test_one_trainer_refuses_another_configuration_and_a_graph_without_cuda():
    trainer = CapturedSGD(capture=False)
    model, (data,) = _model(0.0), _clients([5])
    trainer(model, data, CFG, torch.Generator())
    other = LocalConfig(1, 4, 0.05, 0.9, 1e-3, CFG.augment)
    with pytest.raises(RuntimeError, match="configuration changed"):
        trainer(model, data, other, torch.Generator())
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        CapturedSGD(capture=True)(model, data, CFG, torch.Generator())


def test_capture_on_a_cpu_run_is_a_one_line_error(tmp_path, capsys):
    p = tmp_path / "s.toml"
    p.write_text(TINY + '[engine]\nname = "inprocess"\nparams = { capture = "cuda-graph" }\n')
    assert main(["run", str(p), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr()
    text = err.out + err.err
    assert 'capture = "cuda-graph" needs a CUDA device' in text
    assert "Traceback" not in text
    assert not (tmp_path / "o" / "metrics.json").exists()


@CUDA
def test_on_a_gpu_the_replayed_graph_trains_as_the_eager_step_does():
    """Without dropout the graph replays the eager arithmetic: the same weights up to the
    GPU's own run-to-run differences (cuDNN's atomics, carried on by momentum: a loose
    tolerance; a stale input or a step left out moves the weights by 1e-2 and more)."""
    trainer = CapturedSGD(capture=True)
    model = _model(0.0, "cuda")
    start = get_weights(model)
    for c, data in enumerate(_clients([7, 12, 5], "cuda")):
        got, loss = _train(trainer, model, start, data, seed=c)
        want, want_loss = _train(local_sgd, _model(0.0, "cuda"), start, data, seed=c)
        assert not torch.equal(want, start)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
        assert loss == pytest.approx(want_loss, rel=1e-3)
    assert trainer._graph is not None  # the full batches replayed a graph


@CUDA
def test_on_a_gpu_the_graphs_dropout_masks_follow_the_seed():
    """The captured dropout draws from the seeded generator at every replay: the same seed
    gives the same weights, another seed other weights."""
    trainer = CapturedSGD(capture=True)
    model = _model(0.5, "cuda")
    start = get_weights(model)
    (data,) = _clients([24], "cuda")
    a, _ = _train(trainer, model, start, data, seed=1)
    b, _ = _train(trainer, model, start, data, seed=1)
    gen = torch.Generator().manual_seed(1)
    set_weights(model, start)
    with seeded(2, start.device):  # the same batches, other masks
        trainer(model, data, CFG, gen)
    c = get_weights(model)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert (a - c).abs().max() > 1e-2


@CUDA
def test_on_a_gpu_a_captured_run_matches_an_eager_run(tmp_path):
    def run(name: str, extra: str) -> dict:
        p = tmp_path / f"{name}.toml"
        fc = "fc_units = [16, 16, 16, 8]"  # dropout off: eager and graph draw masks apart
        text = TINY.replace(f"{fc} }}", f"{fc}, dropout = 0.0 }}")
        p.write_text(text.replace('device = "cpu"', 'device = "cuda"') + extra)
        out = tmp_path / name
        assert main(["run", str(p), "--out", str(out), "--no-progress", "--no-cache"]) == 0
        return json.loads((out / "metrics.json").read_text())["tasks"]["synthetic"]

    eager = run("eager", "")
    graph = run("graph", '[engine]\nname = "inprocess"\nparams = { capture = "cuda-graph" }\n')
    for x, y in zip(eager["repeats"][0]["rounds"], graph["repeats"][0]["rounds"], strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-3)
    assert "replayed as a captured CUDA graph" in (tmp_path / "graph" / "report.md").read_text()


def test_an_engine_param_set_without_the_engines_name_is_checked(tmp_path, capsys):
    """--set engine.params.capture=... on a scenario with no [engine] table names the
    default engine's param, and a wrong value is the same one-line problem as in a file."""
    p = tmp_path / "s.toml"
    p.write_text(TINY)
    assert main(["validate", str(p), "--set", "engine.params.capture=yes"]) == 2
    assert (
        "engine.params.capture: Input should be 'none' or 'cuda-graph'" in capsys.readouterr().out
    )
    assert main(["validate", str(p), "--set", "engine.params.capture=cuda-graph"]) == 0
