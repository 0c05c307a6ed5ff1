"""`testbed compare`: several scenarios run side by side, one row per configuration.

Each scenario is an ordinary run (its own run folder inside the comparison folder);
identical training parts are trained once through the federation cache. The table is
written as Markdown, JSON, a bar chart, the trade-off figures (clean accuracy against the
strongest attack's success and, where a DP mechanism is present, against epsilon, with the
Pareto front marked) and one self-contained report.html beside the runs. The tables are
sorted by the strongest attack's AASR, lowest first (ties: higher clean ACC first);
compare.json keeps the order the scenarios were given in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from testbed.report import _num, pct
from testbed.report_floors import class_floor_warnings
from testbed.scenario import Scenario


def label_clash(scenarios: Sequence[tuple[str, Scenario]]) -> str | None:
    """Why two compared scenarios cannot share a table, else None: an attack label that
    names different attacks (another name or params) in two scenarios of the same task,
    or the same attack run by other adversaries on another number of images, whose
    column would set unlike measurements side by side."""
    seen: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
    for path, scenario in scenarios:
        tm = scenario.threat_model
        who: dict[str, Any] = {
            "threat_model.adversaries": tm.adversaries,
            "threat_model.samples_per_adversary": tm.samples_per_adversary,
        }
        if tm.adversaries == "malicious":  # then these say who the adversaries are
            who |= {"threat_model.malicious": tm.malicious,
                    "threat_model.malicious_fraction": tm.malicious_fraction}  # fmt: skip
        for task in scenario.task_list():
            for a in scenario.attacks:
                what = {"name": a.name, **a.params, **who}
                first = seen.setdefault((task.name, a.label), (path, what))
                if first[1] != what:
                    return (
                        f"attack {a.label} on task {task.name} differs between {first[0]} and "
                        f"{path} ({_spec_diff(first[1], what)}): give one of them its own "
                        "`label`"
                    )
    return None


def _spec_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {a.get(k, '-')} vs {b.get(k, '-')}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    )


def data_clash(tasks: Sequence[tuple[str, str, dict[str, Any], str]]) -> str | None:
    """Why the compared tasks cannot share a table, else None: one task name whose rows
    were loaded from other images in two scenarios. ``tasks`` holds (scenario path, task
    name, its [data] as {"name": ..., **params}, the decoded images' fingerprint). A task
    is named by its dataset when the scenario has [data], so two scenarios on the same
    loader with other params (another MRI task, image size or seed) would otherwise be
    ranked on one Pareto front as if scored on the same data."""
    seen: dict[str, tuple[str, dict[str, Any], str]] = {}
    for path, name, spec, fingerprint in tasks:
        first = seen.setdefault(name, (path, spec, fingerprint))
        if first[2] != fingerprint:
            why = _spec_diff(first[1], spec) or "the same [data], other images"
            return (
                f"task {name} holds other images in {path} than in {first[0]} (data: {why}): "
                "the rows of one task must be scored on the same images; to set other data "
                "side by side, give each its own task name ([[tasks]] name = ...)"
            )
    return None


def rows(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Attack labels (union, in first-seen order) and one row per (scenario, task)."""
    labels: list[str] = []
    out = []
    for name, metrics in results.items():
        for task_name, task in metrics["tasks"].items():
            summ = task["summary"]
            privacy = task["repeats"][0]["privacy"]
            eps = summ.get("epsilon") or {}
            row: dict[str, Any] = {
                "config": name if len(metrics["tasks"]) == 1 else f"{name}/{task_name}",
                "scenario": name,
                "task": task_name,
                "acc": summ["acc_mean"],
                "acc_balanced": summ.get("acc_balanced_mean"),  # absent in runs before it
                "robust_acc": summ.get("robust_acc"),
                "epsilon": _num(eps.get("mean")) if privacy else None,
                "epsilon_std": _num(eps.get("std")) if privacy else None,
                "delta": privacy[0]["delta"] if privacy else None,
                "mechanism": ", ".join(p["mechanism"] for p in privacy) or "none",
                "cache_hits": sum(bool(r.get("cache", {}).get("hit")) for r in task["repeats"]),
                "attacks": {},
                "poisoning": summ.get("poisoning"),
                "class_floor": class_floor_warnings(task["repeats"]),
            }
            for label, a in summ["attacks"].items():
                if label not in labels:
                    labels.append(label)
                row["attacks"][label] = {
                    "aasr": a["aasr"],
                    "aasr_benign": a["aasr_benign"],
                    "aetr": a["aetr"],
                    "cost_s": a["cost_s"],
                }
            row["strongest"] = strongest(row)
            out.append(row)
    mark_pareto(out)
    return labels, out


def strongest(row: dict[str, Any]) -> str | None:
    """The attack with the highest mean AASR on this configuration: the defender's worst
    case (None without attacks)."""
    scored = [
        (m, label)
        for label, a in row["attacks"].items()
        if not math.isnan(m := _num(a["aasr"]["mean"]))
    ]
    return max(scored)[1] if scored else None


def worst_aasr(row: dict[str, Any]) -> float:
    label = row.get("strongest")
    return _num(row["attacks"][label]["aasr"]["mean"]) if label else math.nan


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which of the (clean ACC, attack success) points no other point dominates: as
    accurate or more and as hard to attack or harder, strictly better in one. Points with
    a NaN coordinate are never on the front."""
    ok = [not (math.isnan(a) or math.isnan(s)) for a, s in points]
    front = []
    for i, (a, s) in enumerate(points):
        dominated = any(
            ok[j] and b >= a and t <= s and (b > a or t < s)
            for j, (b, t) in enumerate(points)
            if j != i
        )
        front.append(ok[i] and not dominated)
    return front


def mark_pareto(table_rows: list[dict[str, Any]]) -> None:
    """row["pareto"]: on the front of clean ACC vs the strongest attack's AASR among the
    rows of the same task (configurations of different tasks are not comparable)."""
    for task in dict.fromkeys(r.get("task") for r in table_rows):
        group = [r for r in table_rows if r.get("task") == task]
        flags = pareto_front([(_num(r["acc"]["mean"]), worst_aasr(r)) for r in group])
        for r, flag in zip(group, flags, strict=True):
            r["pareto"] = flag


SORT_NOTE = "sorted by the strongest attack's AASR, lowest first (ties: higher clean ACC first)"


def sorted_rows(table_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The display order: most robust first, by the strongest attack's AASR; rows without
    an attack after those with one, by clean ACC."""

    def key(r: dict[str, Any]) -> tuple[bool, float, float]:
        w = worst_aasr(r)
        acc = _num(r["acc"]["mean"])
        return (math.isnan(w), 0.0 if math.isnan(w) else w, -acc if not math.isnan(acc) else 0)

    return sorted(table_rows, key=key)


POISONING_HEADERS = [
    "ACC benign", "backdoor success", "bd untriggered", "targeted error", "compr. dropped",
    "benign dropped",
]  # fmt: skip
"""Columns of the training-time attacks, shown when any configuration has them."""


def _poisoned(table_rows: list[dict[str, Any]]) -> bool:
    return any(r.get("poisoning") for r in table_rows)


def _poisoning_cells(p: dict[str, Any] | None) -> list[str]:
    if not p:
        return ["-"] * len(POISONING_HEADERS)

    def stat(key: str, sub: str | None = None) -> str:
        block = p.get(key) or {}
        s = ((block.get(sub) or {}) if sub else block).get("benign")
        return pct(s["mean"], s["std"], s["n"]) if s else "-"

    det = p["detection"]
    caught = [
        f"{det[k + '_dropped']}/{det[k]}" if det[k] else "0/0" for k in ("malicious", "benign")
    ]
    acc = p["acc_benign"]
    return [pct(acc["mean"], acc["std"], acc["n"]), stat("backdoor_success"),
            stat("backdoor_success", "untriggered"), stat("targeted_error"), *caught]  # fmt: skip


def _cells(row: dict[str, Any], labels: list[str], poisoned: bool = False) -> list[str]:
    eps = row["epsilon"]
    privacy = "-" if eps is None else f"({eps:.3g}, {row['delta']:g})"
    rob = row.get("robust_acc")
    robust = pct(rob["mean"], rob["std"], rob["n"]) if rob else "n/a"
    bal = row.get("acc_balanced")
    balanced = pct(bal["mean"], bal["std"], bal["n"]) if bal else "n/a"
    acc = pct(row["acc"]["mean"], row["acc"]["std"], row["acc"]["n"])
    cells = [row["config"], acc, balanced, robust]
    cells.append(privacy)
    label = row.get("strongest")
    if label:
        a = row["attacks"][label]["aasr"]
        cells.append(f"{pct(a['mean'], a['std'], a['n'])} ({label})")
    else:
        cells.append("-")
    cells.append("yes" if row.get("pareto") else "")
    if poisoned:
        cells += _poisoning_cells(row.get("poisoning"))
    for label in labels:
        a = row["attacks"].get(label)
        if a is None:
            cells += ["-", "-", "-"]
            continue
        s = a["aasr"]
        cells += [
            pct(s["mean"], s["std"], s["n"]),
            pct(a["aetr"]["mean"]),
            f"{_num(a['cost_s']['mean']):.3f} s",
        ]
    return cells


def headers(labels: list[str], poisoned: bool = False) -> list[str]:
    h = [
        "configuration", "clean ACC", "balanced ACC", "robust ACC", "(epsilon, delta)",
        "strongest AASR",
        "Pareto",
    ]  # fmt: skip
    if poisoned:
        h += POISONING_HEADERS
    for label in labels:
        h += [f"AASR {label}", f"AETR {label}", f"cost {label}"]
    return h


def render(labels: list[str], table_rows: list[dict[str, Any]], console: Console) -> None:
    t = Table(title=f"Defence comparison (mean ± std over seeds), {SORT_NOTE}")
    poisoned = _poisoned(table_rows)
    for i, h in enumerate(headers(labels, poisoned)):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in sorted_rows(table_rows):
        t.add_row(*_cells(row, labels, poisoned))
    console.print(t)
    for note in notes(table_rows):
        console.print(note, markup=False, highlight=False)


def markdown(
    labels: list[str], table_rows: list[dict[str, Any]], figures: list[str] | None = None
) -> str:
    poisoned = _poisoned(table_rows)
    h = headers(labels, poisoned)
    lines = ["# Defence comparison", "", f"Mean ± std over seeds; {SORT_NOTE}.", ""]
    lines += ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
    lines += [
        "| " + " | ".join(_cells(row, labels, poisoned)) + " |" for row in sorted_rows(table_rows)
    ]
    lines += ["", *notes(table_rows)]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def notes(table_rows: list[dict[str, Any]]) -> list[str]:
    """The Pareto front per task, then each configuration with client models at their class
    floor (a high AASR on a model that learned nothing reads as a weak defence)."""
    out = pareto_notes(table_rows)
    for r in table_rows:
        out += [f"warning: {r['config']}: {w}" for w in r["class_floor"]]
    return out


def pareto_notes(table_rows: list[dict[str, Any]]) -> list[str]:
    """One line per task: the configurations on the front and what the front means."""
    out = []
    for task in dict.fromkeys(r.get("task") for r in table_rows):
        group = [r for r in table_rows if r.get("task") == task]
        front = [r["config"] for r in group if r.get("pareto")]
        where = f" ({task})" if len({r.get("task") for r in table_rows}) > 1 else ""
        if not any(r["attacks"] for r in group):  # "none" would read as a finding
            out.append(f"No Pareto front{where}: no configuration runs an evasion attack.")
            continue
        out.append(
            f"Pareto front{where}: {', '.join(front) or 'none'}: no other configuration has "
            "both a higher clean ACC and a lower AASR of its strongest attack."
        )
    return out


def chart(labels: list[str], table_rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    table_rows = sorted_rows(table_rows)
    names = [r["config"] for r in table_rows]
    series = [("clean ACC", [_num(r["acc"]["mean"]) for r in table_rows])]
    for label in labels:
        vals = [
            _num(r["attacks"][label]["aasr"]["mean"]) if label in r["attacks"] else math.nan
            for r in table_rows
        ]
        series.append((f"AASR {label}", vals))
    for key in ("backdoor_success", "targeted_error"):
        if any((r.get("poisoning") or {}).get(key) for r in table_rows):
            vals = [
                _num(r["poisoning"][key]["benign"]["mean"])
                if (r.get("poisoning") or {}).get(key)
                else math.nan
                for r in table_rows
            ]
            series.append((f"{key.replace('_', ' ')} (benign models)", vals))
    floors = [((r.get("poisoning") or {}).get("backdoor_success") or {}).get("untriggered")
              for r in table_rows]  # fmt: skip
    if any(floors):
        vals = [_num(f["benign"]["mean"]) if f else math.nan for f in floors]
        series.append(("the same without the trigger", vals))
    x = np.arange(len(names))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names) + 2) + 2.5, 4))  # + the legend
    for i, (name, vals) in enumerate(series):
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=name)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    order = "most robust first" if labels else "by clean accuracy"  # sorted_rows' order
    ax.set_title(f"clean accuracy and attack success per configuration\n({order})", fontsize=10)
    # beside the axes: inside, it covered the bars at 1.0 (clean accuracy)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long rotated names are not cut off
    plt.close(fig)
    return path


def write_outputs(
    out: Path, labels: list[str], table_rows: list[dict[str, Any]], results: dict[str, Any]
) -> list[Path]:
    """compare.json (rows in the order given), compare.md, compare.png, the trade-off
    figures and report.html; the paths written."""
    from testbed.compare_figures import tradeoff_figures
    from testbed.report_html import write_compare_html
    from testbed.rundir import write_json

    write_json(out / "compare.json", {"schema_version": 1, "attacks": labels, "rows": table_rows})
    figures = [chart(labels, table_rows, out / "compare.png")]
    figures = tradeoff_figures(labels, table_rows, out) + figures
    names = [f.name for f in figures]
    tmp = out / "compare.md.tmp"
    tmp.write_text(markdown(labels, table_rows, names))
    tmp.replace(out / "compare.md")
    html = write_compare_html(out, labels, table_rows, results, names)
    return [out / "compare.json", out / "compare.md", *figures, html]
