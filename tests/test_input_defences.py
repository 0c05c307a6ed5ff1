"""ART input transformations on every deployed model; adaptive or not, as the report says."""

import json

import pytest
import torch
from test_cli import TINY

from testbed.cli import main
from testbed.pluginmanager import build_host
from testbed.state import InferenceBatch


@pytest.fixture(scope="module")
def registry():
    return build_host(autoload=False).registry


def test_feature_squeezing_quantises_inputs(registry):
    d = registry.build("defences", "feature_squeezing", {"bit_depth": 1})
    batch = InferenceBatch(0, torch.tensor([[[[0.1, 0.4], [0.6, 0.9]]]]))
    d.testbed_inference_input(batch=batch)
    assert torch.equal(batch.x, torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]]))


@pytest.mark.parametrize("name", ["jpeg_compression", "spatial_smoothing"])
def test_transforms_keep_shape_range_and_change_noise(registry, name):
    d = registry.build("defences", name, {})
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    batch = InferenceBatch(0, x.clone())
    d.testbed_inference_input(batch=batch)
    assert batch.x.shape == x.shape and batch.x.dtype == x.dtype
    assert batch.x.min() >= 0 and batch.x.max() <= 1
    assert not torch.allclose(batch.x, x)  # i.i.d. noise is not left untouched


def test_only_adaptive_defences_reach_the_adversary(registry):
    plain = registry.build("defences", "spatial_smoothing", {})
    adaptive = registry.build("defences", "spatial_smoothing", {"adaptive": True})
    assert plain.testbed_attack_preprocessing(client_id=0) is None
    assert adaptive.testbed_attack_preprocessing(client_id=0) == [adaptive.pre]


@pytest.mark.parametrize("adaptive", [False, True])
def test_run_records_whether_the_attack_was_adaptive(tmp_path, adaptive):
    scenario = tmp_path / "s.toml"
    flag = "true" if adaptive else "false"
    scenario.write_text(
        TINY + f'[[defences]]\nname = "feature_squeezing"\nparams = {{ bit_depth = 3, '
        f"adaptive = {flag} }}\n"
    )
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "metrics.json").read_text())["tasks"]["synthetic"]["repeats"][0]
    assert rep["attacks"]["PGD-3"]["adaptive_to"] == (["FeatureSqueezing"] if adaptive else [])
