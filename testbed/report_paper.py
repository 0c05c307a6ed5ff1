"""Our Tables I and II beside the paper's (Darzi et al.), with 95% intervals over seeds."""

from __future__ import annotations

import math
from typing import Any

from testbed.paper import PAPER_ATTACKS, TABLE_I, TABLE_II, paper_attack_labels
from testbed.report import TableData, _num, pct


def paper_tables(title: str, name: str, task: dict[str, Any]) -> list[TableData]:
    """Our Table I and II beside the paper's, with the differences."""
    summ = task["summary"]
    labels = paper_attack_labels(task["repeats"][0]["attacks"])
    acc, p20, p40, t20, t40 = TABLE_I[name]
    aetr_fgsm, aetr_pgd = TABLE_II[name]

    def stat(label: str | None, key: str) -> dict[str, Any]:
        return summ["attacks"][label][key] if label else {}

    rows: list[tuple[str, dict[str, Any], float | None, bool]] = [
        ("ACC", summ["acc_mean"], acc, True),
        ("AASR PGD-20", stat(labels["PGD-20"], "aasr"), p20, True),
        ("AASR PGD-40", stat(labels["PGD-40"], "aasr"), p40, True),
        ("s / PGD-20 batch", stat(labels["PGD-20"], "cost_s"), t20, False),
        ("s / PGD-40 batch", stat(labels["PGD-40"], "cost_s"), t40, False),
        ("AETR FGSM", stat(labels["FGSM"], "aetr"), aetr_fgsm, True),
        ("AETR PGD-20", stat(labels["PGD-20"], "aetr"), aetr_pgd, True),
    ]
    if "acc_balanced_mean" in summ:  # the paper gives none; ours shows what a skewed split hides
        rows.insert(1, ("balanced ACC", summ["acc_balanced_mean"], None, True))
    t = TableData(
        f"{title}: Tables I and II beside the paper",
        ["metric", "ours", "95% CI", "paper", "diff"],
    )
    inside: list[str] = []
    has_ci = False
    for metric, st, theirs, is_rate in rows:
        ours = _num(st.get("mean"))
        if theirs is None:
            ci = _ci(st, ours)
            t.rows.append([metric, pct(ours), "-" if ci is None else ci[0], "not reported", "-"])
            continue
        if not is_rate:  # seconds: hardware-bound, no interval over seeds
            diff = "n/a" if math.isnan(ours) else f"x{ours / theirs:.3g}"
            cells = ["n/a" if math.isnan(ours) else f"{ours:.3f}", "-", f"{theirs}", diff]
            t.rows.append([metric, *cells])
            continue
        diff = "n/a" if math.isnan(ours) else f"{100 * (ours - theirs):+.2f} pp"
        ci = "-"
        if (interval := _ci(st, ours)) is not None:
            has_ci = True
            ci, (lo, hi) = interval
            if lo <= theirs <= hi:
                inside.append(metric)
        t.rows.append([metric, pct(ours), ci, pct(theirs), diff])
    n = _num(summ["acc_mean"].get("n"))
    if has_ci:
        t.notes.append(
            f"95% CI: Student's t over {n:.0f} seeds; the paper's value lies inside it for "
            + (", ".join(inside) or "none")
        )
    elif n > 1:  # metrics.json written before summaries carried ci95
        t.notes.append("95% CI: not in this run's summary (recorded before testbed kept it)")
    else:
        t.notes.append("95% CI: needs two seeds or more")
    if missing := [col for col, label in labels.items() if label is None]:
        t.notes.append(_missing_note(missing))
    t.notes.append("paper: Darzi et al., Tables I-II (mean of 3 runs; its hardware not stated)")
    return [t]


def _ci(stat: dict[str, Any], mean: float) -> tuple[str, tuple[float, float]] | None:
    """The summary's 95% interval as text and bounds, or None where it holds none."""
    if stat.get("ci95") is None:
        return None
    lo, hi = mean - _num(stat["ci95"]), mean + _num(stat["ci95"])
    return f"{100 * lo:.2f}-{100 * hi:.2f}%", (lo, hi)


def _missing_note(columns: list[str]) -> str:
    """Why a paper column reads n/a: the run has no attack with the paper's parameters (a
    PGD with another eps measures another attack, so it is not set beside the paper's)."""
    wanted = "; ".join(
        f"{col}: {PAPER_ATTACKS[col][0]} "
        + ", ".join(f"{k} {v:g}" for k, v in PAPER_ATTACKS[col][1].items())
        for col in columns
    )
    return f"n/a: no attack in this run has the paper's parameters ({wanted}, on [0, 1] pixels)"
