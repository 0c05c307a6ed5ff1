"""report.html: one self-contained page per run and per comparison.

Everything is inline: figures and example images as base64 data URIs, the style sheet and
a few lines of script that sort a table when its header is clicked. A Content-Security-
Policy forbids the page any network access. Built from metrics.json and the run folder
alone (`testbed report RUN_DIR` writes it for old runs): every table of report.md, every
metric that no table shows (rendered generically, so new metrics appear without a change
here), every figure the folder holds, the example images, the per-round records and the
resolved scenario. Every string is escaped: scenario names and plugin strings are user
input.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Any

from testbed.report import TableData, _num, _stat_pct, pct, run_tables

IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".svg": "image/svg+xml",
}
MAX_RAW_JSON = 1_000_000
"""metrics.json is embedded verbatim (collapsed) up to this many characters."""
MAX_GENERIC_ROWS = 500
MAX_EXAMPLES = 60
"""Example images shown per task (each attack and seed has one)."""

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;
background:#f6f7f9}
header{background:#1f3a5f;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.85}
nav{padding:8px 24px;background:#e8edf3;font-size:13px}
nav a{margin-right:14px;color:#1f3a5f}
main{padding:8px 24px 40px}
h2{margin:26px 0 8px;font-size:18px;border-bottom:2px solid #1f3a5f;padding-bottom:3px}
h3{margin:18px 0 6px;font-size:15px}
table{border-collapse:collapse;background:#fff;margin:4px 0 2px;font-size:13px}
th,td{border:1px solid #d4d9e1;padding:3px 8px;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
th{background:#eef1f5;cursor:pointer;user-select:none}
th:hover{background:#dde4ee}
th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}
tbody tr:nth-child(even){background:#fafbfc}
.wrap{overflow-x:auto;max-width:100%}
.notes{margin:2px 0 10px;font-size:12px;color:#4a5263}
.notes li{margin:0}
.glance{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0}
.card{background:#fff;border:1px solid #d4d9e1;border-radius:6px;padding:8px 12px;min-width:130px}
.card .v{font-size:20px;font-weight:600;color:#1f3a5f}
.card .k{font-size:12px;color:#4a5263}
.figs{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;background:#fff;border:1px solid #d4d9e1;border-radius:6px;padding:6px;
max-width:100%}
figure img{max-width:100%;max-height:440px;width:auto;height:auto;display:block}
.wide figure img{max-height:none}
figcaption{font-size:12px;color:#4a5263;margin-top:4px;word-break:break-all}
.examples{display:flex;flex-wrap:wrap;gap:10px}
.example{background:#fff;border:1px solid #d4d9e1;border-radius:6px;padding:6px;font-size:12px}
.example .row{display:flex;gap:6px}
.example .row div{text-align:center}
.example img{width:96px;height:96px;image-rendering:pixelated;display:block}
pre{background:#fff;border:1px solid #d4d9e1;padding:8px;overflow:auto;max-height:520px;
font-size:12px}
details{margin:6px 0}
summary{cursor:pointer;font-weight:600}
"""

# Sorting: numbers (a cell's leading number, so "93.33% ± 1.20", "(4.2, 1e-05)" and
# "0.012 s" sort by value) before text, text in natural order ("client 10" after
# "client 9"); cells without a number ("n/a", "-") stay last either way.
JS = """
(function () {
  function key(cell) {
    var t = (cell.getAttribute('data-sort') || cell.textContent).trim();
    var m = t.match(/^[(x~+\\s]*(-?\\d+(?:\\.\\d+)?(?:e[-+]?\\d+)?)/i);
    return {n: m ? parseFloat(m[1]) : null, t: t};
  }
  function sortBy(table, th, col) {
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    Array.prototype.forEach.call(th.parentNode.cells, function (c) {
      c.removeAttribute('aria-sort');
    });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col] || a.cells[0]), y = key(b.cells[col] || b.cells[0]);
      if (x.n !== null && y.n === null) return -1;
      if (x.n === null && y.n !== null) return 1;
      var r = x.n !== null ? x.n - y.n : x.t.localeCompare(y.t, undefined, {numeric: true});
      return asc ? r : -r;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    if (!table.tHead) return;
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.tabIndex = 0;
      th.title = 'sort by this column';
      th.addEventListener('click', function () { sortBy(table, th, col); });
      th.addEventListener('keydown', function (e) {
        if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); sortBy(table, th, col); }
      });
    });
  });
})();
"""

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)


def e(value: Any) -> str:
    """Escaped text of any value (quotes too: it may stand in an attribute)."""
    return escape(str(value), quote=True)


class Page:
    """Sections of a page, with a table of contents; ids never come from user strings."""

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title, self.subtitle = title, subtitle
        self.sections: list[tuple[str, str, str]] = []
        self._ids = 0

    def new_id(self, prefix: str = "t") -> str:
        self._ids += 1
        return f"{prefix}{self._ids}"

    def section(self, heading: str, body: str) -> None:
        if body:
            self.sections.append((self.new_id("s"), heading, body))

    def render(self) -> str:
        nav = "".join(f'<a href="#{sid}">{e(h)}</a>' for sid, h, _ in self.sections)
        body = "".join(f'<section id="{sid}"><h2>{e(h)}</h2>{b}</section>'
                       for sid, h, b in self.sections)  # fmt: skip
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<link rel="icon" href="data:,">'
            f"<title>{e(self.title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{e(self.title)}</h1><p>{e(self.subtitle)}</p></header>"
            f"<nav>{nav}</nav><main>{body}</main>"
            f"<script>{JS}</script></body></html>\n"
        )


def table_html(t: TableData, table_id: str, level: int = 3) -> str:
    """A sortable table with its title and notes."""
    head = "".join(f'<th scope="col">{e(h)}</th>' for h in t.headers)
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    notes = "".join(f"<li>{e(n)}</li>" for n in t.notes)
    return (
        f'<h{level} id="{table_id}">{e(t.title)}</h{level}>'
        f'<div class="wrap"><table class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{rows}</tbody></table></div>"
        + (f'<ul class="notes">{notes}</ul>' if notes else "")
    )


def tables_html(page: Page, tables: Iterable[TableData], level: int = 3) -> str:
    return "".join(table_html(t, page.new_id(), level) for t in tables)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def figure_html(path: Path, caption: str) -> str:
    mime = IMAGE_TYPES[path.suffix.lower()]
    src = data_uri(path.read_bytes(), mime)
    return (
        f'<figure><img src="{src}" alt="{e(caption)}">'
        f"<figcaption>{e(caption)}</figcaption></figure>"
    )


def figure_files(root: Path, listed: Iterable[str] = ()) -> list[Path]:
    """Every image under ``root`` (not in hidden folders or checkpoints): those the metrics
    list first, in their order, then the rest by path."""
    found = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_TYPES
        and p.is_file()
        and not any(part.startswith(".") or part == "checkpoint"
                    for part in p.relative_to(root).parts)
    )  # fmt: skip
    first = [root / p for p in listed if (root / p) in set(found)]
    return first + [p for p in found if p not in set(first)]


def figures_html(root: Path, listed: Iterable[str] = ()) -> str:
    """Figures grouped by folder."""
    groups: dict[str, list[str]] = {}
    for p in figure_files(root, listed):
        rel = p.relative_to(root).as_posix()
        folder = p.parent.relative_to(root).as_posix()
        try:
            groups.setdefault(folder, []).append(figure_html(p, rel))
        except OSError:
            continue  # unreadable: the page goes on without it
    return "".join(
        (f"<h3>{e(folder)}/</h3>" if folder != "." else "")
        + f'<div class="figs">{"".join(figs)}</div>'
        for folder, figs in groups.items()
    )


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
        return str(classes[int(i)])
    except (TypeError, ValueError, IndexError):
        return str(i)


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
    "seed", "cache", "clients", "acc", "acc_mean", "attacks", "robustness", "privacy",
    "events", "rounds", "timing", "poisoning", "server", "outsider",
}  # fmt: skip
KNOWN_SUMMARY_ATTACK_KEYS = {"aasr", "aasr_benign", "aasr_own", "aetr", "aasr_true", "cost_s"}
KNOWN_SUMMARY_KEYS = {
    "acc_mean", "attacks", "epsilon", "events", "round_s", "poisoning", "robust_acc",
    "sanity_flags",
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
        ["seed", "client", "train images", "test images", "train images per class", "clean ACC"],
    )
    for r in task["repeats"]:
        for c in r.get("clients", []):
            counts = c.get("train_label_counts") or []
            per_class = ", ".join(f"{_class(classes, i)} {n}" for i, n in enumerate(counts))
            t.rows.append(
                [str(r["seed"]), str(c["id"]), str(c["train"]), str(c["test"]), per_class,
                 pct(r["acc"].get(str(c["id"])))]
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
        f"{title}: all {len(events)} server events",
        ["seed", "round", "client", "kind", "action", "detail"],
    )
    for seed, ev in events[:MAX_GENERIC_ROWS]:
        t.rows.append([str(seed), *[_fmt(ev.get(k)) for k in ("round", "client", "kind",
                                                               "action", "detail")]])  # fmt: skip
    return t


# --------------------------------------------------------------------------------------
# The run's page
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


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def run_page(run_dir: Path, metrics: dict[str, Any]) -> str:
    from testbed.rundir import final_dir_of  # a run writes it in its partial folder

    hw = metrics.get("hardware", {})
    total = _num(metrics.get("timing", {}).get("total_s"))
    subtitle = (
        f"testbed {metrics.get('testbed_version', '?')}, seeds {metrics.get('seeds')}, "
        f"{hw.get('gpu', hw.get('device', '?'))}, torch {hw.get('torch', '?')}, "
        f"{total:.1f} s in total; folder {final_dir_of(run_dir.resolve()).name}"
    )
    page = Page(f"testbed report: {metrics['scenario']}", subtitle)
    page.section("At a glance", glance_html(metrics))
    tables = run_tables(metrics)
    page.section("Tables", tables_html(page, tables))
    extra = []
    for name, task in metrics["tasks"].items():
        title = f"{metrics['scenario']}/{name}"
        more = [clients_table(title, task)]
        if (ev := events_table(title, task)) is not None:
            more.append(ev)
        more += generic_tables(title, task)
        rounds = rounds_table(title, task)
        extra.append(tables_html(page, more))
        extra.append(
            f"<details><summary>{e(title)}: per-round records ({len(rounds.rows)} rows)"
            f"</summary>{tables_html(page, [rounds], 4)}</details>"
        )
    page.section("Clients, rounds and other metrics", "".join(extra))
    examples = "".join(
        f"<h3>{e(name)}</h3>{ex}"
        for name, task in metrics["tasks"].items()
        if (ex := examples_html(run_dir, name, task))
    )
    page.section("Example images", examples)
    page.section("Figures", figures_html(run_dir, metrics.get("plots", [])))
    scenario = _read(run_dir / "scenario.json")
    if scenario is not None:
        page.section("Resolved scenario (scenario.json)", f"<pre>{e(scenario)}</pre>")
    details = [
        "<table class='sortable'><thead><tr><th>key</th><th>value</th></tr></thead><tbody>"
        + "".join(
            f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>"
            for k, v in flatten({"hardware": hw, "engine": metrics.get("engine", {}),
                                 "timing": metrics.get("timing", {})})
        )
        + "</tbody></table>"
    ]  # fmt: skip
    raw = json.dumps(metrics, indent=1)
    if len(raw) <= MAX_RAW_JSON:
        details.append(f"<details><summary>metrics.json</summary><pre>{e(raw)}</pre></details>")
    else:
        details.append(f"<p>metrics.json ({len(raw):,} characters) is beside this file.</p>")
    page.section("Run details", "".join(details))
    return page.render()


def write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_run_html(run_dir: Path, metrics: dict[str, Any]) -> Path:
    return write_atomic(run_dir / "report.html", run_page(run_dir, metrics))


# --------------------------------------------------------------------------------------
# The comparison's page
# --------------------------------------------------------------------------------------


def compare_page(
    out: Path,
    labels: list[str],
    rows: list[dict[str, Any]],
    results: dict[str, dict[str, Any]],
    figures: list[str],
) -> str:
    from testbed import compare

    page = Page(
        f"testbed comparison: {len(rows)} configurations",
        f"{', '.join(results)}; folder {out.resolve().name}",
    )
    poisoned = compare._poisoned(rows)
    t = TableData(
        "Defence comparison, mean ± std over seeds",
        compare.headers(labels, poisoned),
        [compare._cells(r, labels, poisoned) for r in compare.sorted_rows(rows)],
        [compare.SORT_NOTE + " (click a header to sort by it)", *compare.pareto_notes(rows)],
    )
    page.section("Comparison", table_html(t, page.new_id()))
    figs = "".join(figure_html(out / name, name) for name in figures if (out / name).is_file())
    page.section("Trade-offs and figures", f'<div class="figs wide">{figs}</div>' if figs else "")
    runs = []
    for name, metrics in results.items():
        link = f"{name}/report.html"
        body = tables_html(page, run_tables(metrics), 4)
        runs.append(
            f"<details><summary>{e(name)}</summary>"
            f'<p>Its own report, with figures and examples: <a href="{e(link)}">{e(link)}</a>'
            f"</p>{body}</details>"
        )
    page.section("Configurations", "".join(runs))
    return page.render()


def write_compare_html(
    out: Path,
    labels: list[str],
    rows: list[dict[str, Any]],
    results: dict[str, dict[str, Any]],
    figures: list[str],
) -> Path:
    return write_atomic(out / "report.html", compare_page(out, labels, rows, results, figures))
