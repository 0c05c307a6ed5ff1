"""Rich terminal tables for a finished run's metrics."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table


def _pct(stat: dict[str, float] | None) -> str:
    if not stat or stat.get("mean") is None or math.isnan(stat["mean"]):
        return "n/a"
    s = f"{100 * stat['mean']:.2f}%"
    return s + (f" ± {100 * stat['std']:.2f}" if stat.get("n", 1) > 1 else "")


def _secs(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.3f} s" + (f" ± {stat['std']:.3f}" if stat.get("n", 1) > 1 else "")


def render(metrics: dict[str, Any], console: Console) -> None:
    for name, task in metrics["tasks"].items():
        console.rule(f"{metrics['scenario']}: {name} ({task['dataset']['images']} images)")
        render_task(f"{metrics['scenario']}/{name}", task, console)
    console.print(
        f"Device: {metrics['hardware']['device']}; total {metrics['timing']['total_s']:.1f} s"
    )


def render_task(title: str, metrics: dict[str, Any], console: Console) -> None:
    repeats = metrics["repeats"]
    n_clients = len(repeats[0]["acc"])

    acc = Table(title="Clean accuracy per client (own test split)")
    acc.add_column("seed")
    for c in range(n_clients):
        acc.add_column(f"client {c}", justify="right")
    acc.add_column("mean", justify="right")
    for r in repeats:
        acc.add_row(
            str(r["seed"]),
            *(f"{100 * r['acc'][str(c)]:.2f}%" for c in range(n_clients)),
            f"{100 * r['acc_mean']:.2f}%",
        )
    console.print(acc)

    for label, first in repeats[0]["attacks"].items():
        t = Table(title=f"ASR, {label}: adversary (rows) x target model (columns), mean over seeds")
        t.add_column("adversary")
        for c in range(n_clients):
            t.add_column(f"client {c}", justify="right")
        for i, a in enumerate(first["adversaries"]):
            cells = []
            for c in range(n_clients):
                v = sum(r["attacks"][label]["asr"][i][c] for r in repeats) / len(repeats)
                cells.append(f"[bold]{100 * v:.1f}%[/]" if c == a else f"{100 * v:.1f}%")
            t.add_row(f"client {a}", *cells)
        console.print(t)

    summ = metrics["summary"]
    s = Table(title=f"{title}: summary over {len(repeats)} seed(s)")
    for col in ("attack", "ACC", "AASR", "ASR own", "ASR benign", "AETR", "cost / batch"):
        s.add_column(col, justify="right" if col != "attack" else "left")
    for label, a in summ["attacks"].items():
        s.add_row(
            label,
            _pct(summ["acc_mean"]),
            _pct(a["aasr"]),
            _pct(a["aasr_own"]),
            _pct(a["aasr_benign"]),
            _pct(a["aetr"]),
            _secs(a["cost_s"]),
        )
    if not summ["attacks"]:
        s.add_row("(none)", _pct(summ["acc_mean"]), "", "", "", "", "")
    console.print(s)

    for p in repeats[0]["privacy"]:
        eps = summ["epsilon"]
        console.print(
            f"Privacy ({p['mechanism']}, {p['accountant']} accountant, {p['level']}-level): "
            f"epsilon = {eps['mean']:.3g} at delta = {p['delta']:g} after "
            f"{p['rounds_accounted']} rounds "
            f"(C = {p['clip_norm']:g}, z = {p['noise_multiplier']:g}); "
            f"{p['note']}"
        )
    events = [(r["seed"], e) for r in repeats for e in r.get("events", [])]
    if events:
        ev = Table(title=f"Server events ({len(events)}): broken or hostile uploads")
        for col in ("seed", "round", "client", "kind", "action", "detail"):
            ev.add_column(col)
        for seed, e in events[:20]:
            client = "-" if e["client"] is None else str(e["client"])
            ev.add_row(str(seed), str(e["round"]), client, e["kind"], e["action"], e["detail"])
        console.print(ev)
        if len(events) > 20:
            console.print(f"... {len(events) - 20} more in metrics.json")
    rs = summ["round_s"]
    console.print(f"Time per round: {rs['mean']:.2f} s")
