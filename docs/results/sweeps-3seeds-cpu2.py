"""paper_sweeps on one task over several seeds, one run per seed (RESULTS.md, "Meningioma
over three seeds" and "Glioma and pathology over three seeds"): every swept attack's mean
and 95% CI over the seeds, where each seed puts its alpha optimum, and Fig. 3's panels
with a band of one standard deviation (drawn by testbed.plots, as `testbed run` draws a
run's repeats) in results/sweeps-TASK-3seeds-cpu2/.

    python docs/results/sweeps-3seeds-cpu2.py docs/results/sweeps-TASK-cpu2 \
        docs/results/sweeps-TASK-seeds12-cpu2/seed{1,2}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from testbed.metrics import mean_std
from testbed.plots import sweep_figure, sweep_groups


def pooled(folders: list[Path]) -> tuple[str, dict]:
    """One task's result with every run's repeats, as one run with several seeds has it."""
    tasks, repeats = set(), []
    for folder in folders:
        ((task, result),) = json.loads((folder / "metrics.json").read_text())["tasks"].items()
        tasks.add(task)
        repeats += result["repeats"]
    if len(tasks) != 1:
        raise SystemExit(f"runs of one task expected, got {sorted(tasks)}")
    return tasks.pop(), {"repeats": repeats}


def cell(values: list[float]) -> str:
    st = mean_std([100 * v for v in values])
    if st["n"] < 2:
        return f"{st['mean']:.1f}"
    return f"{st['mean']:.1f} [{st['mean'] - st['ci95']:.1f}, {st['mean'] + st['ci95']:.1f}]"


def main(folders: list[Path]) -> None:
    task, result = pooled(folders)
    reps = result["repeats"]
    seeds = ", ".join(str(r["seed"]) for r in reps)
    print(f"{task}, seeds {seeds}: mean [95% CI, Student's t] over the seeds\n")
    print("| attack | AASR | AASR vs label | AETR | own - benign ASR, largest |")
    print("|---|---|---|---|---|")
    print(f"| clean ACC | {cell([r['acc_mean'] for r in reps])} | | | |")
    for label in reps[0]["attacks"]:
        per = [r["attacks"][label] for r in reps]
        gap = max(abs(a["aasr_own"] - a["aasr_benign"]) for a in per)
        cols = [cell([a[k] for a in per]) for k in ("aasr", "aasr_true", "aetr")]
        print(f"| {label} | " + " | ".join(cols) + f" | {100 * gap:.1f} |")

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

    out = Path(__file__).parent / f"sweeps-{task}-3seeds-cpu2"
    out.mkdir(exist_ok=True)
    for (entry, param), points in groups.items():
        path = sweep_figure(f"{task}, seeds {seeds}", result, entry, param, points, out)
        print(f"![{entry}: ASR vs {param}]({out.name}/{path.name})")


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
