"""The sections of a run's report.html that report.md has no counterpart for.

Key numbers at a glance, the example images (clean, adversarial, amplified
perturbation), and the tables built straight from metrics.json: clients, every round,
every server event, and a generic view of every metric that no table of report.md
shows, so that a new metric appears on the page without a change here. Kept apart from
report_html.py, which only assembles these into the run's and the comparison's pages.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from testbed.html_page import data_uri, e
from testbed.metrics import class_name
from testbed.report import TableData, _num, _stat_pct, pct
from testbed.report_floors import at_class_floor, class_floor

MAX_GENERIC_ROWS = 500
MAX_EXAMPLES = 60
"""Example images shown per task (each attack and seed has one)."""


# --------------------------------------------------------------------------------------
# Example images
# --------------------------------------------------------------------------------------


def _png(arr: Any) -> str:
    """A float image in [0, 1], channels first, as a PNG data URI."""
    import numpy as np
    from PIL import Image

    a = np.clip(np.asarray(arr, dtype=np.float32), 0, 1)
    a = (a * 255 + 0.5).astype(np.uint8)
    a = a[0] if a.shape[0] == 1 else np.transpose(a[:3], (1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return data_uri(buf.getvalue(), "image/png")


def _class(classes: list[str], i: Any) -> str:
    try:
        return class_name(classes, int(i))
    except (TypeError, ValueError, IndexError):
        return str(i)


def _per_class(classes: list[str], counts: list[int]) -> str:
    """'no_tumor 73, meningioma_tumor 109' from a client's images per class."""
    return ", ".join(f"{_class(classes, i)} {n}" for i, n in enumerate(counts))


def example_html(ex: dict[str, Any], classes: list[str], caption: str) -> str:
    x = ex["x"].float().cpu().numpy()
    x_adv = ex["x_adv"].float().cpu().numpy()
    delta = x_adv - x
    linf = float(abs(delta).max()) if delta.size else 0.0
    # mid-grey is no change; the largest change reaches black or white
    shown = 0.5 + delta / (2 * linf) if linf > 0 else 0 * delta + 0.5
    gain = 1 / (2 * linf) if linf > 0 else math.nan
    true = _class(classes, ex.get("label"))
    cells = [
        (_png(x), f"clean: {_class(classes, ex.get('pred_clean'))}"),
        (_png(x_adv), f"adversarial: {_class(classes, ex.get('pred_adv'))}"),
        (_png(shown), f"perturbation x{gain:.3g}" if linf > 0 else "no perturbation"),
    ]
    imgs = "".join(
        f'<div><img src="{src}" alt="{e(cap)}"><span>{e(cap)}</span></div>' for src, cap in cells
    )
    return (
        f'<div class="example"><div><b>{e(caption)}</b></div>'
        f"<div>true {e(true)}, adversary client {e(ex.get('adversary', '?'))}, "
        f"L-inf {linf:.4f}</div>"
        f'<div class="row">{imgs}</div></div>'
    )


def examples_html(run_dir: Path, name: str, task: dict[str, Any]) -> str:
    """One clean and adversarial image per attack and seed (examples/<task>/), with the
    perturbation amplified to the full grey range (its gain written below it)."""
    from testbed.rundir import safe_name

    folder = run_dir / "examples" / safe_name(name)
    if not folder.is_dir():
        return ""
    import torch

    classes = task.get("dataset", {}).get("classes", [])
    out = []
    for r in task["repeats"]:
        for label in r["attacks"]:
            path = folder / f"seed{r['seed']}_{safe_name(label)}.pt"
            if len(out) >= MAX_EXAMPLES or not path.is_file():
                continue
            try:
                ex = torch.load(path, weights_only=True)
                out.append(example_html(ex, classes, f"{label}, seed {r['seed']}"))
            except Exception:  # a damaged example must not stop the report
                continue
    return f'<div class="examples">{"".join(out)}</div>' if out else ""


# --------------------------------------------------------------------------------------
# Generic tables: metrics that no table of the report shows
# --------------------------------------------------------------------------------------

KNOWN_ATTACK_KEYS = {
    "aasr", "aasr_benign", "aasr_own", "access", "adaptive_to", "adversaries", "aetr",
    "aetr_pairs", "asr", "asr_crafting", "attack", "budget", "cost_s", "crafted_on",
    "direction", "etr", "healthy_class", "linf_max", "notes", "params", "per_image",
    "perceptibility", "samples", "sweep_of", "sweep_point", "target", "targeted", "tsr",
}  # fmt: skip
"""Keys of an attack's per-seed record that the report's tables already show (or that
are per-image data); any other key gets a generic table."""
KNOWN_REPEAT_KEYS = {
    "seed", "cache", "clients", "acc", "acc_mean", "acc_balanced", "acc_balanced_mean",
    "attacks", "robustness", "privacy", "events", "rounds", "timing", "poisoning", "server",
    "outsider",
}  # fmt: skip
KNOWN_SUMMARY_ATTACK_KEYS = {"aasr", "aasr_benign", "aasr_own", "aetr", "aasr_true", "cost_s"}
KNOWN_SUMMARY_KEYS = {
    "acc_mean", "acc_balanced_mean", "attacks", "epsilon", "events", "round_s", "poisoning",
    "robust_acc", "sanity_flags",
}  # fmt: skip


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _is_stat(v: Any) -> bool:
    return isinstance(v, dict) and "mean" in v and set(v) <= {"mean", "std", "n", "min", "max"}


def flatten(obj: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """(dotted path, shown value) for every scalar leaf; a mean/std record is one value,
    a short list of scalars one value, anything larger is counted, not shown."""
    if _is_stat(obj):  # plain numbers: a rank correlation in [0, 1] is no percentage
        return [(prefix, _stat_num(obj))]
    if isinstance(obj, dict):
        if depth > 6:
            return [(prefix, f"{{{len(obj)} keys}}")]
        out = []
        for k, v in obj.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)
        return out
    if isinstance(obj, list):
        if len(obj) <= 8 and all(not isinstance(v, dict | list) for v in obj):
            return [(prefix, "[" + ", ".join(_fmt(v) for v in obj) + "]")]
        return [(prefix, f"[{len(obj)} values]")]
    return [(prefix, _fmt(obj))]


def _stat_num(stat: dict[str, Any]) -> str:
    m, s = _num(stat.get("mean")), _num(stat.get("std"))
    if math.isnan(m):
        return "n/a"
    return f"{m:.4g}" + (f" ± {s:.3g}" if stat.get("n", 1) > 1 and not math.isnan(s) else "")


def generic_tables(title: str, task: dict[str, Any]) -> list[TableData]:
    """Tables of what the report does not show yet: per attack, every unknown key of its
    per-seed record (one column per seed) and of its summary over seeds; per seed, every
    unknown key of the repeat's record."""
    repeats = task["repeats"]
    seeds = [str(r["seed"]) for r in repeats]
    out = []
    seed_cols = [f"seed {s}" for s in seeds]
    labels = list(dict.fromkeys(lab for r in repeats for lab in r["attacks"]))

    def own_table(values: list[Any]) -> bool:
        """A block (a dict that is no mean/std record) gets a table of its own; plain
        values share one table."""
        return any(isinstance(v, dict) and not _is_stat(v) for v in values)

    # per attack and seed
    extra = sorted(
        {k for r in repeats for a in r["attacks"].values() for k in a} - KNOWN_ATTACK_KEYS
    )
    shared = TableData(
        f"{title}: other per-attack metrics, per seed", ["attack", "metric", *seed_cols]
    )
    for key in extra:
        values = [r["attacks"].get(lab, {}).get(key) for r in repeats for lab in labels]
        t = (
            TableData(f"{title}: {key} per attack and seed", shared.headers)
            if own_table(values)
            else shared
        )
        for label in labels:
            if all(key not in r["attacks"].get(label, {}) for r in repeats):
                continue
            per_seed = [dict(flatten(r["attacks"].get(label, {}).get(key), key)) for r in repeats]
            for p in dict.fromkeys(p for d in per_seed for p in d):
                t.rows.append([label, p, *[d.get(p, "-") for d in per_seed]])
        if t is not shared:
            out.append(t)
    # per attack, over seeds
    summ = task.get("summary", {})
    summ_attacks = summ.get("attacks", {})
    extra = sorted({k for a in summ_attacks.values() for k in a} - KNOWN_SUMMARY_ATTACK_KEYS)
    shared_summ = TableData(
        f"{title}: other per-attack metrics, over seeds", ["attack", "metric", "value"]
    )
    for key in extra:
        values = [a.get(key) for a in summ_attacks.values()]
        t = (
            TableData(f"{title}: {key} per attack, over seeds", shared_summ.headers)
            if (own_table(values))
            else shared_summ
        )
        for label, a in summ_attacks.items():
            if key in a:
                t.rows += [[label, p, v] for p, v in flatten(a[key], key)]
        if t is not shared_summ:
            out.append(t)
    # the task's summary and each seed's record
    shared_task = TableData(f"{title}: other metrics, over seeds", ["metric", "value"])
    for key in sorted(set(summ) - KNOWN_SUMMARY_KEYS):
        t = (
            TableData(f"{title}: {key}, over seeds", shared_task.headers)
            if own_table([summ[key]])
            else shared_task
        )
        t.rows += [[p, v] for p, v in flatten(summ[key], key)]
        if t is not shared_task:
            out.append(t)
    shared_rep = TableData(f"{title}: other metrics per seed", ["metric", *seed_cols])
    for key in sorted({k for r in repeats for k in r} - KNOWN_REPEAT_KEYS):
        values = [r.get(key) for r in repeats]
        t = (
            TableData(f"{title}: {key} per seed", shared_rep.headers)
            if own_table(values)
            else shared_rep
        )
        per_seed = [dict(flatten(v, key)) for v in values]
        for p in dict.fromkeys(p for d in per_seed for p in d):
            t.rows.append([p, *[d.get(p, "-") for d in per_seed]])
        if t is not shared_rep:
            out.append(t)
    out += [t for t in (shared, shared_summ, shared_task, shared_rep) if t.rows]
    for t in out:
        t.notes.append("generic view of metrics.json (4 significant digits)")
        if len(t.rows) > MAX_GENERIC_ROWS:
            t.notes.append(f"{len(t.rows) - MAX_GENERIC_ROWS} more rows in metrics.json")
            del t.rows[MAX_GENERIC_ROWS:]
    return out


def clients_table(title: str, task: dict[str, Any]) -> TableData:
    classes = task.get("dataset", {}).get("classes", [])
    t = TableData(
        f"{title}: clients per seed",
        [
            "seed",
            "client",
            "train images",
            "test images",
            "train images per class",
            "clean ACC",
            "class floor",
            "balanced ACC",
        ],
    )
    for r in task["repeats"]:
        for c in r.get("clients", []):
            per_class = _per_class(classes, c.get("train_label_counts") or [])
            acc = r["acc"].get(str(c["id"]))
            test, floor = str(c["test"]), "n/a"
            if (tc := c.get("test_label_counts")) and sum(tc):  # the floor ACC is read against
                test += f" ({_per_class(classes, tc)})"
                floor = pct(class_floor(tc)) + (
                    " (ACC at or under it)" if at_class_floor(_num(acc), tc) else ""
                )
            t.rows.append(
                [str(r["seed"]), str(c["id"]), str(c["train"]), test, per_class, pct(acc),
                 floor, pct(r.get("acc_balanced", {}).get(str(c["id"])))]
            )  # fmt: skip
    return t


def rounds_table(title: str, task: dict[str, Any]) -> TableData:
    """Every round of every seed: its scalar fields, per-client dicts as their mean."""
    t = TableData(f"{title}: rounds", [])
    rows: list[dict[str, str]] = []
    for r in task["repeats"]:
        times = r.get("timing", {}).get("round_s") or []
        for i, rec in enumerate(r.get("rounds", [])):
            row = {"seed": str(r["seed"]), "round": str(rec.get("round", i + 1))}
            if i < len(times):
                row["seconds"] = f"{_num(times[i]):.3f}"
            for k, v in rec.items():
                if k == "round":
                    continue
                if k == "events":
                    row["events"] = str(len(v))
                elif (
                    isinstance(v, dict)
                    and v
                    and all(isinstance(x, int | float) or x is None for x in v.values())
                    and all(str(c).isdigit() for c in v)
                ):
                    vals = [_num(x) for x in v.values()]
                    vals = [x for x in vals if not math.isnan(x)]
                    row[f"{k} (client mean)"] = _fmt(sum(vals) / len(vals)) if vals else "n/a"
                else:
                    row.update({p or k: s for p, s in flatten(v, k)})
            rows.append(row)
    t.headers = list(dict.fromkeys(h for row in rows for h in row))
    t.rows = [[row.get(h, "-") for h in t.headers] for row in rows[:MAX_GENERIC_ROWS]]
    if len(rows) > MAX_GENERIC_ROWS:
        t.notes.append(f"{len(rows) - MAX_GENERIC_ROWS} more rounds in metrics.json")
    return t


def events_table(title: str, task: dict[str, Any]) -> TableData | None:
    """Every server event (report.md shows the first 20)."""
    events = [(r["seed"], ev) for r in task["repeats"] for ev in r.get("events", [])]
    if len(events) <= 20:
        return None
    t = TableData(
        f"{title}: all {len(events)} events",
        ["seed", "round", "client", "kind", "action", "detail"],
    )
    for seed, ev in events[:MAX_GENERIC_ROWS]:
        t.rows.append([str(seed), *[_fmt(ev.get(k)) for k in ("round", "client", "kind",
                                                               "action", "detail")]])  # fmt: skip
    return t


# --------------------------------------------------------------------------------------
# At a glance
# --------------------------------------------------------------------------------------


def glance_html(metrics: dict[str, Any]) -> str:
    """Key numbers per task: clean and robust accuracy, each attack's AASR, epsilon."""
    out = []
    for name, task in metrics["tasks"].items():
        summ = task["summary"]
        cards = [("clean ACC", _stat_pct(summ.get("acc_mean")), "acc")]
        if summ.get("robust_acc"):
            cards.append(("robust ACC", _stat_pct(summ["robust_acc"]), "robust-acc"))
        for label, a in summ.get("attacks", {}).items():
            cards.append((f"AASR {label}", _stat_pct(a.get("aasr")), "aasr"))
        eps = summ.get("epsilon")
        if eps:
            cards.append(("DP epsilon", _stat_num(eps), "epsilon"))
        html_cards = "".join(
            f'<div class="card" data-metric="{kind}"><div class="v">{e(v)}</div>'
            f'<div class="k">{e(k)}</div></div>'
            for k, v, kind in cards
        )
        n = len(task["repeats"])
        out.append(
            f"<h3>{e(name)} ({e(task.get('dataset', {}).get('name', ''))}, "
            f"{n} seed{'s' if n != 1 else ''}, mean ± std)</h3>"
            f'<div class="glance">{html_cards}</div>'
        )
    return "".join(out)
