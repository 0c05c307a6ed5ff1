"""Figures and reports of a sweep run, and `testbed report` re-rendering without recomputing."""

import json

import pytest
from test_cli import TINY

from testbed.cli import main

# The task is *named* like the paper's, so the report sets it beside Tables I and II.
SWEEP_RUN = (
    TINY.replace(
        '[data]\nname = "synthetic"\nparams = { n_samples = 90, image_size = 16 }',
        '[[tasks]]\nname = "meningioma"\n[tasks.data]\nname = "synthetic"\n'
        "params = { n_samples = 90, image_size = 16 }",
    ).replace("[report]\nplots = false", "[report]\nplots = true")
    + """
[[attacks]]
name = "fgsm"
params = { eps = 0.03 }
sweep = { eps = [0.01, 0.03, 0.05, 0.1] }

[[attacks]]
name = "pgd"
params = { eps = 0.03, eps_step = 0.007 }
sweep = { max_iter = [1, 2, 4] }
"""
)


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    scenario = tmp / "sweep.toml"
    scenario.write_text(SWEEP_RUN)
    out = tmp / "run"
    assert main(["run", str(scenario), "--out", str(out), "--no-progress"]) == 0
    return out


def test_sweep_figures_are_written_and_listed(sweep_run):
    metrics = json.loads((sweep_run / "metrics.json").read_text())
    plots = set(metrics["plots"])
    base = "plots/meningioma/"
    for name in (
        "training_loss.png",
        "asr_PGD-3.png",
        "sweep_FGSM_eps.png",
        "examples_FGSM.png",
        "sweep_PGD_max_iter.png",
    ):
        assert base + name in plots
        assert (sweep_run / base / name).stat().st_size > 1000
    # no per-cell matrix for each sweep point: they are summarised by the sweep figures
    assert not any("asr_FGSM_eps" in p for p in plots)


def test_report_markdown_has_paper_tables_and_rerenders_identically(sweep_run, capsys):
    md = (sweep_run / "report.md").read_text()
    assert "Tables I and II beside the paper" in md
    assert "| AASR PGD-20 |" in md and "84.12%" in md  # the paper's meningioma ACC
    assert "FGSM eps=0.05" in md
    (sweep_run / "report.md").unlink()
    assert main(["report", str(sweep_run)]) == 0
    assert (sweep_run / "report.md").read_text() == md
    out = capsys.readouterr().out
    assert "ASR, PGD-3" in out and "figure: plots/meningioma/sweep_FGSM_eps.png" in out


def test_report_says_how_many_images_each_rate_is_computed_on(sweep_run):
    """TINY attacks 10 images per adversary: one image is 100 / 10 = 10 points of its ASR.
    The test split sizes come from the partition (metrics.json), the step from the smallest."""
    md = (sweep_run / "report.md").read_text()
    assert "images attacked per adversary: 10 (one image is 10 points of an adversary's" in md
    (rep,) = json.loads((sweep_run / "metrics.json").read_text())["tasks"]["meningioma"]["repeats"]
    sizes = sorted(c["test"] for c in rep["clients"])
    span = f"{sizes[0]}" + ("" if sizes[0] == sizes[-1] else f" to {sizes[-1]}")
    assert f"test images per client: {span} (one image is {100 / sizes[0]:.3g} points" in md
    # balanced accuracy beside the plain one: per client in metrics.json, their mean in md
    assert set(rep["acc_balanced"]) == set(rep["acc"])
    mean = sum(rep["acc_balanced"].values()) / len(rep["acc_balanced"])
    assert rep["acc_balanced_mean"] == pytest.approx(mean)
    assert "| mean | balanced |" in md and f"| {100 * mean:.2f}% |" in md


def test_a_model_no_better_than_the_commonest_class_is_flagged(sweep_run):
    """12 test images, 9 of one class: always answering it scores 75%. A model at 75% (or
    74.99%, float32) is flagged; one at 10/12 = 83.33% is not; a run without the counts
    (recorded before them) says nothing. Each flagged model's balanced accuracy tells the
    one that always answers the commonest class (9/9 and 0/3 right: (1 + 0) / 2 = 50%)
    from one under the floor that learned both (3 of 9 and 3 of 3 right, 6/12 = 50% plain:
    (1/3 + 1) / 2 = 66.67%). report.html's clients table marks the same two."""
    from testbed.report import markdown
    from testbed.report_html_sections import clients_table

    metrics = json.loads((sweep_run / "metrics.json").read_text())
    (rep,) = metrics["tasks"]["meningioma"]["repeats"]
    for c in rep["clients"]:
        c["test_label_counts"] = [3, 9]
    rep["acc"] = {"0": 0.7499999, "1": 10 / 12, "2": 0.5}
    rep["acc_balanced"] = {"0": 0.5, "1": 0.8333333, "2": 2 / 3}
    md = markdown(metrics)
    flagged = (
        "warning: 2 of 3 client models score no higher than always answering their test "
        "split's commonest class (seed 5 client 0 75.00% against 75.00%, balanced 50.00%; "
        "seed 5 client 2 50.00% against 75.00%, balanced 66.67%): their accuracy does not "
        "show that they learned the task"
    )
    assert flagged + "; balanced accuracy tells which did (a constant answer scores 50.00%)" in md
    floors = [row[6] for row in clients_table("t", metrics["tasks"]["meningioma"]).rows]
    assert floors == ["75.00% (ACC at or under it)", "75.00%", "75.00% (ACC at or under it)"]
    del rep["acc_balanced"]  # a run from before balanced accuracy was recorded
    md = markdown(metrics)
    assert flagged.replace(", balanced 50.00%", "").replace(", balanced 66.67%", "") in md
    assert "tells which did" not in md
    for c in rep["clients"]:
        del c["test_label_counts"]
    assert "commonest class" not in markdown(metrics)


def test_report_of_a_folder_without_metrics_is_a_user_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_tampered_number_is_one_problem_not_one_per_union_member(sweep_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "tampered"
    shutil.copytree(sweep_run, run)
    metrics = json.loads((run / "metrics.json").read_text())
    task = next(iter(metrics["tasks"]))
    metrics["tasks"][task]["repeats"][0]["acc_mean"] = "x"  # a number, or "inf"/"-inf"/"nan"
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(run)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"incomplete metrics: tasks.{task}.repeats[0].acc_mean: Input should be a valid" in err
    assert "unable to parse string as a number; or 'nan'" in err and "more)" not in err


def test_tampered_class_counts_are_refused_not_read_as_a_floor(sweep_run, tmp_path, capsys):
    """A negative count would put a client's class floor above 100%: one line, exit 2."""
    import shutil

    run = tmp_path / "tampered"
    shutil.copytree(sweep_run, run)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["tasks"]["meningioma"]["repeats"][0]["clients"][0]["test_label_counts"] = [-5, 10]
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(run)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "clients[0].test_label_counts[0]: Input should be greater than or equal to 0" in err


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (
            lambda task: task["repeats"][0]["acc_balanced"].update({"0": 1.5}),
            "repeats[0].acc_balanced.0: Input should be less than or equal to 1",
        ),
        (
            lambda task: task["repeats"][0]["acc"].update({"1": -0.1}),
            "repeats[0].acc.1: Input should be greater than or equal to 0",
        ),
        (
            lambda task: task["repeats"][0]["attacks"]["PGD-3"]["asr"][0].__setitem__(0, 2.0),
            "PGD-3.asr[0][0]: Input should be less than or equal to 1; or 'nan'",
        ),
        (
            lambda task: task["summary"]["attacks"]["PGD-3"]["aetr"].update(mean=1.2),
            "summary.attacks.PGD-3.aetr.mean: Input should be less than or equal to 1",
        ),
        (
            lambda task: task["repeats"][0]["clients"][0].update(test_label_counts=[1, 2, 3]),
            "clients[0].test_label_counts: 3 counts for 2 classes",
        ),
        (
            lambda task: task["repeats"][0]["clients"][1].update(test_label_counts=[100, 100]),
            "clients[1].test_label_counts: they add up to 200, not the",
        ),
    ],
    ids=[
        "balanced-150%",
        "acc-negative",
        "asr-200%",
        "aetr-mean",
        "counts-3-classes",
        "counts-sum",
    ],
)
def test_tampered_rates_and_counts_are_refused(sweep_run, tmp_path, capsys, tamper, expected):
    """A rate outside [0, 1] or test counts that are not the client's split would be read
    into the tables (a 150% accuracy, a class floor of other images): one line, exit 2."""
    import shutil

    run = tmp_path / "tampered"
    shutil.copytree(sweep_run, run)
    metrics = json.loads((run / "metrics.json").read_text())
    tamper(metrics["tasks"]["meningioma"])
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(run)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert expected in err, err


def test_many_clients_report_the_spread_not_one_column_each(tmp_path):
    """Above 8 clients the tables give min/median/max over clients (the full per-client
    values stay in metrics.json)."""
    scenario = tmp_path / "wide.toml"
    scenario.write_text(
        TINY.replace("clients = 3", "clients = 10\nsampled = 4")
        .replace("n_samples = 90", "n_samples = 300")
        .replace("[threat_model]", "[threat_model]\nadversaries = [0, 3]")
    )
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    (rep,) = metrics["tasks"]["synthetic"]["repeats"]
    assert len(rep["acc"]) == 10 and len(rep["attacks"]["PGD-3"]["asr"][0]) == 10
    report = (out / "report.md").read_text()
    assert "clean accuracy over 10 clients" in report and "benign median" in report
    assert "client 9" not in report
    values = [rep["acc"][str(c)] for c in range(10)]
    assert f"{100 * min(values):.2f}%" in report


def test_a_run_without_evasion_attacks_shows_no_empty_attack_table(tmp_path, capsys):
    """A poisoning-only or clean run has no [[attacks]]: no attack table with a header and
    no rows (it read as attacks that produced nothing) and no empty examples folder."""
    scenario = tmp_path / "clean.toml"
    scenario.write_text(
        TINY.replace('[[attacks]]\nname = "pgd"\n', "").replace(
            "params = { eps = 0.05, eps_step = 0.01, max_iter = 3 }\n", ""
        )
    )
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"]["synthetic"]["summary"]["attacks"] == {}
    report = (out / "report.md").read_text()
    assert "attacks, mean" not in report and "no evasion attack configured" in report
    assert "attacks, mean" not in capsys.readouterr().out
    assert not (out / "examples").exists()


def test_paper_table_gives_the_95_percent_interval_over_seeds():
    """Three seeds: ACC [0.80, 0.81, 0.82] has sd 0.01, so the interval is 0.81 +- 4.3027 x
    0.01 / sqrt(3) = 0.81 +- 0.02484: 78.52-83.48%, which misses the paper's 84.12%. PGD-20
    AASR [0.26, 0.28, 0.30] (sd 0.02): 0.28 +- 0.04968 = 23.03-32.97%, which holds 27.52%.
    Balanced ACC [0.60, 0.66, 0.72] (sd 0.06): 0.66 +- 0.14905 = 51.10-80.90%, beside no
    paper figure (the paper reports plain accuracy only)."""
    from testbed.metrics import mean_std
    from testbed.report_paper import paper_tables

    attacks = {
        "PGD-20": {"attack": "pgd", "params": {"eps": 0.03, "eps_step": 0.007, "max_iter": 20}}
    }
    stats = {"aasr": mean_std([0.26, 0.28, 0.30]), "aetr": mean_std([0.9, 0.9, 0.9])}
    task = {
        "repeats": [{"attacks": attacks}],
        "summary": {
            "acc_mean": mean_std([0.80, 0.81, 0.82]),
            "acc_balanced_mean": mean_std([0.60, 0.66, 0.72]),
            "attacks": {"PGD-20": {**stats, "cost_s": mean_std([1.0, 1.0, 1.0])}},
        },
    }
    (table,) = paper_tables("t", "meningioma", task)
    rows = {r[0]: r for r in table.rows}
    assert rows["ACC"][1:3] == ["81.00%", "78.52-83.48%"]
    assert rows["AASR PGD-20"][1:3] == ["28.00%", "23.03-32.97%"]
    assert table.rows[1] == ["balanced ACC", "66.00%", "51.10-80.90%", "not reported", "-"]
    assert rows["AASR PGD-40"][2] == "-"  # no such attack in the run
    assert "over 3 seeds; the paper's value lies inside it for AASR PGD-20" in table.notes[0]
    # the columns without a matching attack say so, and name the parameters they need
    assert table.notes[1] == (
        "n/a: no attack in this run has the paper's parameters (FGSM: fgsm eps 0.03; "
        "PGD-40: pgd eps 0.03, eps_step 0.007, max_iter 40, on [0, 1] pixels)"
    )
    seed = {"aasr": mean_std([0.28]), "aetr": mean_std([0.9]), "cost_s": mean_std([1.0])}
    one = {**task, "summary": {"acc_mean": mean_std([0.81]), "attacks": {"PGD-20": seed}}}
    (single,) = paper_tables("t", "meningioma", one)
    assert single.rows[0][2] == "-" and "needs two seeds" in single.notes[0]
    assert "balanced ACC" not in [r[0] for r in single.rows]  # a run from before it

    def drop_ci(stat: dict) -> dict:
        return {k: v for k, v in stat.items() if k != "ci95"}

    pgd = {k: drop_ci(v) for k, v in task["summary"]["attacks"]["PGD-20"].items()}
    old = {"acc_mean": drop_ci(task["summary"]["acc_mean"]), "attacks": {"PGD-20": pgd}}
    before = {**task, "summary": old}  # 3 seeds, written before summaries carried ci95
    (table,) = paper_tables("t", "meningioma", before)
    assert "not in this run's summary" in table.notes[0]
