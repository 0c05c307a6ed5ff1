"""Robust accuracy, direction split, perceptibility and sanity checks end to end: in
metrics.json, report.md and `testbed compare`; a violated check shown as gradient masking."""

import json

import pytest
from test_cli import TINY

from testbed import compare
from testbed.cli import main
from testbed.report import markdown
from testbed.robust_eval import evaluate_repeat

RUN = (
    TINY
    + """
[[attacks]]
name = "square"
params = { eps = 0.05, max_iter = 20 }
[[attacks]]
name = "cw_l2"
label = "CW to healthy"
params = { max_iter = 5, binary_search_steps = 2, targeted = true, target = "lesion_to_healthy" }
[[attacks]]
name = "fgsm"
params = { eps = 0.03 }
sweep = { eps = [0.01, 0.03] }
[outsider]
epochs = 1
"""
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    scenario = tmp / "robust.toml"
    scenario.write_text(RUN)
    inside = tmp / "inside.toml"  # the same without the outsider
    inside.write_text(RUN.replace('name = "tiny"', 'name = "inside"').split("[outsider]")[0])
    out = tmp / "cmp"
    args = ["compare", str(scenario), str(inside), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    return out


def test_metrics_record_robust_accuracy_directions_perceptibility_and_checks(run):
    metrics = json.loads((run / "tiny" / "metrics.json").read_text())
    task = metrics["tasks"]["synthetic"]
    rep = task["repeats"][0]
    rob = rep["robustness"]["robust_accuracy"]
    assert rob["attacks"] == ["PGD-3", "SQUARE-20", "FGSM eps=0.01", "FGSM eps=0.03"]
    assert rob["excluded"] == ["CW to healthy"]
    # never above the clean accuracy on the attacked images, nor above any one attack's
    for i, client in enumerate(rep["attacks"]["PGD-3"]["adversaries"]):
        pi = rep["attacks"]["PGD-3"]["per_image"]
        y, clean, adv = pi["y"][i], pi["pred_clean_own"][i], pi["pred_adv_own"][i]
        clean_acc = sum(a == b for a, b in zip(y, clean, strict=True)) / len(y)
        pgd_acc = sum(a == b for a, b in zip(y, adv, strict=True)) / len(y)
        assert 0 <= rob["per_client"][str(client)] <= min(clean_acc, pgd_acc)
    assert task["summary"]["robust_acc"]["mean"] == pytest.approx(rob["mean"])
    cw = rep["attacks"]["CW to healthy"]
    assert cw["targeted"] and cw["healthy_class"] == {"index": 0, "name": "no_lesion"}
    assert cw["direction"]["healthy_to_lesion_own"] in (0.0, None)  # aimed at healthy only
    assert rep["attacks"]["SQUARE-20"]["perceptibility"]["linf_max"] <= 0.05 + 1e-6
    assert rep["robustness"]["sanity"]["checks_run"]["eps_monotone"] == 1
    # recomputed from the stored results alone: the same figures
    again = evaluate_repeat(rep["attacks"])
    assert again["robust_accuracy"] == rob


def test_report_and_compare_show_the_robust_accuracy(run):
    md = (run / "tiny" / "report.md").read_text()
    assert "robust ACC" in md and "ASR by direction and perceptibility" in md
    assert "sanity checks (Carlini et al. 2019)" in md
    table = json.loads((run / "compare.json").read_text())
    metrics = json.loads((run / "tiny" / "metrics.json").read_text())
    summary = metrics["tasks"]["synthetic"]["summary"]
    assert table["rows"][0]["robust_acc"]["mean"] == pytest.approx(summary["robust_acc"]["mean"])
    assert "robust ACC" in (run / "compare.md").read_text()


def test_a_violated_check_is_shown_as_possible_gradient_masking(run):
    metrics = json.loads((run / "tiny" / "metrics.json").read_text())
    rep = metrics["tasks"]["synthetic"]["repeats"][0]
    # make the larger eps of the sweep weaker on the own model than the smaller one
    rep["attacks"]["FGSM eps=0.01"]["aasr_own"] = 0.9
    rep["attacks"]["FGSM eps=0.03"]["aasr_own"] = 0.2
    rep["robustness"] = evaluate_repeat(rep["attacks"])
    md = markdown(metrics)
    assert "POSSIBLE GRADIENT MASKING" in md
    assert "| eps_monotone | FGSM eps=0.01, FGSM eps=0.03 |" in md


def test_runs_from_before_the_robustness_figures_still_render(run):
    metrics = json.loads((run / "tiny" / "metrics.json").read_text())
    task = metrics["tasks"]["synthetic"]
    for rep in task["repeats"]:
        del rep["robustness"]
        for a in rep["attacks"].values():
            for key in ("direction", "perceptibility", "tsr", "healthy_class"):
                a.pop(key)
    task["summary"].pop("robust_acc")
    md = markdown(metrics)
    assert "ASR by direction" not in md and "sanity checks" not in md
    _, rows = compare.rows({"old": metrics})
    assert "n/a" in compare.markdown(["PGD-3"], rows)


def test_the_outsider_crafts_on_a_surrogate_and_never_retrains_the_federation(run):
    metrics = json.loads((run / "tiny" / "metrics.json").read_text())
    rep = metrics["tasks"]["synthetic"]["repeats"][0]
    inside = json.loads((run / "inside" / "metrics.json").read_text())
    inside_rep = inside["tasks"]["synthetic"]["repeats"][0]
    assert "outsider" not in inside_rep
    # the same federation (one cache entry), so the insider's figures are the same too
    assert rep["cache"]["key"] == inside_rep["cache"]["key"]
    assert rep["attacks"]["PGD-3"]["asr"] == inside_rep["attacks"]["PGD-3"]["asr"]
    out = rep["outsider"]
    assert list(out) == list(rep["attacks"])
    for r in out.values():
        assert r["crafted_on"] == "surrogate" and len(r["asr_crafting"]) == 3
        assert set(r["surrogate_acc"]) == {"0", "1", "2"}
    assert (
        "outsider (surrogate trained on its own data only)"
        in (run / "tiny" / "report.md").read_text()
    )


@pytest.mark.parametrize("section", ["[outsider]\nepochs = 0\n", "[outsider]\nepoch = 2\n"])
def test_a_bad_outsider_section_is_one_line_and_exit_2(section, tmp_path, capsys):
    scenario = tmp_path / "bad.toml"
    scenario.write_text(TINY + section)
    assert main(["validate", str(scenario)]) == 2
    assert "outsider.epoch" in capsys.readouterr().out
