"""`testbed compare`: one table over defence configurations, training shared via the cache."""

import json

from test_cli import TINY

from testbed.cli import main
from testbed.compare import pareto_front, sorted_rows


def test_compare_two_defences_writes_table_json_and_chart(tmp_path, capsys):
    none = tmp_path / "none.toml"
    none.write_text(
        TINY.replace('name = "tiny"', 'name = "no-dp"').replace(
            '[dp]\nname = "paper_dp"\nparams = { clip_norm = 1.0, noise_multiplier = 0.5 }\n', ""
        )
    )
    dp = tmp_path / "dp.toml"
    dp.write_text(TINY.replace('name = "tiny"', 'name = "paper-dp"'))
    median = tmp_path / "median.toml"
    median.write_text(
        TINY.replace('name = "tiny"', 'name = "median"') + '[aggregator]\nname = "median"\n'
    )
    out = tmp_path / "cmp"
    args = ["compare", str(none), str(dp), str(median), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    table = json.loads((out / "compare.json").read_text())
    assert [r["config"] for r in table["rows"]] == ["no-dp", "paper-dp", "median"]
    assert table["attacks"] == ["PGD-3"]
    by = {r["config"]: r for r in table["rows"]}
    assert by["no-dp"]["epsilon"] is None and by["paper-dp"]["epsilon"] > 0
    assert by["paper-dp"]["mechanism"] == "paper_dp"
    md = (out / "compare.md").read_text()
    assert "| no-dp |" in md and "AASR PGD-3" in md
    # balanced accuracy beside the clean one, as each run's summary has it
    run = json.loads((out / "no-dp" / "metrics.json").read_text())["tasks"]["synthetic"]
    assert by["no-dp"]["acc_balanced"] == run["summary"]["acc_balanced_mean"]
    assert "| configuration | clean ACC | balanced ACC | robust ACC |" in md
    assert (out / "compare.png").stat().st_size > 1000
    for name in ("no-dp", "paper-dp", "median"):
        assert (out / name / "metrics.json").exists()
        assert (out / name / "report.html").exists()
    terminal = capsys.readouterr().out
    assert "Defence comparison" in terminal and "Pareto front: " in terminal

    # A configuration whose models are no better than the commonest class is named
    metrics = json.loads((out / "no-dp" / "metrics.json").read_text())
    (rep,) = metrics["tasks"]["synthetic"]["repeats"]
    for c in rep["clients"]:
        c["test_label_counts"] = [1, 3]  # 4 test images: the floor is 75%
    rep["acc"] = {"0": 0.75, "1": 1.0, "2": 1.0}
    rep["acc_balanced"] = {"0": 0.5, "1": 1.0, "2": 1.0}  # client 0 always answers class 1
    from testbed import compare

    _, flagged = compare.rows({"no-dp": metrics})
    assert compare.notes(flagged)[1:] == [
        "warning: no-dp: 1 of 3 client models score no higher than always answering their "
        "test split's commonest class (seed 5 client 0 75.00% against 75.00%, balanced "
        "50.00%): their accuracy does not show that they learned the task; balanced "
        "accuracy tells which did (a constant answer scores 50.00%)"
    ]
    for r in table["rows"]:  # the tiny runs' own (2 rounds): in compare.md as computed
        assert all(f"warning: {r['config']}: {w}" in md for w in r["class_floor"])

    # Trade-offs: the figures, the front, and the tables sorted by the strongest AASR
    for fig in ("tradeoff.png", "tradeoff_epsilon.png"):  # paper-dp has an epsilon
        assert (out / fig).stat().st_size > 1000
        assert f"![{fig}]({fig})" in md
    worst = [by[c]["attacks"]["PGD-3"]["aasr"]["mean"] for c in ("no-dp", "paper-dp", "median")]
    assert all(by[c]["strongest"] == "PGD-3" for c in by)
    order = [r["config"] for r in sorted_rows(table["rows"])]
    assert [by[c]["attacks"]["PGD-3"]["aasr"]["mean"] for c in order] == sorted(worst)
    md_order = [line.split(" | ")[0].lstrip("| ") for line in md.splitlines()[6:9]]
    assert md_order == order and "sorted by the strongest attack's AASR, lowest first" in md
    front = pareto_front([(by[c]["acc"]["mean"], by[c]["attacks"]["PGD-3"]["aasr"]["mean"])
                          for c in ("no-dp", "paper-dp", "median")])  # fmt: skip
    assert [by[c]["pareto"] for c in ("no-dp", "paper-dp", "median")] == front and any(front)
    html = (out / "report.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == 3
    assert "no-dp/report.html" in html and "Pareto front" in html

    # A second comparison reuses every trained federation.
    again = tmp_path / "cmp2"
    assert main(["compare", str(none), str(dp), "--out", str(again), "--no-progress"]) == 0
    rows = json.loads((again / "compare.json").read_text())["rows"]
    assert all(r["cache_hits"] == 1 for r in rows)


def test_compare_reports_every_broken_file_before_running(tmp_path, capsys):
    bad1 = tmp_path / "a.toml"
    bad1.write_text(TINY.replace("rounds = 2", "rounds = 0"))
    bad2 = tmp_path / "b.toml"
    bad2.write_text(TINY + '[aggregator]\nname = "nope"\n')
    assert main(["compare", str(bad1), str(bad2), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "a.toml: federation.rounds" in err and "b.toml: aggregator.name" in err
    assert not (tmp_path / "c").exists()


def test_pareto_front_on_a_known_case():
    # (clean ACC, AASR): higher ACC and lower AASR are better
    points = [
        (0.9, 0.8),  # most accurate: on the front
        (0.8, 0.3),  # on the front
        (0.7, 0.3),  # dominated by (0.8, 0.3)
        (0.6, 0.1),  # most robust: on the front
        (0.6, 0.1),  # a tie with the previous point: neither dominates the other
        (0.5, 0.5),  # dominated
        (float("nan"), 0.0),  # no number: never on the front
    ]
    assert pareto_front(points) == [True, True, False, True, True, False, False]


def test_one_label_for_two_attacks_on_one_task_is_refused_before_running(tmp_path, capsys):
    a, b, c = tmp_path / "a.toml", tmp_path / "b.toml", tmp_path / "c.toml"
    a.write_text(TINY.replace('name = "tiny"', 'name = "a"'))
    b.write_text(TINY.replace('name = "tiny"', 'name = "b"').replace("eps = 0.05", "eps = 0.1"))
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"attack PGD-3 on task synthetic differs between {a} and {b} (eps 0.05 vs 0.1)" in err
    assert not (tmp_path / "cmp").exists()
    # its own label: two columns, no clash (checked by the same function the command runs)
    from testbed.compare import label_clash
    from testbed.pluginmanager import build_host
    from testbed.scenario_load import load_scenario

    c.write_text(b.read_text().replace('name = "pgd"', 'name = "pgd"\nlabel = "PGD-3 wide"'))
    reg = build_host(autoload=False).registry
    assert label_clash([(str(f), load_scenario(f, reg)) for f in (a, c)]) is None
    # the same attack on another number of images (or by other adversaries) is another
    # measurement under the same label
    d = tmp_path / "d.toml"
    d.write_text(
        TINY.replace('name = "tiny"', 'name = "d"').replace("adversary = 10", "adversary = 7")
    )
    clash = label_clash([(str(f), load_scenario(f, reg)) for f in (a, d)])
    assert clash is not None and "(threat_model.samples_per_adversary 10 vs 7)" in clash


def test_one_task_on_other_images_is_refused_before_running(tmp_path, capsys):
    # A [data] task is named by its loader: two scenarios on other data (here the generator's
    # seed) would otherwise share one Pareto front, ranked as if scored on the same images.
    a, b, c = tmp_path / "a.toml", tmp_path / "b.toml", tmp_path / "c.toml"
    a.write_text(TINY.replace('name = "tiny"', 'name = "a"'))
    b.write_text(TINY.replace('name = "tiny"', 'name = "b"').replace("= 16 }", "= 16, seed = 1 }"))
    assert "seed = 1 }" in b.read_text()
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"task synthetic holds other images in {b} than in {a} (data: seed 0 vs 1)" in err
    assert not (tmp_path / "cmp").exists()
    # the same images with a default spelt out are one task: both rows, one front
    c.write_text(
        a.read_text().replace('name = "a"', 'name = "c"').replace("= 16 }", "= 16, seed = 0 }")
    )
    assert main(["compare", str(a), str(c), "--out", str(tmp_path / "ok"), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "ok" / "compare.json").read_text())["rows"]
    assert [(r["config"], r["task"]) for r in rows] == [("a", "synthetic"), ("c", "synthetic")]


def test_data_clash_on_a_known_case():
    from testbed.compare import data_clash

    syn = {"name": "synthetic", "seed": 0}
    same = [("a.toml", "synthetic", syn, "f0"), ("b.toml", "synthetic", {**syn, "n": 1}, "f0")]
    assert data_clash(same) is None  # other words, the same images
    two = [("a.toml", "mri", {"name": "brain_mri"}, "f0"), ("b.toml", "glioma", {}, "f1")]
    assert data_clash(two) is None  # other images under other names
    clash = [*same, ("c.toml", "synthetic", {**syn, "seed": 1}, "f1")]
    assert data_clash(clash) == (
        "task synthetic holds other images in c.toml than in a.toml (data: seed 0 vs 1): the "
        "rows of one task must be scored on the same images; to set other data side by side, "
        "give each its own task name ([[tasks]] name = ...)"
    )
    odd = [("a.toml", "x", syn, "f0"), ("b.toml", "x", syn, "f1")]
    assert "(data: the same [data], other images)" in data_clash(odd)


def test_pareto_notes_without_an_evasion_attack_name_no_front():
    from testbed.compare import pareto_notes

    acc = {"mean": 0.9, "std": 0.0, "n": 1}
    rows = [{"config": c, "task": "t", "acc": acc, "attacks": {}, "strongest": None,
             "pareto": False} for c in ("a", "b")]  # fmt: skip
    assert pareto_notes(rows) == ["No Pareto front: no configuration runs an evasion attack."]
