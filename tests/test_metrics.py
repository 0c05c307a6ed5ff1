import math

import pytest
import torch

from testbed.metrics import (
    NO_PREDICTION,
    accuracy,
    attack_success_rate,
    balanced_accuracy,
    class_name,
    client_model_spread,
    direction_asr,
    error_transfer_rate,
    mean_std,
    predicted,
    robust_accuracy,
    targeted_success_rate,
    transfer_summary,
    true_label_asr,
)


def test_accuracy_and_asr_on_constructed_predictions():
    y = torch.tensor([0, 1, 1, 0])
    clean = torch.tensor([0, 1, 0, 0])
    adv = torch.tensor([1, 1, 1, 0])
    assert accuracy(clean, y) == 0.75
    # ASR compares the model's own labels before and after: items 0 and 2 changed.
    assert attack_success_rate(clean, adv) == 0.5


def test_balanced_accuracy_is_blind_to_the_split_s_label_skew():
    """9 images of class 1 and 1 of class 0. Always answering 1: accuracy 9/10, balanced
    (recall 9/9 on class 1, 0/1 on class 0) = (1 + 0) / 2 = 0.5. A model that
    gets the class-0 image and 6 of the 9: (1 + 6/9) / 2 = 5/6. A one-class split: its
    recall. sklearn's balanced_accuracy_score gives the same on random cases."""
    from sklearn.metrics import balanced_accuracy_score

    y = torch.tensor([0] + [1] * 9)
    assert accuracy(torch.ones(10, dtype=torch.long), y) == pytest.approx(0.9)
    assert balanced_accuracy(torch.ones(10, dtype=torch.long), y) == 0.5
    six = torch.tensor([0] + [1] * 6 + [0] * 3)
    assert balanced_accuracy(six, y) == pytest.approx(5 / 6)
    assert balanced_accuracy(torch.tensor([1, 1, 0]), torch.tensor([1, 1, 1])) == pytest.approx(
        2 / 3
    )
    assert math.isnan(balanced_accuracy(torch.tensor([NO_PREDICTION, 1]), torch.tensor([0, 1])))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        y = torch.randint(0, 4, (50,), generator=g)
        pred = torch.randint(0, 4, (50,), generator=g)
        assert balanced_accuracy(pred, y) == pytest.approx(balanced_accuracy_score(y, pred))


def test_a_model_without_finite_outputs_predicts_no_class_and_every_rate_is_nan():
    nan, inf = math.nan, math.inf
    logits = torch.tensor(
        [[0.1, 0.9], [nan, 1.0], [inf, 0.0], [-inf, -inf], [2.0, 1.0], [-inf, -0.5]]
    )
    # argmax alone would say class 0 for every broken row; a log-probability of -inf for
    # a class ruled out still names the other
    no = NO_PREDICTION
    assert predicted(logits).tolist() == [1, no, no, no, 0, 1]
    y = torch.tensor([1, 1])
    ok, broken = torch.tensor([1, 0]), torch.tensor([1, NO_PREDICTION])
    assert accuracy(ok, y) == 0.5 and math.isnan(accuracy(broken, y))
    assert attack_success_rate(ok, ok) == 0.0
    for rate in (
        attack_success_rate(ok, broken),
        attack_success_rate(broken, ok),
        true_label_asr(y, ok, broken),
        error_transfer_rate(broken, ok, y)[0],
        error_transfer_rate(ok, broken, y)[0],
        targeted_success_rate(ok, broken, torch.tensor([0, 0])),
        robust_accuracy(y, ok, [ok, broken]),
        direction_asr(broken, ok, healthy=0)["lesion_to_healthy"],
    ):
        assert math.isnan(rate)
    assert class_name(["no_tumor", "tumor"], NO_PREDICTION) == "none (non-finite output)"
    assert class_name(["no_tumor", "tumor"], 1) == "tumor"


def test_error_transfer_rate_conditions_on_source_errors():
    y = torch.tensor([0, 0, 1, 1])
    src = torch.tensor([1, 1, 1, 0])  # wrong on 0, 1, 3
    tgt = torch.tensor([1, 0, 0, 0])  # of those, wrong on 0 and 3
    rate, n = error_transfer_rate(src, tgt, y)
    assert n == 3
    assert math.isclose(rate, 2 / 3, rel_tol=1e-6)
    rate, n = error_transfer_rate(y, tgt, y)  # source never wrong
    assert n == 0 and math.isnan(rate)


def test_transfer_summary_splits_own_and_benign():
    asr = [[0.9, 0.3, 0.5], [0.2, 0.8, 0.4]]  # adversaries 0 and 1, three targets
    etr = {(0, 0): 1.0, (0, 1): 0.5, (0, 2): math.nan, (1, 0): 0.25, (1, 1): 1.0, (1, 2): 0.75}
    s = transfer_summary(asr, etr, [0, 1])
    assert math.isclose(s["aasr"], 3.1 / 6)
    assert math.isclose(s["aasr_own"], 0.85)
    assert math.isclose(s["aasr_benign"], (0.3 + 0.5 + 0.2 + 0.4) / 4)
    assert math.isclose(s["aetr"], (0.5 + 0.25 + 0.75) / 3)  # NaN pair and own pairs left out
    assert s["aetr_pairs"] == 3


def test_mean_std_sample_std_and_single_value():
    two = mean_std([1.0, 3.0])
    assert {k: two[k] for k in ("mean", "std", "n")} == {"mean": 2.0, "std": math.sqrt(2.0), "n": 2}
    assert mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}  # no interval from one seed
    assert mean_std([math.nan])["n"] == 0


def test_mean_std_95_percent_interval_by_hand():
    # [1, 3]: sd sqrt(2), standard error sqrt(2)/sqrt(2) = 1, t(0.975, 1 df) = 12.7062
    assert mean_std([1.0, 3.0])["ci95"] == pytest.approx(12.7062, abs=1e-4)
    # [1, 2, 3]: sd 1, standard error 1/sqrt(3), t(0.975, 2 df) = 4.3027 -> 2.4842
    assert mean_std([1.0, 2.0, 3.0])["ci95"] == pytest.approx(2.4842, abs=1e-4)
    # NaNs are dropped before counting: the interval of [2, 4] (2 df -> 1 df)
    assert mean_std([2.0, math.nan, 4.0])["ci95"] == pytest.approx(12.7062, abs=1e-4)


def test_true_label_asr_counts_only_images_the_model_got_right():
    y = torch.tensor([0, 0, 1, 1, 1])
    clean = torch.tensor([0, 1, 1, 1, 0])  # right on images 0, 2, 3
    adv = torch.tensor([1, 0, 1, 0, 1])  # of those, 0 and 3 now wrong: 2/3
    assert true_label_asr(y, clean, adv) == pytest.approx(2 / 3)
    # the paper's ASR counts every change, including wrong -> right (image 1) and 4
    assert attack_success_rate(clean, adv) == pytest.approx(4 / 5)
    assert math.isnan(true_label_asr(y, 1 - y, y))  # nothing right: no support


def test_client_model_spread_on_hand_computed_weights():
    # (0,0), (3,4), (0,8): distances 5, 8, sqrt(9 + 16) = 5; norms 0, 5, 8
    w = [torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0]), torch.tensor([0.0, 8.0])]
    spread = client_model_spread(w)
    assert spread["distance_mean"] == pytest.approx(6.0)
    assert spread["norm_mean"] == pytest.approx(13 / 3)
    assert client_model_spread(w[:1]) == {"distance_mean": 0.0, "norm_mean": 0.0}
