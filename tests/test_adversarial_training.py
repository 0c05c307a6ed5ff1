"""PGD adversarial training (ART's AdversarialTrainer) in each client's local rounds."""

import json

import torch
from test_cli import TINY
from test_federation import CFG, ctx, data, tiny_model

from testbed.cli import main
from testbed.local_training import get_weights
from testbed.pluginmanager import build_host


def train_once(seed: int, ratio: float) -> torch.Tensor:
    host = build_host(autoload=False)
    d = host.registry.build("defences", "adversarial_training", {"ratio": ratio, "max_iter": 2})
    model = tiny_model()
    loss = d.testbed_local_training(
        ctx=ctx(seed=seed), model=model, data=data(), cfg=CFG, generator=torch.Generator()
    )
    assert loss > 0
    return get_weights(model)


def test_trains_reproducibly_and_differs_from_other_seeds_and_ratios():
    w0 = get_weights(tiny_model())
    a, b = train_once(1, 0.5), train_once(1, 0.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, w0)
    assert not torch.equal(a, train_once(2, 0.5))
    assert not torch.equal(a, train_once(1, 1.0))


def test_takes_over_local_training_in_a_run(tmp_path):
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        TINY + '[[defences]]\nname = "adversarial_training"\n'
        "params = { eps = 0.05, eps_step = 0.02, max_iter = 2, ratio = 0.5 }\n"
    )
    assert main(["run", str(scenario), "--out", str(tmp_path / "adv"), "--no-progress"]) == 0
    plain = tmp_path / "plain.toml"
    plain.write_text(TINY)
    assert main(["run", str(plain), "--out", str(tmp_path / "plain"), "--no-progress"]) == 0

    def rounds(name: str) -> list:
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        return m["tasks"]["synthetic"]["repeats"][0]["rounds"]

    assert rounds("adv")[0]["train_loss"] != rounds("plain")[0]["train_loss"]
