"""The sensitivity study's table from the run folders of scripts/reproduce_paper.sh step 3,
beside the paper's meningioma figures (SPEC.md, Tables I/II), and which setting and ASR
variant come within 10 points of all four of them.

    python docs/results/sensitivity-meningioma-cpu2/table.py OUT

OUT is the script's output folder (one run folder per setting) or a folder of the runs'
metrics.json saved as <setting>.json, as next to this file. A setting run with several
seeds also gets a row of means with their 95% confidence intervals (Student's t, computed
here from the seeds' values, as runs from before `ci95` existed have none).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from testbed.metrics import mean_std

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


def _ci(values: list[float]) -> str:
    st = mean_std(values)
    return f"{st['mean']:.1f} [{st['mean'] - st['ci95']:.1f}, {st['mean'] + st['ci95']:.1f}]"


def _mean_row(name: str, repeats: list[dict]) -> list[str]:
    """Means over seeds with 95% CIs, in percent, for the columns the paper reports."""

    def col(label: str, key: str) -> list[float]:
        return [100 * r["attacks"][label][key] for r in repeats]

    dist = mean_std([r["client_models"]["distance_mean"] for r in repeats])["mean"]
    return [
        f"{name}, mean [95% CI] of {len(repeats)} seeds",
        _ci([100 * r["acc_mean"] for r in repeats]),
        f"{dist:.2f}",
        *[
            f"{_ci(col(a, 'aasr'))} / {_ci(col(a, 'aasr_true'))}"
            for a in ("FGSM", "BIM-20", "PGD-20", "PGD-40")
        ],
        _ci(col("FGSM", "aetr")),
        _ci(col("PGD-20", "aetr")),
    ]


def _inside(vals: dict[str, list[float]]) -> str | None:
    """Which of the paper's figures lie inside our 95% CI (None: one seed, no interval)."""
    if len(next(iter(vals.values()))) < 2:
        return None
    hits = []
    for k, v in vals.items():
        st = mean_std(v)
        if st["mean"] - st["ci95"] <= PAPER[k] <= st["mean"] + st["ci95"]:
            hits.append(k)
    return f"{len(hits)} of 4 ({', '.join(hits) or 'none'})"


def _order(name: str) -> tuple[bool, str, float, bool]:
    """z-0.002-eps-normalised -> (False, "z", 0.002, True): the study's order."""
    kind, _, rest = name.partition("-")
    value, _, tail = rest.partition("-")
    return kind != "z", kind, float(value), bool(tail)


def _records(out: Path) -> list[tuple[str, Path]]:
    runs = [(p.parent.name, p) for p in out.glob("*/metrics.json")]
    runs += [(p.stem, p) for p in out.glob("*.json")]
    runs = [r for r in runs if r[0].startswith(("z-", "chunks-"))]  # not other runs in OUT
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
        rows = [_row(f"{name} (seed {rep['seed']})", rep) for rep in task["repeats"]]
        for cells, _ in rows:
            print("| " + " | ".join(cells) + " |")
        seeds = "seed " + ", ".join(str(r["seed"]) for r in task["repeats"])
        if len(rows) > 1:
            print("| " + " | ".join(_mean_row(name, task["repeats"])) + " |")
            seeds = f"mean of seeds {seeds[5:]}"
        for variant in ("pred", "true"):
            vals = {k: [ours[variant][k] for _, ours in rows] for k in PAPER}
            diffs = [abs(sum(v) / len(v) - PAPER[k]) for k, v in vals.items()]
            if not any(math.isnan(d) for d in diffs):  # runs older than the variant
                gaps.append((max(diffs), f"{name} {seeds}, ASR {variant}", _inside(vals)))
    paper = ["paper (Tables I/II)", "84.1", "-", "- / -", "- / -", "27.5 (AASR)", "33.0 (AASR)"]
    print("| " + " | ".join([*paper, "84.8", "83.7"]) + " |")
    print()
    print("Largest gap to the paper's four meningioma figures, in points:")
    print()
    for gap, where, inside in sorted(gaps):
        ci = f"; paper inside the 95% CI for {inside}" if inside is not None else ""
        print(f"- {gap:5.1f}  {where}{'  (within 10)' if gap <= 10 else ''}{ci}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
