"""The Markdown table of benchmarks/test_strong_attack_cost.py's --benchmark-json files:
each attack's seconds per batch, its ratio to PGD-20 in the same run, its predict and
backward images per image, and the cost extrapolated to ART's default budget.

    python benchmarks/strong_attack_table.py docs/results/bench-strong-attacks-cpu2.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"


def per_unit(s: float | None, unit: str) -> str:
    return "-" if s is None else f"{_fmt(s)} s / {unit}"


def table(path: Path) -> str:
    """The Markdown table of one --benchmark-json file of this module."""
    data = json.loads(path.read_text())
    rows = [b for b in data["benchmarks"] if "strong_attack" in b.get("extra_info", {})]
    pgd = [
        e["s_per_batch"] for e in (b["extra_info"] for b in rows) if e["registry_attack"] == "pgd"
    ]
    ref = statistics.mean(pgd) if pgd else None
    lines = [
        f"Source: `{path}` ({data.get('datetime', '?')}); PGD-20 reference: mean of "
        f"{len(pgd)} runs, {_fmt(ref)} s ({', '.join(_fmt(p) for p in pgd)})",
        "",
        "| attack | budget | s / batch | x PGD-20 | predict images / image | "
        "backward passes / image | fooled | per unit | at default |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in rows:
        e = b["extra_info"]
        lines.append(
            f"| {e['strong_attack']} | {e['budget']} | {_fmt(e['s_per_batch'])} | "
            f"{_fmt(e['s_per_batch'] / ref if ref else None)} | "
            f"{_fmt(e['predict_images_per_image'])} | {_fmt(e['backward_images_per_image'])} | "
            f"{e['fooled']:.2f} | {per_unit(e['s_per_unit'], e['unit'])} | "
            f"{_fmt(e['s_at_default'])} |"
        )
        for m in e.get("members") or []:
            at_default = m["s_per_unit"] * m["default_units"] if m.get("default_units") else None
            lines.append(
                f"| - {m['member']} | {m['images']} images | {_fmt(m['s'])} | "
                f"{_fmt(m['s'] / ref if ref else None)} | "
                f"{_fmt(m['predict_images'] / max(m['images'], 1))} | "
                f"{_fmt(m['backward_images'] / max(m['images'], 1))} | - | "
                f"{per_unit(m['s_per_unit'], m.get('unit', '?'))} | "
                f"{_fmt(at_default)} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(table(Path(arg)), end="")
