"""Trade-offs at a glance for `testbed compare` (matplotlib, headless).

- tradeoff.png: clean accuracy against attack success, one labelled point per
  configuration with error bars (std over seeds) on both axes, the Pareto front (more
  accurate and harder to attack) marked and joined. The first panel takes each
  configuration's strongest attack (its highest mean AASR: the defender's worst case);
  with two to six attacks in all, one more panel per attack.
- tradeoff_epsilon.png, when any configuration has a DP mechanism: clean accuracy and the
  strongest attack's AASR against epsilon (log scale when it spans a decade), the front
  of each panel marked (a smaller epsilon is more private); configurations without DP are
  dashed horizontal lines.

Configurations of different tasks are not comparable: each task gets its own figures
(tradeoff_<task>.png) when a comparison holds several.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from testbed.compare import pareto_front, worst_aasr
from testbed.report import _num

MAX_ATTACK_PANELS = 6


def _stat(s: dict[str, Any] | None) -> tuple[float, float]:
    if not s:
        return math.nan, math.nan
    std = _num(s.get("std")) if s.get("n", 1) > 1 else 0.0
    return _num(s.get("mean")), 0.0 if math.isnan(std) else std


def _aasr(row: dict[str, Any], label: str | None) -> tuple[float, float]:
    if label is None or label not in row["attacks"]:
        return math.nan, math.nan
    return _stat(row["attacks"][label]["aasr"])


def _panel(
    ax: Any,
    rows: list[dict[str, Any]],
    xs: list[tuple[float, float]],
    ys: list[tuple[float, float]],
    front: list[bool],
    xlabel: str,
    ylabel: str,
    title: str,
    tags: list[str] | None = None,
) -> None:
    """Points with error bars, the front marked and joined (by x), each point labelled."""
    for i, (r, (x, xe), (y, ye)) in enumerate(zip(rows, xs, ys, strict=True)):
        if math.isnan(x) or math.isnan(y):
            continue
        on = front[i]
        ax.errorbar(
            x, y, xerr=xe or None, yerr=ye or None, fmt="o", ms=7 if on else 5,
            color="tab:green" if on else "tab:blue", ecolor="0.6", capsize=3, zorder=3,
        )  # fmt: skip
        name = r["config"] + (f" ({tags[i]})" if tags and tags[i] else "")
        ax.annotate(
            name, (x, y), textcoords="offset points", xytext=(6, 6 if i % 2 == 0 else -11),
            fontsize=8, fontweight="bold" if on else "normal",
        )  # fmt: skip
    pts = sorted((xs[i][0], ys[i][0]) for i in range(len(rows)) if front[i])
    if len(pts) > 1:
        ax.plot(*zip(*pts, strict=True), color="tab:green", lw=1.2, ls="--",
                label="Pareto front", zorder=2)  # fmt: skip
    elif pts:
        ax.plot(*pts[0], "o", color="tab:green", label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=8, loc="best")


def tradeoff_figure(
    labels: list[str], rows: list[dict[str, Any]], path: Path, title: str = ""
) -> Path | None:
    """Clean ACC against AASR; None when no configuration has an attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if all(r.get("strongest") is None for r in rows):
        return None
    accs = [_stat(r["acc"]) for r in rows]
    present = [lab for lab in labels if any(lab in r["attacks"] for r in rows)]
    per_attack = present if 2 <= len(present) <= MAX_ATTACK_PANELS else []
    n = 1 + len(per_attack)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.6 * cols, 4.4 * nrows), squeeze=False)
    flat = axes.ravel()
    worst = [_aasr(r, r.get("strongest")) for r in rows]
    front = pareto_front([(a, w) for (a, _), (w, _) in zip(accs, worst, strict=True)])
    _panel(
        flat[0], rows, worst, accs, front, "AASR of the strongest attack (lower: more robust)",
        "clean ACC", "strongest attack per configuration",
        tags=[r.get("strongest") or "" for r in rows] if per_attack else None,
    )  # fmt: skip
    for ax, label in zip(flat[1:], per_attack, strict=False):
        xs = [_aasr(r, label) for r in rows]
        front = pareto_front([(a, x) for (a, _), (x, _) in zip(accs, xs, strict=True)])
        _panel(ax, rows, xs, accs, front, f"AASR {label}", "clean ACC", label)
    for ax in flat[n:]:
        ax.axis("off")
    fig.suptitle(
        (title + ": " if title else "")
        + "clean accuracy vs attack success, mean ± std over seeds (upper left is better)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def epsilon_figure(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Clean ACC and the strongest attack's AASR against DP epsilon; None without DP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = [r for r in rows if r.get("epsilon") is not None and math.isfinite(r["epsilon"])]
    if not dp:
        return None
    plain = [r for r in rows if r.get("epsilon") is None]
    eps = [(r["epsilon"], _num(r.get("epsilon_std")) if r.get("epsilon_std") else 0.0)
           for r in dp]  # fmt: skip
    eps = [(m, 0.0 if math.isnan(s) else s) for m, s in eps]
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    panels = (
        (axes[0], [_stat(r["acc"]) for r in dp], True, "clean ACC", lambda r: _stat(r["acc"])[0]),
        (axes[1], [(worst_aasr(r), _aasr(r, r.get("strongest"))[1]) for r in dp], False,
         "AASR of the strongest attack", worst_aasr),
    )  # fmt: skip
    for ax, ys, higher_better, ylabel, value in panels:
        # front: smaller epsilon and a better y; pareto_front maximises its first value
        pts = [(y if higher_better else -y, x) for (x, _), (y, _) in zip(eps, ys, strict=True)]
        front = pareto_front(pts)
        _panel(ax, dp, eps, ys, front, "DP epsilon (lower: more private)", ylabel, ylabel)
        for r in plain:
            v = value(r)
            if not math.isnan(v):
                ax.axhline(v, color="0.4", ls=":", lw=1)
                ax.annotate(f"{r['config']} (no DP)", (0.01, v), xycoords=("axes fraction",
                            "data"), fontsize=8, color="0.3", va="bottom")  # fmt: skip
        xs = [x for x, _ in eps if x > 0]
        if xs and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
    fig.suptitle(
        (title + ": " if title else "") + "privacy against accuracy and attack success",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def tradeoff_figures(labels: list[str], rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """The figures, per task when the comparison holds several; their paths."""
    from testbed.rundir import safe_name

    tasks = list(dict.fromkeys(r.get("task") for r in rows))
    paths = []
    for task in tasks:
        group = [r for r in rows if r.get("task") == task]
        suffix = f"_{safe_name(str(task))}" if len(tasks) > 1 else ""
        title = str(task) if len(tasks) > 1 else ""
        for fig in (
            tradeoff_figure(labels, group, out / f"tradeoff{suffix}.png", title),
            epsilon_figure(group, out / f"tradeoff_epsilon{suffix}.png", title),
        ):
            if fig is not None:
                paths.append(fig)
    return paths
