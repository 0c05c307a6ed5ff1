import numpy as np
import pytest
import torch
from art.estimators.classification import PyTorchClassifier
from torch import nn

from testbed.builtins.models import PaperCNNParams, build_paper_cnn
from testbed.pluginmanager import build_host
from testbed.transfer import numpy_seeded

EPS = 0.03


@pytest.fixture(scope="module")
def estimator():
    torch.manual_seed(0)
    params = PaperCNNParams(conv_channels=(4, 4, 8, 8, 8, 8), fc_units=(16, 16, 16, 8))
    model = build_paper_cnn(params, 1, 24, 2, [0.5], [0.25]).eval().requires_grad_(False)
    return PyTorchClassifier(
        model,
        loss=nn.CrossEntropyLoss(),
        input_shape=(1, 24, 24),
        nb_classes=2,
        clip_values=(0.0, 1.0),
    )


@pytest.fixture(scope="module")
def registry():
    return build_host(autoload=False).registry


# Images with pixels at 0 and 1 make the [0, 1] clipping bind.
X = np.random.default_rng(0).choice([0.0, 0.5, 1.0], size=(16, 1, 24, 24)).astype(np.float32)

ATTACKS = {
    "fgsm": {"eps": EPS},
    "bim": {"eps": EPS, "eps_step": 0.01, "max_iter": 5},
    "pgd": {"eps": EPS, "eps_step": 0.01, "max_iter": 5, "num_random_init": 1},
}


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_stays_in_eps_ball_and_pixel_range(name, estimator, registry):
    attack = registry.build("attacks", name, ATTACKS[name], estimator=estimator)
    x_adv = attack.generate(x=X)
    assert x_adv.shape == X.shape
    assert np.abs(x_adv - X).max() <= EPS + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert np.abs(x_adv - X).max() > EPS / 2  # it did perturb


def test_pgd_random_start_is_reproducible_under_a_seed(estimator, registry):
    attack = registry.build("attacks", "pgd", ATTACKS["pgd"], estimator=estimator)
    with numpy_seeded(7):
        a = attack.generate(x=X)
    with numpy_seeded(7):
        b = attack.generate(x=X)
    with numpy_seeded(8):
        c = attack.generate(x=X)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_attacks_leave_model_weights_untouched(estimator, registry):
    before = [p.clone() for p in estimator.model.parameters()]
    registry.build("attacks", "pgd", ATTACKS["pgd"], estimator=estimator).generate(x=X)
    assert all(torch.equal(a, b) for a, b in zip(before, estimator.model.parameters(), strict=True))
