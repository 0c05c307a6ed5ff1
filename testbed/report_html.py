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

import json
from pathlib import Path
from typing import Any

from testbed.html_page import (
    Page,
    e,
    figure_html,
    figures_html,
    table_html,
    tables_html,
    write_atomic,
)
from testbed.report import TableData, hosts_note, run_tables, time_phrase
from testbed.report_html_sections import (
    clients_table,
    events_table,
    examples_html,
    flatten,
    generic_tables,
    glance_html,
    rounds_table,
)

MAX_RAW_JSON = 1_000_000
"""metrics.json is embedded verbatim (collapsed) up to this many characters."""


# --------------------------------------------------------------------------------------
# The run's page
# --------------------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def run_page(run_dir: Path, metrics: dict[str, Any]) -> str:
    from testbed.rundir import final_dir_of  # a run writes it in its partial folder

    hw = metrics.get("hardware", {})
    subtitle = (
        f"testbed {metrics.get('testbed_version', '?')}, seeds {metrics.get('seeds')}, "
        f"{hw.get('gpu', hw.get('device', '?'))}, torch {hw.get('torch', '?')}, "
        f"{time_phrase(metrics)}; folder {final_dir_of(run_dir.resolve()).name}"
    )
    if note := hosts_note(metrics):
        subtitle += f"; {note}"
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
        [compare.SORT_NOTE + " (click a header to sort by it)", *compare.notes(rows)],
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
