"""The report of a finished run, from its metrics alone: rich tables for the terminal and
the same tables as Markdown (report.md). `testbed report RUN_DIR` re-renders both."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from testbed.hostinfo import differences
from testbed.paper import TABLE_I
from testbed.privacy import report_notes


@dataclass
class TableData:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _num(v: Any) -> float:
    if v is None:
        return math.nan
    return math.inf if v == "inf" else float(v)


def pct(v: Any, std: Any = None, n: int = 1) -> str:
    v = _num(v)
    if math.isnan(v):
        return "n/a"
    s = f"{100 * v:.2f}%"
    return s + (f" ± {100 * _num(std):.2f}" if n > 1 and std is not None else "")


def _pct1(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:.1f}%"


def _stat_pct(stat: dict[str, Any] | None) -> str:
    if not stat:
        return "n/a"
    return pct(stat.get("mean"), stat.get("std"), stat.get("n", 1))


def _stat_secs(stat: dict[str, Any]) -> str:
    m = _num(stat.get("mean"))
    if math.isnan(m):
        return "n/a"
    return f"{m:.3f} s" + (f" ± {_num(stat['std']):.3f}" if stat.get("n", 1) > 1 else "")


def _count_note(what: str, counts: list[int], of: str) -> list[str]:
    """How many images a rate is computed on, with the step one image makes when that step is
    coarse: a 100% on one test image must not read like a 100% on a hundred."""
    if not counts:  # a run folder from before the counts were recorded
        return []
    lo, hi = min(counts), max(counts)
    note = f"{what}: {lo}" + ("" if lo == hi else f" to {hi}")
    if 0 < lo < 50:
        note += f" (one image is {100 / lo:.3g} points of {of})"
    return [note]


WIDE = 8
"""Above this many clients, tables show the spread over clients instead of one column each."""


def task_tables(title: str, name: str, task: dict[str, Any]) -> list[TableData]:
    # they import this module
    from testbed.report_floors import class_floor_warnings
    from testbed.report_paper import paper_tables
    from testbed.report_robustness import robust_cell, robustness_tables

    repeats = task["repeats"]
    n_clients = len(repeats[0]["acc"])
    out = []

    wide = n_clients > WIDE
    if wide:  # one column per client would not fit: the spread (all values in metrics.json)
        acc = TableData(
            f"{title}: clean accuracy over {n_clients} clients (own test split)",
            ["seed", "min", "median", "max", "mean", "balanced", "robust ACC", "federation"],
        )
    else:
        acc = TableData(
            f"{title}: clean accuracy per client (own test split)",
            [
                "seed",
                *[f"client {c}" for c in range(n_clients)],
                "mean",
                "balanced",
                "robust ACC",
                "federation",
            ],
        )
    for r in repeats:
        cache = r.get("cache", {})
        values = [_num(r["acc"][str(c)]) for c in range(n_clients)]
        cells = (
            [pct(min(values)), pct(statistics.median(values)), pct(max(values))]
            if wide
            else [pct(v) for v in values]
        )
        acc.rows.append(
            [
                str(r["seed"]),
                *cells,
                pct(r["acc_mean"]),
                pct(r.get("acc_balanced_mean")),  # n/a for runs from before it
                robust_cell(r),
                "from cache" if cache.get("hit") else "trained",
            ]
        )
    acc.notes += _count_note(
        "test images per client",
        [c["test"] for r in repeats for c in r.get("clients", [])],
        "the smallest client's accuracy",
    )
    acc.notes.append(
        "balanced: mean recall over the classes of each client's split (a constant answer "
        "scores 1 / classes)"
    )
    acc.notes += [f"warning: {w}" for w in class_floor_warnings(repeats)]
    out.append(acc)

    summ = task["summary"]
    s = TableData(
        f"{title}: attacks, mean ± std over {len(repeats)} seed(s)",
        ["attack", "AASR", "ASR own", "ASR benign", "AETR", "AASR vs label", "cost / batch"],
    )
    for label, a in summ["attacks"].items():
        s.rows.append(
            [
                label,
                _stat_pct(a["aasr"]),
                _stat_pct(a["aasr_own"]),
                _stat_pct(a["aasr_benign"]),
                _stat_pct(a["aetr"]),
                _stat_pct(a.get("aasr_true")),  # "n/a" for runs from before it
                _stat_secs(a["cost_s"]),
            ]
        )
    if s.rows:
        s.notes.append(f"mean clean ACC {_stat_pct(summ['acc_mean'])}")
        s.notes += _count_note(
            "images attacked per adversary",
            [n for r in repeats for a in r["attacks"].values() for n in a.get("samples", [])],
            "an adversary's own ASR",
        )
        s.notes.append(
            "AASR counts changed predictions (the paper's); AASR vs label: among the images a "
            "model classifies correctly, the share misclassified after the attack"
        )
        out.append(s)
    else:  # a table with a header and no row read like attacks that produced nothing
        acc.notes.append(
            f"mean clean ACC {_stat_pct(summ['acc_mean'])}; no evasion attack configured"
        )
    out += robustness_tables(title, task)

    first = repeats[0]["attacks"]
    for label, a in first.items():
        if a.get("sweep_of"):
            continue  # sweeps are summarised above and drawn in the figures
        asr = [
            [
                sum(_num(r["attacks"][label]["asr"][i][c]) for r in repeats) / len(repeats)
                for c in range(n_clients)
            ]
            for i in range(len(a["adversaries"]))
        ]
        if wide:
            m = TableData(
                f"{title}: ASR, {label}, per adversary over {n_clients - 1} benign models, "
                "mean over seeds",
                ["adversary", "own", "benign min", "benign median", "benign max"],
            )
            for adv, row in zip(a["adversaries"], asr, strict=True):
                benign = [v for c, v in enumerate(row) if c != adv and not math.isnan(v)]
                m.rows.append(
                    [f"client {adv}", _pct1(row[adv])]
                    + [_pct1(f(benign) if benign else math.nan)
                       for f in (min, statistics.median, max)]
                )  # fmt: skip
            out.append(m)
            continue
        m = TableData(
            f"{title}: ASR, {label}: adversary (rows) x target model (columns), mean over seeds",
            ["adversary", *[f"client {c}" for c in range(n_clients)]],
        )
        for adv, row in zip(a["adversaries"], asr, strict=True):
            cells = [_pct1(v) + (" (own)" if c == adv else "") for c, v in enumerate(row)]
            m.rows.append([f"client {adv}", *cells])
        out.append(m)

    for p in repeats[0]["privacy"]:
        eps = summ["epsilon"] or {}
        out.append(
            TableData(
                f"{title}: privacy spent ({p['mechanism']})",
                ["accountant", "level", "epsilon", "delta", "rounds", "C", "z"],
                [
                    [
                        str(p["accountant"]),
                        str(p.get("level", "")),
                        f"{_num(eps.get('mean')):.4g}",
                        f"{p['delta']:g}",
                        str(p["rounds_accounted"]),
                        f"{p['clip_norm']:g}",
                        f"{p['noise_multiplier']:g}",
                    ]
                ],
                report_notes(p),
            )
        )

    events = [(r["seed"], e) for r in repeats for e in r.get("events", [])]
    if events:
        ev = TableData(
            f"{title}: events ({len(events)}): broken or hostile uploads, diverged models",
            ["seed", "round", "client", "kind", "action", "detail"],
        )
        for seed, e in events[:20]:
            client = "-" if e["client"] is None else str(e["client"])
            ev.rows.append(
                [str(seed), str(e["round"]), client, e["kind"], e["action"], e["detail"]]
            )
        if len(events) > 20:
            ev.notes.append(f"{len(events) - 20} more in metrics.json")
        out.append(ev)

    from testbed.report_poisoning import poisoning_tables  # it imports this module

    out += poisoning_tables(title, task)
    from testbed.report_explain import explain_tables  # it imports this module

    out += explain_tables(title, task)
    if name in TABLE_I:
        out += paper_tables(title, name, task)
    rs = summ["round_s"]
    out[0].notes.append(f"time per round {_num(rs['mean']):.2f} s")
    out[0].notes += root_set_notes(repeats)
    return out


def root_set_notes(repeats: list[dict[str, Any]]) -> list[str]:
    """What the server held of the data (FLTrust's root set), from each seed's record."""
    roots = [(r["seed"], r["server"]["root_set"]) for r in repeats if r.get("server")]
    if not roots:
        return []
    first = roots[0][1]
    counts = "; ".join(
        f"seed {seed}: " + ", ".join(map(str, root["label_counts"])) for seed, root in roots
    )
    t = first["training"]
    return [
        f"server root set: {first['size']} of the {first['pool']} images ({first['sampling']}), "
        f"{first['source']}; the clients share the other {first['pool'] - first['size']}. "
        f"Images per class, {counts}. The server trains on it {t['epochs']} epoch(s), "
        f"batch {t['batch_size']}, lr {t['lr']:g}"
    ]


def run_tables(metrics: dict[str, Any]) -> list[TableData]:
    tables = []
    for name, task in metrics["tasks"].items():
        tables += task_tables(f"{metrics['scenario']}/{name}", name, task)
    return tables


def render(metrics: dict[str, Any], console: Console) -> None:
    for t in run_tables(metrics):
        table = Table(title=t.title, caption="; ".join(t.notes) or None)
        for i, h in enumerate(t.headers):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in t.rows:
            table.add_row(*row)
        console.print(table)
    for p in metrics.get("plots", []):
        console.print(f"figure: {p}", highlight=False)
    hw = metrics["hardware"]
    device = hw.get("gpu", hw["device"])
    console.print(f"Device: {device}; {time_phrase(metrics)}")
    if note := hosts_note(metrics):
        console.print(f"Note: {note}", highlight=False)


def hosts_note(metrics: dict[str, Any]) -> str | None:
    """One line where numbers come from more than this host's float path (testbed/hostinfo.py):
    a resume that moved the run, or a federation from the cache trained elsewhere."""
    notes = []
    hosts = metrics.get("hardware", {}).get("hosts") or []
    if len(hosts) > 1:
        notes.append(
            f"resumed on {len(hosts)} hosts ({', '.join(differences(hosts))} differ): each part "
            "is a correct computation, but the whole repeats no single host's run bitwise"
        )
    elsewhere = [
        f"{name} seed {r['seed']}"
        for name, task in metrics.get("tasks", {}).items()
        for r in task.get("repeats", [])
        if (r.get("cache") or {}).get("trained_on")
    ]
    if elsewhere:
        notes.append(
            f"federations from the cache trained on another host ({', '.join(elsewhere)}; "
            "metrics.json's cache.trained_on): the same computation, not this host's bits"
        )
    return "; ".join(notes) or None


def time_phrase(metrics: dict[str, Any]) -> str:
    """The run's wall time; a resumed run's own total covers only its last process."""
    timing = metrics.get("timing", {})
    phrase = f"{_num(timing.get('total_s')):.1f} s in total"
    if (since := timing.get("since_first_start_s")) is not None:
        phrase = (
            f"{_num(timing.get('total_s')):.1f} s in the process that finished it after a "
            f"resume, {_num(since):.0f} s since the run first started (pauses included)"
        )
    return phrase


def engine_line(metrics: dict[str, Any]) -> str:
    """Which engine trained the run, and what that means for comparing its numbers."""
    spec = metrics.get("engine") or {}
    params = spec.get("params") or {}
    line = f"engine {spec.get('name', 'inprocess')}"
    if params:
        line += " (" + ", ".join(f"{k} = {v}" for k, v in params.items()) + ")"
    if params.get("dropout") == "stacked":
        line += ": dropout masks drawn stacked, so this is the in-process training in "
        line += "distribution, not its numbers"
    if params.get("capture") == "cuda-graph":
        line += ": local training replayed as a captured CUDA graph, the eager run's "
        line += "arithmetic but not bitwise its numbers"
    return line


def markdown(metrics: dict[str, Any]) -> str:
    hw = metrics["hardware"]
    lines = [
        f"# {metrics['scenario']}",
        "",
        f"testbed {metrics['testbed_version']}, seeds {metrics['seeds']}, "
        f"{hw.get('gpu', hw['device'])}, torch {hw['torch']}, {engine_line(metrics)}, "
        f"{time_phrase(metrics)}.",
        "",
    ]
    if note := hosts_note(metrics):
        lines += [f"Note: {note}.", ""]
    for t in run_tables(metrics):
        lines += [f"## {t.title}", "", "| " + " | ".join(t.headers) + " |"]
        lines.append("|" + "---|" * len(t.headers))
        lines += ["| " + " | ".join(row) + " |" for row in t.rows]
        lines += [""] + [f"{n}" for n in t.notes] + ([""] if t.notes else [])
    if metrics.get("plots"):
        lines += ["## Figures", ""] + [f"![{p}]({p})" for p in metrics["plots"]] + [""]
    return "\n".join(lines)
