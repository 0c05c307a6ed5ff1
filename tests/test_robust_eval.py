"""Direction split, robust accuracy, perceptibility and the sanity checks on hand-made
predictions and images with known answers."""

import math

import pytest
import torch

from testbed.metrics import direction_asr, healthy_class, robust_accuracy, targeted_success_rate
from testbed.perceptibility import perceptibility, pool_perceptibility, ssim_psnr
from testbed.robust_eval import (
    MASKING,
    robust_accuracy_per_client,
    sanity_checks,
    summarise_repeats,
)

T = torch.tensor


@pytest.mark.parametrize(
    "classes, healthy",
    [
        (("no_tumor", "meningioma_tumor"), 0),
        (("meningioma_tumor", "no_tumor"), 1),
        (("tumor", "normal"), 1),
        (("glioma", "pituitary", "Healthy"), 2),
        (("benign", "malignant"), 0),  # no marker: class 0
        ((), 0),
    ],
)
def test_healthy_class_by_name(classes, healthy):
    assert healthy_class(classes) == healthy


def test_direction_split_counts_each_direction_over_its_own_support():
    # healthy = 0; lesion images 2, 3, 4 (two move to healthy), healthy 0, 1 (one moves)
    d = direction_asr(T([0, 0, 1, 1, 1]), T([1, 0, 0, 1, 0]), healthy=0)
    assert d == {
        "lesion_to_healthy": 2 / 3,
        "healthy_to_lesion": 1 / 2,
        "n_lesion": 3,
        "n_healthy": 2,
    }


def test_direction_split_ignores_lesion_to_lesion_and_empty_support():
    # three classes, healthy = 2: 0 -> 1 is a change between lesions, counted in neither
    d = direction_asr(T([0, 1]), T([1, 2]), healthy=2)
    assert d["lesion_to_healthy"] == 1 / 2 and math.isnan(d["healthy_to_lesion"])


def test_targeted_success_counts_only_images_away_from_their_target():
    # image 0 already at the target: left out; of 1..3, two reach it
    assert targeted_success_rate(T([1, 0, 0, 0]), T([1, 1, 1, 0]), T([1, 1, 1, 1])) == 2 / 3


def test_robust_accuracy_needs_clean_and_every_attack_right():
    y = T([0, 1, 1, 0])
    clean = T([0, 1, 0, 0])  # image 2 wrong already
    a1 = T([0, 0, 0, 0])  # breaks image 1
    a2 = T([1, 1, 0, 0])  # breaks image 0
    assert robust_accuracy(y, clean, [a1, a2]) == 1 / 4
    assert robust_accuracy(y, clean, []) == 3 / 4  # no attack: clean accuracy


def _result(aasr_own, aasr_benign=0.0, *, budget=None, access="white-box", per_image=None, **kw):
    return {
        "adversaries": [0, 1],
        "samples": [100, 100],
        "aasr_own": aasr_own,
        "aasr_benign": aasr_benign,
        "budget": budget,
        "access": access,
        "per_image": per_image,
        **kw,
    }


LINF = {"norm": "inf", "eps": 0.03}


def test_robust_accuracy_per_client_over_bounded_attacks_only():
    y = [[0, 1, 1, 0], [1, 1, 0, 0]]
    clean = [[0, 1, 1, 0], [1, 0, 0, 0]]

    def pi(adv):
        return {"y": y, "pred_clean_own": clean, "pred_adv_own": adv}

    attacks = {
        "PGD": _result(0.2, budget=LINF, per_image=pi([[1, 1, 1, 0], [1, 0, 0, 0]])),
        "SQUARE": _result(0.2, budget=LINF, per_image=pi([[0, 0, 1, 0], [1, 0, 0, 1]])),
        # would fool everything; neither counts towards robust accuracy
        "CW": _result(1.0, per_image=pi([[1, 0, 0, 1], [0, 0, 1, 1]])),
        "PGD-unbounded": _result(
            1.0, budget={"norm": "inf", "eps": 1.0}, per_image=pi([[1, 0, 0, 1], [0, 0, 1, 1]])
        ),
    }
    r = robust_accuracy_per_client(attacks)
    # client 0: clean all right; PGD breaks image 0, SQUARE image 1 -> images 2, 3 survive
    # client 1: clean wrong on image 1; SQUARE breaks image 3 -> images 0, 2 survive
    assert r["per_client"] == {"0": 2 / 4, "1": 2 / 4}
    assert r["attacks"] == ["PGD", "SQUARE"] and r["excluded"] == ["CW", "PGD-unbounded"]
    assert r["mean"] == 0.5


def test_ssim_and_psnr_of_a_known_pair():
    x = torch.full((1, 1, 8, 8), 0.5)
    x_adv = torch.full((1, 1, 8, 8), 0.6)
    ssim, psnr = ssim_psnr(x, x_adv)
    # constant images: SSIM is its luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    # with C1 = (0.01 * data range)^2; PSNR = 10 log10(1 / MSE)
    c1 = 0.01**2
    assert ssim[0] == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1), rel=1e-6)
    assert psnr[0] == pytest.approx(10 * math.log10(1 / 0.1**2), rel=1e-5)
    same_ssim, same_psnr = ssim_psnr(x, x.clone())
    assert same_ssim[0] == pytest.approx(1.0) and math.isinf(same_psnr[0])


def test_perceptibility_summary_and_pooling():
    x = torch.zeros((2, 1, 8, 8))
    x_adv = x.clone()
    x_adv[0] += 0.1  # L2 = 0.1 * sqrt(64) = 0.8, L-inf 0.1; image 1 unchanged
    p = perceptibility(x, x_adv)
    assert p["l2_max"] == pytest.approx(0.8) and p["l2_mean"] == pytest.approx(0.4)
    assert p["linf_max"] == pytest.approx(0.1) and p["unchanged"] == 1
    assert p["psnr_mean"] == pytest.approx(20.0, rel=1e-5)  # the changed image only
    q = perceptibility(x[:1], x_adv[:1] * 2)  # L2 1.6, PSNR 10 log10(1 / 0.04)
    pooled = pool_perceptibility([p, q])
    assert pooled["n"] == 3 and pooled["l2_max"] == pytest.approx(1.6)
    assert pooled["l2_mean"] == pytest.approx((0.8 + 0 + 1.6) / 3)
    assert pooled["psnr_mean"] == pytest.approx((20 + 10 * math.log10(25)) / 2, rel=1e-5)


def _sweep(values):
    return {
        f"PGD eps={e}": _result(
            a, budget={"norm": "inf", "eps": e}, sweep_of="PGD", sweep_point={"eps": e}
        )
        for e, a in values
    }


def test_a_non_monotone_eps_sweep_is_flagged():
    s = sanity_checks(_sweep([(0.01, 0.4), (0.03, 0.6), (0.02, 0.7)]))
    (flag,) = s["flags"]
    # sorted by eps: 0.4, 0.7, 0.6: the fall from eps 0.02 to 0.03
    assert flag["check"] == "eps_monotone" and flag["verdict"] == MASKING
    assert flag["attacks"] == ["PGD eps=0.02", "PGD eps=0.03"]
    assert s["checks_run"]["eps_monotone"] == 2


def test_a_monotone_sweep_and_a_dip_within_one_image_pass():
    s = sanity_checks(_sweep([(0.01, 0.4), (0.02, 0.7), (0.03, 0.695)]))
    assert s["flags"] == [] and s["checks_run"]["eps_monotone"] == 2


def test_a_check_with_an_na_side_is_not_run_not_passed():
    # a diverged model's rates are None in metrics.json: NaN < x is False, which used to
    # count as a passed comparison and print "all passed"
    s = sanity_checks(_sweep([(0.01, 0.4), (0.02, None), (0.03, 0.6)]))
    # both neighbours of the n/a point are skipped; transfer is compared where it is known
    assert s["flags"] == [] and s["checks_run"] == {"whitebox_vs_transfer": 2}
    attacks = {
        "PGD": _result(None, 0.5, budget=LINF),
        "SQUARE": _result(0.6, 0.1, budget=LINF, access="black-box"),
        "PGD-unbounded": _result(None, budget={"norm": "inf", "eps": 1.0}),
    }
    s = sanity_checks(attacks)
    assert s["flags"] == [] and s["checks_run"] == {}


def test_white_box_weaker_than_transfer_or_black_box_and_a_weak_unbounded_attack_are_flagged():
    attacks = {
        "PGD": _result(0.3, 0.5, budget=LINF),  # fools benign models more than its own
        "SQUARE": _result(0.6, 0.1, budget=LINF, access="black-box"),  # beats PGD at 0.03
        "SQUARE-L2": _result(0.9, budget={"norm": "2", "eps": 1.0}, access="black-box"),
        "PGD-unbounded": _result(0.7, budget={"norm": "inf", "eps": 1.0}),
    }
    s = sanity_checks(attacks)
    checks = {f["check"]: f["attacks"] for f in s["flags"]}
    assert checks == {
        "whitebox_vs_transfer": ["PGD"],
        "whitebox_vs_blackbox": ["PGD", "SQUARE"],  # SQUARE-L2 has no white-box peer
        "unbounded": ["PGD-unbounded"],
    }


def test_consistent_attacks_raise_no_flag_and_flags_carry_their_seed():
    good = {
        "PGD": _result(0.9, 0.5, budget=LINF),
        "SQUARE": _result(0.6, 0.1, budget=LINF, access="black-box"),
        "PGD-unbounded": _result(1.0, 0.9, budget={"norm": "inf", "eps": 1.0}),
    }
    assert sanity_checks(good)["flags"] == []
    bad = {"PGD": _result(0.3, 0.5, budget=LINF)}
    repeats = [
        {"seed": s, "robustness": {"robust_accuracy": {"mean": m}, "sanity": sanity_checks(a)}}
        for s, m, a in ((0, 0.5, good), (1, 0.7, bad))
    ]
    summary = summarise_repeats(repeats)
    assert summary["robust_acc"]["mean"] == pytest.approx(0.6)
    assert [(f["seed"], f["check"]) for f in summary["sanity_flags"]] == [
        (1, "whitebox_vs_transfer")
    ]
