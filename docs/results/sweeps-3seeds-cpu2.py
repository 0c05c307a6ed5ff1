"""paper_sweeps over several seeds, one run per task and seed (RESULTS.md, "Meningioma over
three seeds", "Glioma over three seeds" and "Pathology over three seeds"). Per task: every
swept attack's mean and 95% CI over the seeds, each seed's label split and alpha optimum,
and Fig. 3's panels with a band of one standard deviation (drawn by testbed.plots, as
`testbed run` draws a run's repeats) in results/sweeps-TASK-3seeds-cpu2/, or in
results/NAME/ with --figures NAME (one task), or nowhere with --no-figures. Given several
tasks, it also prints their AASR side by side.

    python docs/results/sweeps-3seeds-cpu2.py docs/results/sweeps-TASK-cpu2 \
        docs/results/sweeps-TASK-seeds12-cpu2/seed{1,2} [--figures NAME]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from testbed.metrics import mean_std
from testbed.plots import sweep_figure, sweep_groups


def pooled(folders: list[Path]) -> dict[str, dict]:
    """Each task's result with all its runs' repeats, as one run with several seeds has it."""
    results: dict[str, dict] = {}
    for folder in folders:
        for task, result in json.loads((folder / "metrics.json").read_text())["tasks"].items():
            results.setdefault(task, {"repeats": []})["repeats"] += result["repeats"]
    return results


def cell(values: list[float]) -> str:
    st = mean_std([100 * v for v in values])
    if st["n"] < 2:
        return f"{st['mean']:.1f}"
    return f"{st['mean']:.1f} [{st['mean'] - st['ci95']:.1f}, {st['mean'] + st['ci95']:.1f}]"


def report(task: str, result: dict, figures: str | None = None, draw: bool = True) -> None:
    reps = result["repeats"]
    seeds = ", ".join(str(r["seed"]) for r in reps)
    print(f"{task}, seeds {seeds}: mean [95% CI, Student's t] over the seeds\n")
    heads = ("AASR", "AASR vs label", "AETR", "own - benign ASR, largest", "ASR own", "ASR benign")
    print("| attack | " + " | ".join(heads) + " |")
    print("|---" * (len(heads) + 1) + "|")
    print(f"| clean ACC | {cell([r['acc_mean'] for r in reps])} |" + " |" * (len(heads) - 1))
    for label in reps[0]["attacks"]:
        per = [r["attacks"][label] for r in reps]
        gap = max(abs(a["aasr_own"] - a["aasr_benign"]) for a in per)
        cols = [cell([a[k] for a in per]) for k in ("aasr", "aasr_true", "aetr")]
        own_benign = [cell([a[k] for a in per]) for k in ("aasr_own", "aasr_benign")]
        print("| " + " | ".join([label, *cols, f"{100 * gap:.1f}", *own_benign]) + " |")

    groups = sweep_groups(result)
    alphas = groups[("PGD-20", "eps_step")]
    best = [max(alphas, key=lambda p: r["attacks"][p[1]]["aasr"])[0] for r in reps]
    print(f"\nPGD-20's best alpha per seed: {' / '.join(f'{b:g}' for b in best)}")
    steps = dict((int(v), lab) for v, lab in groups[("PGD", "max_iter")])
    ratios = [
        sum(r["attacks"][steps[40]]["cost_s"]) / sum(r["attacks"][steps[20]]["cost_s"])
        for r in reps
    ]
    print(f"PGD-40 / PGD-20 cost per seed: {' / '.join(f'{x:.2f}' for x in ratios)}")

    if draw:
        out = Path(__file__).parent / (figures or f"sweeps-{task}-3seeds-cpu2")
        out.mkdir(exist_ok=True)
        for (entry, param), points in groups.items():
            path = sweep_figure(f"{task}, seeds {seeds}", result, entry, param, points, out)
            print(f"![{entry}: ASR vs {param}]({out.name}/{path.name})")
    # Seeds that repeat a split on permuted clients vary the initialisation and images, not the
    # split's skew: print the splits so that a reader can tell.
    for r in reps:
        split = sorted(tuple(c["train_label_counts"]) for c in r["clients"])
        print(f"seed {r['seed']}: label counts per client {split}")
    print()


def side_by_side(results: dict[str, dict]) -> None:
    print("| attack | " + " | ".join(f"{task} AASR" for task in results) + " |")
    print("|---|" + "---|" * len(results))
    reps = [result["repeats"] for result in results.values()]
    print("| clean ACC | " + " | ".join(cell([r["acc_mean"] for r in rs]) for rs in reps) + " |")
    # Rows pair up by their place in the scenario: with eps scaled per task (the closest
    # setting) the same row has another label on each task, and all of them are shown.
    for row in zip(*(rs[0]["attacks"] for rs in reps), strict=True):
        cells = [
            cell([r["attacks"][lab]["aasr"] for r in rs]) for lab, rs in zip(row, reps, strict=True)
        ]
        print(f"| {' / '.join(dict.fromkeys(row))} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders, one per seed")
    parser.add_argument("--figures", help="figure folder under docs/results (one task)")
    parser.add_argument("--no-figures", action="store_true", help="print the tables only")
    args = parser.parse_args()
    results = pooled(args.folders)
    if args.figures and len(results) > 1:
        parser.error("--figures takes the runs of one task")
    for task, result in results.items():
        report(task, result, args.figures, draw=not args.no_figures)
    if len(results) > 1:
        side_by_side(results)


if __name__ == "__main__":
    main()
