"""PNG figures of a finished run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _asr_matrix(metrics: dict[str, Any], label: str) -> tuple[np.ndarray, list[int]]:
    rows = [np.asarray(r["attacks"][label]["asr"], dtype=float) for r in metrics["repeats"]]
    return np.mean(rows, axis=0), metrics["repeats"][0]["attacks"][label]["adversaries"]


def write_plots(title: str, metrics: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for label in metrics["repeats"][0]["attacks"]:
        mat, adversaries = _asr_matrix(metrics, label)
        fig, ax = plt.subplots(figsize=(1.2 * mat.shape[1] + 2, 1.0 * mat.shape[0] + 1.5))
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="magma")
        ax.set_xticks(range(mat.shape[1]), [f"client {t}" for t in range(mat.shape[1])])
        ax.set_yticks(range(mat.shape[0]), [f"adv {a}" for a in adversaries])
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{mat[i, j]:.2f}",
                    ha="center",
                    va="center",
                    color="white" if mat[i, j] < 0.6 else "black",
                )
        ax.set_title(f"{title}: ASR, {label} (adversary x target)")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = out / f"asr_{label.replace('/', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in metrics["repeats"]:
        rounds = [rec["round"] for rec in r["rounds"]]
        loss = [np.mean(list(rec["train_loss"].values())) for rec in r["rounds"]]
        ax.plot(rounds, loss, marker="o", label=f"seed {r['seed']}")
    ax.set_xlabel("round")
    ax.set_ylabel("mean local training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = out / "training_loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths
