"""Runs pooled by task beside the paper's Tables I/II: every seed, and the mean with its 95%
CI (Student's t) over the seeds, from any number of runs (one seed each or several).

    python scripts/paper_table.py RUN_OR_JSON...

Each argument is a run folder (its metrics.json), a metrics.json saved under another name,
or a folder of those (scripts/reproduce_paper.sh step 4's OUT: closest-<task>-seed<n>/).
A figure a run did not record (an older metrics.json: ASR against the true label) is "-".
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from testbed.metrics import mean_std
from testbed.paper import TABLE_I, TABLE_II

# Tables I (ACC, AASR PGD-20 / PGD-40) and II (AETR FGSM / PGD), in percent
PAPER = {
    task: {"ACC": 100 * acc, "PGD-20 AASR": 100 * p20, "PGD-40 AASR": 100 * p40,
           "FGSM AETR": 100 * TABLE_II[task][0], "PGD-20 AETR": 100 * TABLE_II[task][1]}
    for task, (acc, p20, p40, _, _) in TABLE_I.items()
}  # fmt: skip
FIGURES = ["PGD-20 AASR", "PGD-40 AASR", "FGSM AETR", "PGD-20 AETR"]  # the ones compared


def _figures(rep: dict) -> dict[str, float | None]:
    att = rep["attacks"]

    def pct(attack: str, key: str) -> float | None:
        value = att[attack].get(key)
        return None if value is None else 100 * value

    return {
        "ACC": 100 * rep["acc_mean"],
        "PGD-20 AASR": pct("PGD-20", "aasr"),
        "PGD-20 AASR, true label": pct("PGD-20", "aasr_true"),
        "PGD-40 AASR": pct("PGD-40", "aasr"),
        "PGD-40 AASR, true label": pct("PGD-40", "aasr_true"),
        "FGSM AETR": pct("FGSM", "aetr"),
        "PGD-20 AETR": pct("PGD-20", "aetr"),
        "client distance": rep.get("client_models", {}).get("distance_mean"),
    }


def _metrics_files(args: list[str]) -> list[tuple[Path, bool]]:
    """(file, named on the command line): a folder's other JSON files are passed over."""
    files = []
    for arg in map(Path, args):
        if arg.is_file():
            files.append((arg, True))
        elif (arg / "metrics.json").is_file():
            files.append((arg / "metrics.json", True))
        else:
            found = sorted(arg.glob("*/metrics.json")) + sorted(arg.glob("*.json"))
            files += [(f, False) for f in found]
    return files


def collect(args: list[str]) -> dict[str, dict[int, dict[str, float | None]]]:
    """task -> seed -> figures; a seed seen twice must agree (it is the same run)."""
    by_task: dict[str, dict[int, dict[str, float | None]]] = {}
    for path, named in _metrics_files(args):
        doc = json.loads(path.read_text())
        if "tasks" not in doc:
            if named:
                raise SystemExit(f"{path}: not a run's metrics.json")
            continue
        for task, result in doc["tasks"].items():
            for rep in result["repeats"]:
                figs = _figures(rep)
                seen = by_task.setdefault(task, {}).setdefault(rep["seed"], figs)
                if seen != figs:
                    raise SystemExit(f"{path}: {task} seed {rep['seed']} differs from before")
    return by_task


def _cell(values: list[float | None]) -> str:
    if any(v is None for v in values):
        return "-"
    st = mean_std(values)
    if len(values) < 2:
        return f"{st['mean']:.1f}"
    return f"{st['mean']:.1f} [{st['mean'] - st['ci95']:.1f}, {st['mean'] + st['ci95']:.1f}]"


def main(args: list[str]) -> None:
    by_task = collect(args)
    for task in [t for t in ("meningioma", "glioma", "pathology") if t in by_task]:
        seeds = sorted(by_task[task])
        runs = [by_task[task][s] for s in seeds]
        print(f"\n{task}, seeds {', '.join(map(str, seeds))}\n")
        print("| | " + " / ".join(f"seed {s}" for s in seeds) + " | mean [95% CI] | paper |")
        print("|---|---|---|---|")
        for fig in runs[0]:
            values = [r[fig] for r in runs]
            paper = PAPER[task].get(fig.removesuffix(", true label"))
            each = " / ".join(
                "-" if v is None else f"{v:.3f}" if fig == "client distance" else f"{v:.1f}"
                for v in values
            )
            theirs = "-" if paper is None else f"{paper:.2f}"
            print(f"| {fig} | {each} | {_cell(values)} | {theirs} |")
        gaps, inside = [], []
        for fig in FIGURES:
            st = mean_std([r[fig] for r in runs])
            gaps.append((abs(st["mean"] - PAPER[task][fig]), fig))
            if len(runs) > 1 and abs(st["mean"] - PAPER[task][fig]) <= st["ci95"]:
                inside.append(fig)
        gap, fig = max(gaps)
        print(f"\nlargest gap of the four (ASR against the prediction): {gap:.1f} ({fig})")
        if len(runs) > 1:
            print(f"paper inside the 95% CI: {len(inside)} of 4 ({', '.join(inside) or 'none'})")
        if any(v is not None and math.isnan(v) for r in runs for v in r.values()):
            print("(a NaN figure: fewer than two images to count over)")


if __name__ == "__main__":
    main(sys.argv[1:])
