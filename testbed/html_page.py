"""The generic building blocks of report.html: a self-contained, script-sortable page.

Style sheet, table-sorting script and Content-Security-Policy; the escaping helper; a
``Page`` of sections with a table of contents; sortable tables; figures inlined as
base64 data URIs; the atomic file write. Nothing here knows what a run or a comparison
holds: that lives in report_html.py and report_html_sections.py, so the page's look and
safety (escaping, no network access) are defined in one place for both.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Any

from testbed.report import TableData

IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".svg": "image/svg+xml",
}

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


def write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
