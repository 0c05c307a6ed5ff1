"""Heterogeneous pre-processing: each client's model sees inputs through its own pipeline."""

import json

import pytest
import torch
from test_cli import TINY

from testbed.builtins.heterogeneous import Pipeline, apply_pipeline
from testbed.cli import main
from testbed.pluginmanager import build_host
from testbed.problems import ScenarioError
from testbed.scenario_load import load_scenario
from testbed.state import InferenceBatch


def test_window_and_gamma_hand_computed():
    x = torch.tensor([[[[0.1, 0.4], [0.6, 0.9]]]])
    # window [0.2, 0.6]: (x - 0.2) / 0.4, clipped -> 0, 0.5, 1, 1; then gamma 2 -> 0, .25, 1, 1
    out = apply_pipeline(Pipeline(window=(0.2, 0.6), gamma=2.0), x)
    assert torch.allclose(out, torch.tensor([[[[0.0, 0.25], [1.0, 1.0]]]]), atol=1e-6)


def test_resampling_keeps_shape_and_range_and_loses_detail():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = apply_pipeline(Pipeline(resample="area", scale=0.5), x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert out.std() < x.std()  # averaging 2x2 blocks smooths noise


def test_each_client_gets_its_pipeline_in_training_and_inference():
    host = build_host(autoload=False)
    d = host.registry.build(
        "defences",
        "heterogeneous_preprocessing",
        {"pipelines": [{"window": [0.0, 0.5]}, {"gamma": 2.0}]},
    )
    x = torch.full((1, 1, 2, 2), 0.4)
    for cid, want in ((0, 0.8), (1, 0.16), (2, 0.8)):  # pipelines cycle over clients
        for hook in (d.testbed_training_inputs, d.testbed_inference_input):
            b = InferenceBatch(cid, x.clone())
            hook(batch=b)
            assert torch.allclose(b.x, torch.full_like(x, want))


def test_bad_window_is_a_validation_error(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        TINY + '[[defences]]\nname = "heterogeneous_preprocessing"\n'
        "params = { pipelines = [{ window = [0.6, 0.2] }] }\n"
    )
    with pytest.raises(ScenarioError) as exc:
        load_scenario(path, build_host(autoload=False).registry)
    assert "defences[0].params.pipelines[0]" in str(exc.value) and "low < high" in str(exc.value)


def test_runs_end_to_end_and_the_adversary_crafts_through_its_own_pipeline(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        TINY + '[[defences]]\nname = "heterogeneous_preprocessing"\n'
        "params = { pipelines = [{ window = [0.0, 0.8] }, { gamma = 1.5 }, "
        '{ resample = "bilinear", scale = 0.5 }] }\n'
    )
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    rep = json.loads((tmp_path / "run" / "metrics.json").read_text())
    attack = rep["tasks"]["synthetic"]["repeats"][0]["attacks"]["PGD-3"]
    assert attack["adaptive_to"] == ["PipelinePreprocessor"]
    assert attack["linf_max"] <= 0.05 + 1e-6
