import logging

import numpy as np
import pytest
import torch
from art.attacks.evasion import BasicIterativeMethod, FastGradientMethod, ProjectedGradientDescent
from art.attacks.evasion.projected_gradient_descent.projected_gradient_descent_pytorch import (
    ProjectedGradientDescentPyTorch,
)
from art.estimators.classification import PyTorchClassifier
from torch import nn

from testbed.builtins import attacks as attacks_module
from testbed.builtins.attacks import LeanPGDPyTorch, reference_linf_attack
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


# --- the lean ART path (LeanPGDPyTorch / LeanFGSMPyTorch) against stock ART ----------------

# Extra case: two restarts and ragged batches of 5 (16 images) exercise the restart and
# batching logic that the lean `generate` re-implements.
LEAN_CASES = {
    **ATTACKS,
    "pgd-restarts": {
        "eps": EPS,
        "eps_step": 0.01,
        "max_iter": 5,
        "num_random_init": 2,
        "batch_size": 5,
    },
}


def stock_art(name: str, p: dict, estimator):
    """The attack as stock ART builds it, with the same parameters."""
    if name == "fgsm":
        return FastGradientMethod(estimator, norm=np.inf, eps=p["eps"], batch_size=100)
    common = {"eps": p["eps"], "eps_step": p["eps_step"], "max_iter": p["max_iter"]}
    if name == "bim":
        return BasicIterativeMethod(estimator, **common, batch_size=100, verbose=False)
    return ProjectedGradientDescent(
        estimator,
        norm=np.inf,
        **common,
        num_random_init=p["num_random_init"],
        batch_size=p.get("batch_size", 100),
        verbose=False,
    )


def own_labels(estimator) -> np.ndarray:
    """As the engine: one-hot of the model's own predictions."""
    return np.eye(2, dtype=np.float32)[estimator.predict(X).argmax(1)]


@pytest.mark.parametrize("case", LEAN_CASES)
def test_lean_art_path_gives_stock_art_results_under_a_seed(case, estimator, registry):
    name = case.split("-")[0]
    lean = registry.build("attacks", name, LEAN_CASES[case], estimator=estimator)
    assert isinstance(lean, LeanPGDPyTorch)
    stock = stock_art(name, LEAN_CASES[case], estimator)
    for y in (own_labels(estimator), None):
        with numpy_seeded(11):
            a = lean.generate(x=X, y=y)
        with numpy_seeded(11):
            b = stock.generate(x=X, y=y)
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_lean_projection_equals_arts_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    v = (torch.rand((64, 1, 8, 8), generator=g) - 0.5) * 0.1
    eps32 = float(np.float32(EPS))
    edge = [EPS, -EPS, eps32, -eps32, float(np.nextafter(np.float32(EPS), 1)), 0.0, -0.0]
    v.view(-1)[: len(edge)] = torch.tensor(edge)
    for eps in (EPS, 0.01, np.float64(0.02), 0.0, 1.0):
        ours = LeanPGDPyTorch._projection(v, eps, np.inf)
        arts = ProjectedGradientDescentPyTorch._projection(v, eps, np.inf)
        assert ours.dtype == arts.dtype and torch.equal(ours, arts)


def test_lean_path_skips_the_success_rate_unless_it_is_logged(
    estimator, registry, monkeypatch, caplog
):
    attack = registry.build("attacks", "pgd", ATTACKS["pgd"], estimator=estimator)
    y = own_labels(estimator)
    calls = []
    real = attacks_module.compute_success
    monkeypatch.setattr(
        attacks_module, "compute_success", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    art_logger = "art.attacks.evasion.projected_gradient_descent.projected_gradient_descent_pytorch"
    with caplog.at_level(logging.WARNING, logger=art_logger):
        attack.generate(x=X, y=y)
    assert calls == []  # INFO off: no extra forward passes
    with caplog.at_level(logging.INFO, logger=art_logger):
        attack.generate(x=X, y=y)
    assert calls == [1] and "Success rate of attack" in caplog.text  # ART's log line kept


def test_bare_reference_loop_and_lean_art_path_agree(estimator, registry):
    """Smoke test of what benchmarks/ times: same shape, range and eps-ball, and under the
    same seed the same start and maths, so nearly the same pixels. Never compares time."""
    p = ATTACKS["pgd"]
    lean = registry.build("attacks", "pgd", p, estimator=estimator)
    y = own_labels(estimator)
    with numpy_seeded(5):
        art = lean.generate(x=X, y=y)
    with numpy_seeded(5):
        bare = reference_linf_attack(
            estimator.model,
            torch.from_numpy(X),
            torch.from_numpy(y.argmax(1)),
            eps=p["eps"],
            eps_step=p["eps_step"],
            max_iter=p["max_iter"],
            random_init=True,
        ).numpy()
    for x_adv in (art, bare):
        assert x_adv.shape == X.shape and x_adv.dtype == np.float32
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        assert np.abs(x_adv - X).max() <= EPS + 1e-6
        assert np.abs(x_adv - X).max() > EPS / 2
    assert np.mean(np.abs(art - bare) <= 1e-6) > 0.99


def test_budget_violation_on_hand_made_cases():
    from testbed.transfer import budget_violation

    x = np.zeros((2, 1, 1, 2), dtype=np.float32)  # two images of two pixels
    x_adv = x.copy()
    x_adv[0, 0, 0] = [0.03, 0.04]  # L-inf 0.04, L2 0.05, L1 0.07
    inf = {"norm": "inf", "eps": 0.04}
    assert budget_violation(x, x_adv, inf) is None
    assert "Linf 0.04 > eps 0.039" in budget_violation(x, x_adv, {**inf, "eps": 0.039})
    assert budget_violation(x, x_adv, {"norm": "2", "eps": 0.05}) is None
    assert "L2 0.05 > eps 0.049" in budget_violation(x, x_adv, {"norm": "2", "eps": 0.049})
    assert "L1 0.07 > eps 0.06" in budget_violation(x, x_adv, {"norm": "1", "eps": 0.06})
    assert budget_violation(x, x_adv + 5, None).startswith("returned pixels outside [0, 1]")
    assert budget_violation(x, x_adv * np.nan, inf) == "returned non-finite pixels"
    assert "shape (1, 1, 1, 2)" in budget_violation(x, x_adv[:1], inf)
    assert budget_violation(x, x_adv + 4e-7, inf) is None  # float32 rounding is not a breach
