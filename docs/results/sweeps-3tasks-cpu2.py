"""paper_sweeps on the three tasks side by side (RESULTS.md, "Fig. 2 and Fig. 3 on the real
data"): one markdown table of AASR per task for every swept attack, and Fig. 3's panels
with the tasks on one axis each.

    python docs/results/sweeps-3tasks-cpu2.py docs/results/sweeps-{meningioma,glioma,pathology}-cpu2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PANELS = [("FGSM", "eps"), ("PGD-20", "eps"), ("PGD-20", "eps_step"), ("PGD", "max_iter")]


def load(folder: Path) -> tuple[str, dict, float]:
    metrics = json.loads((folder / "metrics.json").read_text())
    ((task, result),) = metrics["tasks"].items()
    rep = result["repeats"][0]
    return task, rep["attacks"], rep["acc_mean"]


def curve(attacks: dict, entry: str, param: str) -> list[tuple[float, str]]:
    """The sweep's points as (value, attack label), in order of the value."""
    return sorted(
        (float(a["sweep_point"][param]), label)
        for label, a in attacks.items()
        if a.get("sweep_of") == entry and param in (a.get("sweep_point") or {})
    )


DIRECTIONS = ("lesion_to_healthy", "healthy_to_lesion")


def mean_pairs(matrix: list[list[float]]) -> float:
    cells = [v for row in matrix for v in row]
    return sum(cells) / len(cells)


def main(folders: list[Path]) -> None:
    runs = [load(f) for f in folders]
    names = [t for t, _, _ in runs]
    print("| attack | " + " | ".join(f"{t} AASR / vs label / AETR" for t in names) + " |")
    print("|---|" + "---|" * len(runs))
    print("| clean ACC | " + " | ".join(f"{100 * acc:.1f}" for _, _, acc in runs) + " |")
    for label in runs[0][1]:
        cells = []
        for _, attacks, _ in runs:
            a = attacks[label]
            cells.append(" / ".join(f"{100 * a[k]:.1f}" for k in ("aasr", "aasr_true", "aetr")))
        print(f"| {label} | " + " | ".join(cells) + " |")

    # Which way the attack fails: ASR on lesion images (pushed to healthy) and on healthy
    # images (pushed to a lesion), mean over the adversary x target pairs.
    heads = [f"{t} lesion->healthy / healthy->lesion" for t in names]
    print("\n| attack | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(runs))
    for _, label in curve(runs[0][1], "PGD-20", "eps"):
        cells = []
        for _, attacks, _ in runs:
            d = attacks[label]["direction"]
            cells.append(" / ".join(f"{100 * mean_pairs(d[k]):.1f}" for k in DIRECTIONS))
        print(f"| {label} | " + " | ".join(cells) + " |")

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    for ax, (entry, param) in zip(axes, PANELS, strict=True):
        for (task, attacks, _), colour in zip(runs, ("C0", "C1", "C2"), strict=False):
            pts = curve(attacks, entry, param)
            xs = [x for x, _ in pts]
            for key, style in (("aasr_own", "-o"), ("aasr_benign", "--")):
                ys = [attacks[label][key] for _, label in pts]
                ax.plot(xs, ys, style, color=colour, label=f"{task}, {key.removeprefix('aasr_')}")
        ax.set(title=f"{entry}: ASR vs {param}", xlabel=param, ylabel="ASR", ylim=(0, 1))
    axes[0].legend(fontsize=7)
    out = Path(__file__).with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"\n![]({out.name})")


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
