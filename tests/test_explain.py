"""Explanations (testbed/explain.py): attribution shift on hand-computed maps, the
detector's AUROC where it must be 1 and where it must be chance, Captum's maps on a tiny
paper CNN, and a tiny run with [explain] end to end."""

import json
import math

import numpy as np
import pytest
import torch
from test_cli import TINY, strip_timing
from torch import nn

from testbed.builtins.models import PaperCNN, PaperCNNParams
from testbed.cli import main
from testbed.explain import (
    attribution_maps,
    detector_auroc,
    explain_attack,
    explainable,
    k_pixels,
    last_conv,
    map_features,
    rank_correlation,
    shift_and_detect,
    top_k_overlap,
)
from testbed.metrics import NO_PREDICTION
from testbed.pluginmanager import build_host
from testbed.problems import ScenarioError
from testbed.report_explain import chance_band, explain_tables
from testbed.scenario_load import load_scenario

# --- attribution shift, hand-computed -------------------------------------------------


def test_identical_maps_have_rank_correlation_1_and_overlap_1():
    a = np.arange(25, dtype=float).reshape(5, 5) ** 1.5
    assert rank_correlation(a, a) == pytest.approx(1.0)
    assert top_k_overlap(a, a, 5) == 1.0


def test_reversed_ranks_have_rank_correlation_minus_1_and_no_overlap():
    a = np.arange(10, dtype=float)
    assert rank_correlation(a, a[::-1]) == pytest.approx(-1.0)
    assert top_k_overlap(a, a[::-1], 3) == 0.0  # {9, 8, 7} vs {0, 1, 2}


def test_rank_correlation_and_top_k_overlap_by_hand():
    # one swapped pair of 3: rho = 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 24 = 0.5
    assert rank_correlation(np.array([1.0, 2, 3]), np.array([1.0, 3, 2])) == pytest.approx(0.5)
    a = np.array([4.0, 3, 2, 1, 0])  # top-2 pixels {0, 1}, top-3 {0, 1, 2}
    b = np.array([0.0, 3, 4, 1, 2])  # top-2 pixels {2, 1}, top-3 {2, 1, 4}
    assert top_k_overlap(a, b, 2) == 0.5  # shared {1}
    assert top_k_overlap(a, b, 3) == pytest.approx(2 / 3)  # shared {1, 2}


def test_constant_map_has_no_rank_correlation_and_k_is_a_share_of_pixels():
    assert math.isnan(rank_correlation(np.ones(9), np.arange(9.0)))
    assert k_pixels(100 * 100, 0.1) == 1000
    assert k_pixels(10, 0.01) == 1  # at least one pixel


def test_map_features_of_a_flat_and_a_one_pixel_map():
    n, k = 16, 4
    flat = map_features(np.full((4, 4), 2.0), k)
    assert flat == pytest.approx([math.log(32.0), k / n, 1.0, 0.0])
    peak = np.zeros((4, 4))
    peak[1, 2] = 3.0
    log_total, share, entropy, rough = map_features(peak, k)
    assert (log_total, share, entropy) == pytest.approx((math.log(3.0), 1.0, 0.0))
    assert rough > 0


# --- the detector ---------------------------------------------------------------------


def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.r_[np.zeros(n), np.ones(n)], np.r_[np.arange(n), np.arange(n)]


def test_detector_auroc_is_1_on_separable_features():
    rng = np.random.default_rng(0)
    n = 20
    is_adv, groups = _pairs(n)
    feats = rng.normal(size=(2 * n, 4))
    feats[n:, 1] += 10.0  # adversarial inputs sit far off along one statistic
    assert detector_auroc(feats, is_adv, groups, folds=5) == 1.0


def test_detector_auroc_is_chance_when_clean_and_adversarial_look_alike():
    rng = np.random.default_rng(1)
    n = 300
    is_adv, groups = _pairs(n)
    feats = rng.normal(size=(2 * n, 4))  # one distribution for both
    auroc = detector_auroc(feats, is_adv, groups, folds=5)
    assert abs(auroc - 0.5) < 0.08  # chance_band(300) is 0.067


def test_detector_on_maps_smooth_clean_vs_noisy_adversarial():
    rng = np.random.default_rng(2)
    n = 12
    yy, xx = np.mgrid[0:16, 0:16]
    clean = np.stack(
        [np.exp(-((yy - 8 + i % 3) ** 2 + (xx - 8) ** 2) / 20.0) for i in range(n)]
    )  # one smooth blob each
    adv = clean + rng.uniform(0, 1, size=clean.shape)  # the same blob under speckle
    stats = shift_and_detect(clean, adv, k=26, folds=4)
    assert stats["auroc"] == 1.0
    assert len(stats["rank_corr_per_image"]) == n
    assert 0 <= stats["top_k_overlap"] <= 1


def test_chance_band_shrinks_with_images_and_seeds():
    assert chance_band(16) == pytest.approx(2 * math.sqrt(33 / (12 * 256)))
    assert chance_band(64) < chance_band(16)
    assert chance_band(16, seeds=4) == pytest.approx(chance_band(16) / 2)


# --- Captum on a tiny paper CNN -------------------------------------------------------


def _tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    p = PaperCNNParams(conv_channels=(4, 4, 8, 8, 8, 8), fc_units=(16, 16, 16, 8))
    m = PaperCNN(p, in_channels=1, image_size=16, num_classes=2, mean=[0.5], std=[0.25])
    m.eval().requires_grad_(False)  # as deployed
    return m


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "gradcam"])
def test_maps_are_one_non_negative_image_per_input(method):
    model = _tiny_cnn()
    net = explainable(model)
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    target = net(x).argmax(1)
    maps, gap = attribution_maps(net, x, target, method, ig_steps=64)
    assert maps.shape == (5, 16, 16)
    assert bool((maps >= 0).all()) and bool(torch.isfinite(maps).all())
    if method == "integrated_gradients":
        assert gap is not None and gap < 0.05  # completeness, Sundararajan et al.'s axiom
    else:
        assert gap is None


def test_explainable_copy_leaves_the_deployed_model_alone():
    model = _tiny_cnn()
    net = explainable(model)
    assert all(not m.inplace for m in net.modules() if isinstance(m, nn.ReLU))
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    name, conv = last_conv(net)
    assert (
        isinstance(conv, nn.Conv2d) and conv.out_channels == 8 and name == "features.13"
    )  # Normalize, then conv, ReLU(, pool) x 6


def test_explain_attack_is_deterministic_and_picks_a_flipped_image():
    own, benign = _tiny_cnn(0), _tiny_cnn(1)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 1, 16, 16, generator=g)
    x_adv = (x + 0.3 * torch.randn(6, 1, 16, 16, generator=g)).clamp(0, 1)
    y = torch.zeros(6, dtype=torch.long)
    kw = dict(methods=["saliency", "gradcam"], top_k_share=0.1, ig_steps=8, folds=3)
    models = {"own": (0, own), "benign": (1, benign)}
    r1, fig = explain_attack(models, x, x_adv, y, **kw)
    r2, _ = explain_attack(models, x, x_adv, y, **kw)
    assert json.dumps(r1) == json.dumps(r2)
    assert r1["k"] == 26 and set(r1["per_method"]) == {"saliency", "gradcam"}
    assert set(r1["per_method"]["saliency"]) == {"own", "benign"}
    own_pred = r1["predictions"]["own"]
    pairs = zip(own_pred["pred_clean"], own_pred["pred_adv"], strict=True)
    flipped = [i for i, (c, a) in enumerate(pairs) if c != a]
    assert fig["index"] == (flipped[0] if flipped else 0)
    assert fig["models"]["own"]["maps"]["gradcam"]["adv"].shape == (16, 16)


def test_a_model_with_non_finite_outputs_is_na_and_draws_no_figure():
    own, benign = _tiny_cnn(0), _tiny_cnn(1)
    with torch.no_grad():
        benign.classifier[-1].bias.fill_(math.nan)  # every output NaN
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 1, 16, 16, generator=g)
    x_adv = (x + 0.3 * torch.randn(6, 1, 16, 16, generator=g)).clamp(0, 1)
    kw = dict(methods=["saliency"], top_k_share=0.1, ig_steps=8, folds=3)
    r, fig = explain_attack(
        {"own": (0, own), "benign": (1, benign)}, x, x_adv, torch.zeros(6, dtype=torch.long), **kw
    )
    assert r["predictions"]["benign"]["pred_clean"] == [NO_PREDICTION] * 6
    assert math.isnan(r["predictions"]["benign"]["flipped"])
    assert all(math.isnan(v) for v in r["per_method"]["saliency"]["benign"].values())
    assert not math.isnan(r["per_method"]["saliency"]["own"]["rank_corr"])
    assert fig == {}


# --- the scenario table ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "expect"),
    [
        ("images = 11", "explain.images (11) exceeds threat_model.samples_per_adversary (10)"),
        ('methods = ["lime"]', "explain.methods"),
        ('methods = ["saliency", "saliency"]', "methods must be unique"),
        ("top_k = 0", "explain.top_k"),
        ("speed = 1", "explain.speed"),
    ],
)
def test_explain_table_is_validated(tmp_path, table, expect):
    path = tmp_path / "s.toml"
    path.write_text(TINY + f"\n[explain]\n{table}\n")
    with pytest.raises(ScenarioError) as exc:
        load_scenario(path, build_host(autoload=False).registry)
    assert expect in str(exc.value)


def test_without_the_table_nothing_is_explained(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(TINY)
    assert load_scenario(path, build_host(autoload=False).registry).explain is None


# --- end to end -----------------------------------------------------------------------

TINY_EXPLAIN = TINY.replace("plots = false", "plots = true") + (
    '\n[explain]\nimages = 8\nfolds = 4\nig_steps = 8\nmethods = ["saliency", "gradcam"]\n'
)


@pytest.mark.slow
def test_tiny_run_with_explain_end_to_end_and_deterministic(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_EXPLAIN)
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
        runs.append(json.loads((out / "metrics.json").read_text()))
    assert strip_timing(runs[0]) == strip_timing(runs[1])
    task = runs[0]["tasks"]["synthetic"]
    ex = task["repeats"][0]["attacks"]["PGD-3"]["explain"]
    assert ex["images"] == 8 and ex["k"] == 26 and ex["models"] == {"own": 0, "benign": 1}
    assert ex["gradcam_layer"] == "features.13" and ex["ig_steps"] is None
    for method in ("saliency", "gradcam"):
        for role in ("own", "benign"):
            stats = ex["per_method"][method][role]
            assert -1 <= stats["rank_corr"] <= 1 and 0 <= stats["top_k_overlap"] <= 1
            assert 0 <= stats["auroc"] <= 1 and len(stats["rank_corr_per_image"]) == 8
    assert set(task["summary"]["explain"]["PGD-3"]) == {"saliency", "gradcam"}
    out = tmp_path / "a"
    assert "plots/synthetic/explain_PGD-3.png" in runs[0]["plots"]
    assert (out / "plots" / "synthetic" / "explain_PGD-3.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "explanations of the attacked images" in report and "detector AUROC" in report
    # the example the other figures read carries no explanation batch
    example = torch.load(out / "examples" / "synthetic" / "seed5_PGD-3.pt", weights_only=True)
    assert "batch" not in example


def _task_with_auroc(auroc: float) -> dict:
    stats = {
        "rank_corr": 0.5,
        "top_k_overlap": 0.4,
        "auroc": auroc,
        "rank_corr_per_image": [0.5] * 16,
        "top_k_overlap_per_image": [0.4] * 16,
        "ig_completeness_gap": 0.1,
    }
    explain = {
        "images": 16,
        "models": {"own": 0, "benign": 1},
        "k": 1000,
        "top_k_share": 0.1,
        "ig_steps": 20,
        "detector": "logistic regression",
        "per_method": {"integrated_gradients": {"own": stats, "benign": stats}},
        "predictions": {"own": {"flipped": 0.75}, "benign": {"flipped": 0.5}},
    }
    return {"repeats": [{"attacks": {"PGD-20": {"explain": explain}}}], "summary": {}}


def test_report_says_when_explanations_do_not_help_with_the_number():
    (table,) = explain_tables("t", _task_with_auroc(0.55))
    assert table.rows[0] == [
        "PGD-20", "integrated_gradients", "own (client 0)", "0.50", "0.40", "0.55", "75%"
    ]  # fmt: skip
    notes = " ".join(table.notes)
    assert "Explanations do not help against PGD-20" in notes
    assert "integrated_gradients on the adversary's own model (0.55)" in notes
    assert f"0.5 ± {chance_band(16):.2f}" in notes and "completeness gap" in notes
    (table,) = explain_tables("t", _task_with_auroc(0.95))
    assert "do not help" not in " ".join(table.notes)
