"""The robustness-evaluation attacks (testbed/builtins/strong_attacks.py) on a tiny CNN, and
the engine's handling of them (targets, direction split, perceptibility) in run_attack."""

import math

import numpy as np
import pytest
import torch
from art.estimators.classification import PyTorchClassifier
from pydantic import ValidationError
from torch import nn

from testbed.builtins.models import PaperCNNParams, build_paper_cnn
from testbed.local_training import ClientData
from testbed.pluginmanager import build_host
from testbed.scenario import Attack
from testbed.transfer import deploy, numpy_seeded, run_attack, target_problem

SIDE = 16
TINY = PaperCNNParams(conv_channels=(4, 4, 8, 8, 8, 8), fc_units=(16, 16, 16, 8))


def tiny_model(classes: int, seed: int = 0) -> nn.Module:
    """The tiny paper CNN fitted for a few steps to a rule on mean brightness (class k for
    the k-th band), so that its decision boundaries pass near the images: an untrained one
    gives every image the same class by a margin no small budget can cross."""
    torch.manual_seed(seed)
    model = build_paper_cnn(TINY, 1, SIDE, classes, [0.5], [0.25])
    x = torch.rand(128, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    x = (x + torch.linspace(-0.3, 0.3, 128).view(-1, 1, 1, 1)).clamp(0, 1)
    brightness = x.mean(dim=(1, 2, 3))
    y = torch.bucketize(brightness, brightness.quantile(torch.linspace(0, 1, classes + 1)[1:-1]))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval().requires_grad_(False)


def classifier(model: nn.Module, classes: int) -> PyTorchClassifier:
    return PyTorchClassifier(
        model,
        loss=nn.CrossEntropyLoss(),
        input_shape=(1, SIDE, SIDE),
        nb_classes=classes,
        clip_values=(0.0, 1.0),
    )


@pytest.fixture(scope="module")
def binary():
    return classifier(tiny_model(2, seed=1), 2)


@pytest.fixture(scope="module")
def three():
    return classifier(tiny_model(3), 3)


@pytest.fixture(scope="module")
def registry():
    return build_host(autoload=False).registry


# Brightness spread across the images so that the tiny models give them different classes.
_SPREAD = np.linspace(-0.15, 0.15, 8).reshape(-1, 1, 1, 1)
X = np.clip(np.random.default_rng(0).random((8, 1, SIDE, SIDE)) + _SPREAD, 0, 1).astype(np.float32)


def own_labels(est: PyTorchClassifier) -> np.ndarray:
    return np.eye(est.nb_classes, dtype=np.float32)[est.predict(X).argmax(1)]


def flipped(est: PyTorchClassifier, x_adv: np.ndarray) -> float:
    return float(np.mean(est.predict(x_adv).argmax(1) != est.predict(X).argmax(1)))


def in_pixel_range(x_adv: np.ndarray) -> bool:
    return x_adv.shape == X.shape and x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def norms(x_adv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = (x_adv - X).reshape(len(X), -1).astype(np.float64)
    return np.linalg.norm(d, axis=1), np.abs(d).max(axis=1)


# Small budgets so each attack runs in well under a second on 8 images.
BOUNDED = {
    "autoattack-inf": (
        "autoattack",
        {"eps": 0.05, "eps_step": 0.02, "max_iter": 5, "nb_random_init": 1, "square_max_iter": 20},
    ),
    "autoattack-2": (
        "autoattack",
        {
            "norm": "2",
            "eps": 0.5,
            "eps_step": 0.2,
            "max_iter": 5,
            "nb_random_init": 1,
            "square_max_iter": 20,
        },
    ),
    "square-inf": ("square", {"eps": 0.05, "max_iter": 30}),
    "square-2": ("square", {"norm": "2", "eps": 0.5, "max_iter": 30}),
}


@pytest.mark.parametrize("case", BOUNDED)
def test_bounded_attacks_respect_budget_and_pixel_range(case, binary, registry):
    name, params = BOUNDED[case]
    attack = registry.build("attacks", name, params, estimator=binary)
    with numpy_seeded(0):
        x_adv = attack.generate(x=X, y=own_labels(binary))
    l2, linf = norms(x_adv)
    assert in_pixel_range(x_adv)
    bound = linf if params.get("norm", "inf") == "inf" else l2
    assert bound.max() <= params["eps"] * (1 + 1e-4) + 1e-6
    assert bound.max() > 0  # it did perturb


MIN_NORM = {
    "cw_l2": {"max_iter": 10, "binary_search_steps": 5, "learning_rate": 0.1},
    "cw_linf": {"max_iter": 10, "learning_rate": 0.1},
    "deepfool": {"max_iter": 20},
    "hopskipjump": {"max_iter": 3, "max_eval": 50, "init_eval": 10, "init_size": 20},
}


@pytest.mark.parametrize("name", MIN_NORM)
def test_minimum_norm_attacks_fool_the_model_within_pixel_range(name, binary, registry):
    attack = registry.build("attacks", name, MIN_NORM[name], estimator=binary)
    with numpy_seeded(0):
        x_adv = attack.generate(x=X, y=own_labels(binary))
    assert in_pixel_range(x_adv)
    assert flipped(binary, x_adv) >= 0.5


# A large constant c: the tiny model's targeted boundary is farther than its untargeted one.
TARGETED = {
    "cw_l2": {"max_iter": 10, "binary_search_steps": 5, "learning_rate": 0.2, "initial_const": 10},
    "hopskipjump": MIN_NORM["hopskipjump"],
}


@pytest.mark.parametrize("name", TARGETED)
def test_targeted_attacks_move_toward_the_target(name, three, registry):
    clean = three.predict(X).argmax(1)
    # the class the model predicts for the fewest images (but some: one it can reach)
    counts = np.bincount(clean, minlength=3).astype(float)
    target = int(np.where(counts > 0, counts, np.inf).argmin())
    params = {**TARGETED[name], "targeted": True, "target": target}
    attack = registry.build("attacks", name, params, estimator=three)
    y = np.eye(3, dtype=np.float32)[np.full(len(X), target)]
    with numpy_seeded(0):
        x_adv = attack.generate(x=X, y=y)
    away = clean != target
    hit = three.predict(x_adv).argmax(1)[away] == target
    assert in_pixel_range(x_adv) and away.sum() >= 4
    assert hit.mean() >= 0.5


def test_autoattack_drops_dlr_on_binary_tasks_and_keeps_it_otherwise(binary, three, registry):
    params = BOUNDED["autoattack-inf"][1]
    two = registry.build("attacks", "autoattack", params, estimator=binary)
    members = [getattr(a, "loss_type", type(a).__name__) for a in two.attacks]
    assert "difference_logits_ratio" not in members and len(two.attacks) == 3
    assert any("DLR" in n for n in two.testbed_notes) and not two.targeted
    many = registry.build("attacks", "autoattack", params, estimator=three)
    assert "difference_logits_ratio" in [getattr(a, "loss_type", "") for a in many.attacks]
    assert many.targeted and many.testbed_notes == []
    with numpy_seeded(0):
        x_adv = many.generate(x=X, y=own_labels(three))
    assert np.abs(x_adv - X).max() <= params["eps"] * (1 + 1e-4) + 1e-6


@pytest.mark.parametrize(
    "name, params, fragment",
    [
        ("square", {"eps": 2.0}, "above 1"),
        ("cw_l2", {"targeted": True}, "needs a target"),
        ("cw_l2", {"target": "lesion_to_healthy"}, "targeted is false"),
        ("hopskipjump", {"init_eval": 200, "max_eval": 100}, "init_eval"),
        ("autoattack", {"eps": 0.1, "eps_step": 0.1, "members": ["square", "square"]}, "repeat"),
        ("deepfool", {"eps": 0.1}, "Extra inputs"),
        # an L2 attack given an L-inf-only param, and the reverse: the attack that takes it
        ("cw_l2", {"largest_const": 5.0}, "a parameter of cw_linf"),
        ("cw_linf", {"binary_search_steps": 3}, "a parameter of cw_l2"),
        ("pgd", {"eps": 0.1, "eps_step": 0.01, "max_iter": 3, "norm": "2"}, "L-inf attacks"),
    ],
)
def test_bad_params_are_rejected(name, params, fragment, registry):
    comp = registry["attacks"].get(name)
    with pytest.raises(ValidationError, match=fragment):
        comp.params.model_validate(params)


def _federation(n: int = 2) -> tuple[list, list[ClientData]]:
    models = [tiny_model(2, seed=s) for s in range(1, n + 1)]
    x = torch.from_numpy((X * 255).astype(np.uint8))
    y = torch.from_numpy(np.arange(len(X)) % 2)
    clients = [ClientData(c, x, y, x, y) for c in range(n)]
    return deploy(models), clients


def _run(spec: Attack, registry, swap: bool = False) -> dict:
    deployed, clients = _federation()
    # swap: each adversary crafts on the other client's model, as the outsider does on its
    # surrogate
    crafting = {0: deployed[1].model, 1: deployed[0].model} if swap else None
    result, _ = run_attack(
        spec,
        deployed,
        clients,
        [0, 1],
        registry,
        build_host(autoload=False).hook,  # no defence registered
        seed=0,
        samples=len(X),
        num_classes=2,
        device=torch.device("cpu"),
        classes=("lesion", "no_lesion"),
        crafting=crafting,
    )
    return result


def test_engine_passes_targets_and_records_direction_and_perceptibility(registry):
    spec = Attack(
        name="cw_l2",
        params={**TARGETED["cw_l2"], "targeted": True, "target": "lesion_to_healthy"},
    )
    r = _run(spec, registry)
    assert r["healthy_class"] == {"index": 1, "name": "no_lesion"}
    assert r["targeted"] and r["access"] == "white-box" and r["budget"] is None
    # aimed at healthy: on the own model, images predicted lesion move to healthy and none
    # predicted healthy leaves it, so the whole ASR is the missed-diagnosis direction
    # (had it been handed the predictions, a targeted CW would aim where each image is)
    own_tsr = [r["tsr"][i][a] for i, a in enumerate(r["adversaries"])]
    assert min(own_tsr) > 0 and sum(own_tsr) / len(own_tsr) >= 0.5
    for i, a in enumerate(r["adversaries"]):
        away_from_healthy = r["direction"]["healthy_to_lesion"][i][a]
        assert math.isnan(away_from_healthy) or away_from_healthy == 0.0
    assert r["direction"]["lesion_to_healthy_own"] == sum(own_tsr) / len(own_tsr)
    p = r["perceptibility"]
    assert p["n"] == 2 * len(X) and 0 < p["l2_mean"] <= p["l2_max"]
    assert p["ssim_min"] <= p["ssim_mean"] <= 1 and p["psnr_mean"] > 0
    assert len(r["per_image"]["pred_adv_own"]) == 2


def test_engine_records_the_budget_and_access_of_a_black_box_attack(registry):
    r = _run(Attack(name="square", params={"eps": 0.05, "max_iter": 20}), registry)
    assert r["access"] == "black-box" and r["budget"] == {"norm": "inf", "eps": 0.05}
    assert r["perceptibility"]["linf_max"] <= 0.05 + 1e-6
    assert r["tsr"] is None and r["notes"] == []


def test_engine_crafts_on_the_given_model_and_scores_it_as_white_box(registry):
    spec = Attack(name="pgd", params={"eps": 0.1, "eps_step": 0.02, "max_iter": 5})
    r = _run(spec, registry, swap=True)
    assert r["crafted_on"] == "surrogate"
    # crafted on the other client's model: that model's cell of the ASR matrix is the
    # white-box ASR on the crafting model
    assert r["asr_crafting"] == [r["asr"][0][1], r["asr"][1][0]]
    assert max(r["asr_crafting"]) > 0
    assert _run(spec, registry)["asr_crafting"] is None


@pytest.mark.parametrize(
    ("target", "classes", "fragment"),
    [
        (5, ("no_lesion", "lesion"), "target 5 is not a class of this task (0..1"),
        ("lesion_to_healthy", ("cat", "dog"), "needs a class named healthy"),
        ("healthy_to_lesion", ("tumour", "glioma"), "give the target class index instead"),
    ],
)
def test_a_target_the_task_cannot_have_is_named(target, classes, fragment):
    spec = Attack(name="cw_l2", label="CW", params={"targeted": True, "target": target})
    assert fragment in (target_problem(spec, classes) or "")


def test_targets_the_task_has_pass():
    for target in (1, "lesion_to_healthy", "healthy_to_lesion"):
        spec = Attack(name="cw_l2", label="CW", params={"targeted": True, "target": target})
        assert target_problem(spec, ("no_lesion", "lesion")) is None
    assert target_problem(Attack(name="cw_l2", label="CW", params={}), ("a", "b")) is None


def test_a_target_class_beyond_the_task_stops_the_run_before_training(
    tmp_path, capsys, monkeypatch
):
    from test_cli import TINY

    from testbed.cli import main
    from testbed.engines import InProcess

    def no_training(self, setup):
        raise AssertionError("trained before checking the attack's target")

    monkeypatch.setattr(InProcess, "round_step", no_training)
    p = tmp_path / "s.toml"
    p.write_text(TINY + '[[attacks]]\nname = "cw_l2"\nparams = { targeted = true, target = 4 }\n')
    assert main(["run", str(p), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error:") and "target 4 is not a class of this task" in last, last
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_hopskipjump_is_reproducible_under_the_engines_numpy_seed(binary, registry):
    """ART draws HopSkipJump's start from an unseeded RandomState; ours follows numpy's
    global generator, which run_attack seeds: same seed, same examples."""
    params = {**MIN_NORM["hopskipjump"]}
    runs = []
    for _ in range(2):
        attack = registry.build("attacks", "hopskipjump", params, estimator=binary)
        with numpy_seeded(7):
            runs.append(attack.generate(x=X, y=own_labels(binary)))
    np.testing.assert_array_equal(runs[0], runs[1])
