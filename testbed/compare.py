"""`testbed compare`: several scenarios run side by side, one row per configuration.

Each scenario is an ordinary run (its own run folder inside the comparison folder);
identical training parts are trained once through the federation cache. The table is
written as Markdown, JSON and a PNG chart beside the runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from testbed.report import _num, pct


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
                "acc": summ["acc_mean"],
                "robust_acc": summ.get("robust_acc"),
                "epsilon": _num(eps.get("mean")) if privacy else None,
                "delta": privacy[0]["delta"] if privacy else None,
                "mechanism": ", ".join(p["mechanism"] for p in privacy) or "none",
                "cache_hits": sum(bool(r.get("cache", {}).get("hit")) for r in task["repeats"]),
                "attacks": {},
                "poisoning": summ.get("poisoning"),
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
            out.append(row)
    return labels, out


POISONING_HEADERS = [
    "ACC benign", "backdoor success", "targeted error", "compr. dropped", "benign dropped",
]  # fmt: skip
"""Columns of the training-time attacks, shown when any configuration has them."""


def _poisoned(table_rows: list[dict[str, Any]]) -> bool:
    return any(r.get("poisoning") for r in table_rows)


def _poisoning_cells(p: dict[str, Any] | None) -> list[str]:
    if not p:
        return ["-"] * len(POISONING_HEADERS)

    def stat(key: str) -> str:
        s = p[key]["benign"] if key in p else None
        return pct(s["mean"], s["std"], s["n"]) if s else "-"

    det = p["detection"]
    caught = [
        f"{det[k + '_dropped']}/{det[k]}" if det[k] else "0/0" for k in ("malicious", "benign")
    ]
    acc = p["acc_benign"]
    return [pct(acc["mean"], acc["std"], acc["n"]), stat("backdoor_success"),
            stat("targeted_error"), *caught]  # fmt: skip


def _cells(row: dict[str, Any], labels: list[str], poisoned: bool = False) -> list[str]:
    eps = row["epsilon"]
    privacy = "-" if eps is None else f"({eps:.3g}, {row['delta']:g})"
    rob = row.get("robust_acc")
    robust = pct(rob["mean"], rob["std"], rob["n"]) if rob else "n/a"
    cells = [row["config"], pct(row["acc"]["mean"], row["acc"]["std"], row["acc"]["n"]), robust]
    cells.append(privacy)
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
    h = ["configuration", "clean ACC", "robust ACC", "(epsilon, delta)"]
    if poisoned:
        h += POISONING_HEADERS
    for label in labels:
        h += [f"AASR {label}", f"AETR {label}", f"cost {label}"]
    return h


def render(labels: list[str], table_rows: list[dict[str, Any]], console: Console) -> None:
    t = Table(title="Defence comparison (mean ± std over seeds)")
    poisoned = _poisoned(table_rows)
    for i, h in enumerate(headers(labels, poisoned)):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in table_rows:
        t.add_row(*_cells(row, labels, poisoned))
    console.print(t)


def markdown(labels: list[str], table_rows: list[dict[str, Any]]) -> str:
    poisoned = _poisoned(table_rows)
    h = headers(labels, poisoned)
    lines = ["# Defence comparison", "", "| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
    lines += ["| " + " | ".join(_cells(row, labels, poisoned)) + " |" for row in table_rows]
    return "\n".join(lines) + "\n"


def chart(labels: list[str], table_rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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
    x = np.arange(len(names))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names) + 2), 4))
    for i, (name, vals) in enumerate(series):
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=name)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title("clean accuracy and attack success per configuration")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
