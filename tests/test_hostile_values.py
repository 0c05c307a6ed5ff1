"""Hostile values from clients and plugins: screened, converted or refused with one line
naming the plugin; never a crash at the end of a run, never a silently disabled cache."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from test_cli import TINY

from testbed import hookimpl
from testbed.cli import main
from testbed.federation import (
    FederationState,
    UpdatePolicy,
    finish_round,
    screen_updates,
    server_step,
)
from testbed.numerics import weighted_mean
from testbed.pluginmanager import PluginError, build_host
from testbed.state import ClientUpdate, RoundContext


def ctx(n: int = 2) -> RoundContext:
    return RoundContext(0, 1, 1, n, tuple(range(n)), {i: 1 / n for i in range(n)})


def test_a_huge_finite_update_is_clipped_not_zeroed():
    # ||(1e30,) * 4|| = 2e30 overflows float32 (max 3.4e38 only after the square root):
    # computed in float32 the norm is inf and clipping would multiply by 0.
    u = ClientUpdate(0, torch.full((4,), 1e30), 1, 0.0)
    events = screen_updates([u], torch.zeros(4), UpdatePolicy(max_norm=2.0, on_excess_norm="clip"))
    assert [(e["kind"], e["action"]) for e in events] == [("norm", "clipped")]
    assert torch.allclose(u.delta, torch.ones(4))  # 1e30 / 2e30 * 2 = 1 per coordinate
    assert u.delta.dtype == torch.float32


def test_updates_of_other_dtypes():
    g = torch.zeros(2)
    ups = [
        ClientUpdate(0, torch.tensor([3.0, 4.0], dtype=torch.float64), 1, 0.0),
        ClientUpdate(1, torch.tensor([3, 4]), 1, 0.0),
        ClientUpdate(2, torch.tensor([3 + 0j, 4]), 1, 0.0),
        ClientUpdate(3, torch.tensor([True, False]), 1, 0.0),
        ClientUpdate(4, torch.tensor([0.5, 0.5], dtype=torch.bfloat16), 1, 0.0),
    ]
    events = screen_updates(ups, g, UpdatePolicy(max_norm=10.0))
    assert [(e["client"], e["kind"], e["action"]) for e in events] == [
        (1, "dtype", "dropped"),
        (2, "dtype", "dropped"),
        (3, "dtype", "dropped"),
    ]
    assert ups[0].dropped is None and ups[0].delta.dtype == torch.float32
    assert torch.equal(ups[0].delta, torch.tensor([3.0, 4.0]))
    assert ups[4].dropped is None and ups[4].delta.dtype == torch.float32


class BreaksTheAggregate:
    @hookimpl
    def testbed_after_aggregation(self, ctx, aggregate):
        aggregate.delta = aggregate.delta * float("nan")


class BreaksADownload:
    @hookimpl
    def testbed_broadcast(self, ctx, broadcast):
        broadcast.weights = broadcast.weights[:-1]


def test_the_global_model_is_screened_after_server_hooks():
    host = build_host(autoload=False, extra=[BreaksTheAggregate()])
    ups = [ClientUpdate(0, torch.tensor([1.0, 1.0]), 1, 0.0)]
    new, downloads, agg = server_step(torch.zeros(2), ups, weighted_mean, ctx(1), host.hook)
    assert torch.equal(new, torch.zeros(2)) and torch.equal(downloads[0], torch.zeros(2))
    assert [e["kind"] for e in agg.events] == ["aggregate-nan"]


def test_a_broken_download_is_a_plugin_error():
    host = build_host(autoload=False, extra=[BreaksADownload()])
    ups = [ClientUpdate(0, torch.tensor([1.0, 1.0]), 1, 0.0)]
    with pytest.raises(PluginError, match="BreaksADownload"):
        server_step(torch.zeros(2), ups, weighted_mean, ctx(1), host.hook)


class Recorder:
    def __init__(self, values):
        self.values = values

    @hookimpl
    def testbed_round_end(self, ctx, record):
        record.update(self.values)


def _finish(*plugins):
    host = build_host(autoload=False, extra=plugins)
    state = FederationState(0, torch.zeros(2), {0: torch.zeros(2)})
    ups = [ClientUpdate(0, torch.tensor([1.0, 1.0]), 1, 0.5)]
    return finish_round(state, ctx(1), ups, weighted_mean, host.hook, UpdatePolicy())


def test_numpy_and_torch_values_in_a_record_become_plain_numbers():
    values = {
        "np": np.float64(0.25),
        "np_int": np.int64(3),
        "t": torch.tensor(1.5),
        "nested": {"a": [np.float32(2.0), torch.tensor([1, 2])]},
    }
    rec = _finish(Recorder(values)).history[-1]
    assert rec["np"] == 0.25 and type(rec["np"]) is float
    assert rec["np_int"] == 3 and type(rec["np_int"]) is int
    assert rec["t"] == 1.5 and rec["nested"] == {"a": [2.0, [1, 2]]}
    json.dumps(rec)  # plain JSON, as the cache's weights_only load needs


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"obj": object()}, "record['obj']: object is not a number"),
        ({"c": np.complex128(1j)}, "record['c']: numpy complex128"),
        ({"train_loss": {"0": 9.0}}, "changed the engine's record keys ['train_loss']"),
        ({"events": [{"kind": "mine"}]}, "changed the engine's record keys ['events']"),
    ],
)
def test_a_bad_record_value_names_the_plugin_and_key(values, message):
    with pytest.raises(PluginError) as exc:
        _finish(Recorder(values))
    assert "Recorder" in str(exc.value) and message in str(exc.value)


class NestedMutator:
    @hookimpl
    def testbed_round_end(self, ctx, record):
        record["train_loss"]["0"] = math.nan


def test_a_nested_change_of_an_engine_key_is_refused():
    with pytest.raises(PluginError, match=r"NestedMutator.*\['train_loss'\]"):
        _finish(NestedMutator())


BAD_TRAINER = """
import numpy as np

from testbed import hookimpl
from testbed.registry import Params


class BadTrainer:
    def __init__(self, p):
        pass

    @hookimpl
    def testbed_local_training(self, ctx, model, data, cfg, generator):
        return "fine"


class NumpyRecorder:
    def __init__(self, p):
        pass

    @hookimpl
    def testbed_round_end(self, ctx, record):
        import numpy as np
        record["spread"] = np.float64(ctx.round) / 2


class HalfBatch:  # an input defence that drops images: one prediction per kept image
    stateless = True

    def __init__(self, p):
        pass

    @hookimpl
    def testbed_inference_input(self, batch):
        batch.x = batch.x[: len(batch.x) // 2]


class NaNPixels:
    stateless = True

    def __init__(self, p):
        pass

    @hookimpl
    def testbed_inference_input(self, batch):
        batch.x = batch.x * float("nan")


class VaguePrivacy:  # a figure that does not say at what level or against whom it holds
    def __init__(self, p):
        pass

    @hookimpl
    def testbed_privacy_spent(self):
        return {"mechanism": "vague", "epsilon": 1.0, "delta": 1e-5, "accountant": "rdp"}


@hookimpl
def testbed_register_defences(registry):
    registry.add("vague_privacy", VaguePrivacy)
    registry.add("bad_trainer", BadTrainer)
    registry.add("numpy_recorder", NumpyRecorder)
    registry.add("half_batch", HalfBatch, stage="inference")
    registry.add("nan_pixels", NaNPixels, stage="inference")


class OvershootParams(Params):
    eps: float = 0.05


class Overshoot:  # an attack whose eps is in other units than the pixels' (x 4)
    def __init__(self, p, estimator):
        self.eps = p.eps

    def generate(self, x, y=None, **kw):
        return np.clip(x + 4 * self.eps, 0.0, 1.0)


@hookimpl
def testbed_register_attacks(registry):
    registry.add("overshoot", Overshoot, params=OvershootParams)


def three_outputs(p, in_channels, image_size, num_classes, mean, std):
    import torch

    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))  # whatever the task


@hookimpl
def testbed_register_models(registry):
    registry.add("three_outputs", three_outputs)


def everyone_gets_everything(p):  # benign models trained on the adversary's test images
    import torch

    return lambda labels, n, generator: [torch.arange(len(labels)) for _ in range(n)]


@hookimpl
def testbed_register_partitioners(registry):
    registry.add("leaky", everyone_gets_everything)


def three_labels_two_classes(p, data_root=None):
    import torch

    from testbed.data import ImageDataset

    x = torch.zeros(90, 1, 16, 16, dtype=torch.uint8)
    return ImageDataset(x, torch.arange(90) % 3, ("no_lesion", "lesion"))


@hookimpl
def testbed_register_datasets(registry):
    registry.add("three_labels", three_labels_two_classes)
"""


@pytest.fixture()
def module(tmp_path, monkeypatch):
    (tmp_path / "bad_values_plugin.py").write_text(BAD_TRAINER)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "bad_values_plugin"
    sys.modules.pop("bad_values_plugin", None)


def _run(tmp_path, module, defence, name, text=None):
    """Run TINY with ``defence`` (or the scenario ``text``) and the hostile plugin."""
    scenario = tmp_path / f"{name}.toml"
    scenario.write_text(text or TINY + f'\n[[defences]]\nname = "{defence}"\n')
    out = tmp_path / name
    code = main(["-p", module, "run", str(scenario), "--out", str(out), "--no-progress"])
    return code, out


def _refused(tmp_path, module, capsys, defence=None, text=None) -> str:
    """The one line a run with a hostile plugin stops with (exit 2, no traceback, no
    finished run folder), whitespace-normalised because rich wraps lines."""
    code, out = _run(tmp_path, module, defence, "refused", text)
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "Traceback" not in err and not out.exists(), err
    return err


def test_a_local_training_hook_returning_garbage_is_a_plugin_error(tmp_path, module, capsys):
    assert _run(tmp_path, module, "bad_trainer", "bad")[0] == 2
    err = capsys.readouterr().err
    assert "BadTrainer" in err and "returned str" in err and "Traceback" not in err


def test_numpy_record_values_keep_the_cache_on(tmp_path, module):
    assert _run(tmp_path, module, "numpy_recorder", "one")[0] == 0
    code, out2 = _run(tmp_path, module, "numpy_recorder", "two")
    assert code == 0
    rep = json.loads((out2 / "metrics.json").read_text())["tasks"]["synthetic"]["repeats"][0]
    assert rep["cache"]["hit"]
    assert [r["spread"] for r in rep["rounds"]] == [0.5, 1.0]


def test_an_attack_past_its_budget_is_a_plugin_error_not_a_higher_asr(tmp_path, module, capsys):
    text = TINY + '\n[[attacks]]\nname = "overshoot"\nparams = { eps = 0.05 }\n'
    err = _refused(tmp_path, module, capsys, text=text)
    assert "attack OVERSHOOT (overshoot) went past its budget: Linf 0.2 > eps 0.05" in err


@pytest.mark.parametrize(
    ("defence", "message"),
    [("half_batch", "changed the batch's shape (12, 1, 16, 16) to (6, 1, 16, 16)"),
     ("nan_pixels", "returned non-finite pixels")],
)  # fmt: skip
def test_an_input_defence_that_drops_images_or_returns_nan_is_named(
    tmp_path, module, capsys, defence, message
):
    err = _refused(tmp_path, module, capsys, defence)
    assert "failed in testbed_inference_input" in err and message in err


def test_a_model_with_other_outputs_than_classes_is_one_line_before_training(
    tmp_path, module, capsys
):
    text = TINY.replace("[model]\nparams", '[model]\nname = "three_outputs"\n#')
    err = _refused(tmp_path, module, capsys, text=text)
    assert "model 'three_outputs' returns (1, 3) for one image, expected (1, 2)" in err


def test_a_privacy_figure_that_does_not_say_where_it_holds_is_a_plugin_error(
    tmp_path, module, capsys
):
    err = _refused(tmp_path, module, capsys, "vague_privacy")
    assert "a privacy record lacks level, against, sampling" in err


def test_privacy_record_problems_on_hand_made_records():
    from testbed.privacy import record_problem

    sound = {"mechanism": "m", "accountant": "rdp", "epsilon": 2.0, "delta": 1e-5,
             "level": "client", "against": "the server", "sampling": "all clients"}  # fmt: skip
    assert record_problem(sound) is None
    assert record_problem({**sound, "epsilon": "inf"}) is None  # as metrics.json stores it
    assert record_problem({**sound, "against": ""}) == "lacks against"
    assert record_problem({**sound, "epsilon": -1.0}) == "has epsilon -1.0, not >= 0"
    assert record_problem({**sound, "epsilon": math.nan}) == "has epsilon nan, not >= 0"
    assert record_problem({**sound, "delta": 1.0}) == "has delta 1.0, not in [0, 1)"
    assert record_problem({**sound, "delta": "small"}).endswith("not numbers")
    assert record_problem([sound]) == "is a list, not a dict"


def test_a_partitioner_that_shares_images_between_clients_is_a_plugin_error(
    tmp_path, module, capsys
):
    err = _refused(tmp_path, module, capsys, text=TINY + '[partition]\nname = "leaky"\n')
    assert "partitioner 'leaky' gave an image to two clients, or twice to one" in err


def test_a_dataset_with_labels_past_its_classes_is_one_line(tmp_path, module, capsys):
    data = '[data]\nname = "synthetic"\nparams = { n_samples = 90, image_size = 16 }'
    err = _refused(
        tmp_path, module, capsys, text=TINY.replace(data, '[data]\nname = "three_labels"')
    )
    assert "dataset 'three_labels': ImageDataset.y must lie in 0..1 (one per class)" in err
