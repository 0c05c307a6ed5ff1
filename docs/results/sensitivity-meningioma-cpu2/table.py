"""The sensitivity study's table from the run folders of scripts/reproduce_paper.sh step 3,
beside the paper's meningioma figures (SPEC.md, Tables I/II), and which setting and ASR
variant come within 10 points of all four of them.

    python docs/results/sensitivity-meningioma-cpu2/table.py OUT

OUT is the script's output folder (one run folder per setting) or a folder of the runs'
metrics.json saved as <setting>.json, as next to this file.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

# Darzi et al., meningioma: Table I (AASR PGD-20, PGD-40) and Table II (AETR FGSM, PGD)
PAPER = {"PGD-20 AASR": 27.52, "PGD-40 AASR": 32.99, "FGSM AETR": 84.80, "PGD-20 AETR": 83.73}


def _pct(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def _row(name: str, rep: dict) -> tuple[list[str], dict[str, dict[str, float]]]:
    att = rep["attacks"]
    spread = rep.get("client_models") or {}
    cells = [
        name,
        _pct(rep["acc_mean"]),
        f"{spread.get('distance_mean', math.nan):.2f} / {spread.get('norm_mean', math.nan):.0f}",
    ]
    for label in ("FGSM", "BIM-20", "PGD-20", "PGD-40"):
        a = att.get(label, {})
        cells.append(f"{_pct(a.get('aasr'))} / {_pct(a.get('aasr_true'))}")
    cells += [_pct(att["FGSM"]["aetr"]), _pct(att["PGD-20"]["aetr"])]
    ours = {
        variant: {
            "PGD-20 AASR": 100 * att["PGD-20"].get(key, math.nan),
            "PGD-40 AASR": 100 * att["PGD-40"].get(key, math.nan),
            "FGSM AETR": 100 * att["FGSM"]["aetr"],
            "PGD-20 AETR": 100 * att["PGD-20"]["aetr"],
        }
        for variant, key in (("pred", "aasr"), ("true", "aasr_true"))
    }
    return cells, ours


def _order(name: str) -> tuple[bool, str, float, bool]:
    """z-0.002-eps-normalised -> (False, "z", 0.002, True): the study's order."""
    kind, _, rest = name.partition("-")
    value, _, tail = rest.partition("-")
    return kind != "z", kind, float(value), bool(tail)


def _records(out: Path) -> list[tuple[str, Path]]:
    runs = [(p.parent.name, p) for p in out.glob("*/metrics.json")]
    runs += [(p.stem, p) for p in out.glob("*.json")]
    return sorted(runs, key=lambda r: _order(r[0]))


def main(out: Path) -> None:
    head = [
        "setting", "ACC", "client dist. / norm", "FGSM AASR pred / true",
        "BIM-20 AASR pred / true", "PGD-20 AASR pred / true", "PGD-40 AASR pred / true",
        "FGSM AETR", "PGD-20 AETR",
    ]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    gaps = []
    for name, metrics in _records(out):
        (task,) = json.loads(metrics.read_text())["tasks"].values()
        for rep in task["repeats"]:
            cells, ours = _row(f"{name} (seed {rep['seed']})", rep)
            print("| " + " | ".join(cells) + " |")
            for variant, vals in ours.items():
                diffs = [abs(vals[k] - PAPER[k]) for k in PAPER]
                if not any(math.isnan(d) for d in diffs):  # runs older than the variant
                    gap = max(diffs)
                    gaps.append((gap, f"{name} seed {rep['seed']}, ASR {variant}"))
    paper = ["paper (Tables I/II)", "84.1", "-", "- / -", "- / -", "27.5 (AASR)", "33.0 (AASR)"]
    print("| " + " | ".join([*paper, "84.8", "83.7"]) + " |")
    print()
    print("Largest gap to the paper's four meningioma figures, in points:")
    print()
    for gap, where in sorted(gaps):
        print(f"- {gap:5.1f}  {where}{'  (within 10)' if gap <= 10 else ''}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
