"""PNG figures of a finished run (matplotlib, headless), from metrics and saved examples.

- asr_<attack>.png: adversary x target ASR matrix, mean over seeds;
- sweep_<attack>_<param>.png: ASR on the adversary's own model and on the benign models
  against a swept parameter, mean with a +-std band over seeds (the paper's Fig. 3 for
  eps, its alpha study for eps_step); for max_iter also the cost per batch;
- examples_<attack>.png: one clean image and its adversarial versions along the sweep,
  with the adversary model's predictions (the paper's Fig. 2);
- training_loss.png;
- explain_<attack>.png with [explain]: attributions clean vs adversarial (explain_plots.py).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from testbed.metrics import class_name


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def asr_matrix(title: str, metrics: dict[str, Any], label: str, out: Path) -> Path:
    repeats = metrics["repeats"]
    mat = np.mean([np.asarray(r["attacks"][label]["asr"], dtype=float) for r in repeats], axis=0)
    adversaries = repeats[0]["attacks"][label]["adversaries"]
    fig, ax = plt.subplots(figsize=(1.2 * mat.shape[1] + 2, 1.0 * mat.shape[0] + 1.5))
    im = ax.imshow(mat, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(mat.shape[1]), [f"client {t}" for t in range(mat.shape[1])])
    ax.set_yticks(range(mat.shape[0]), [f"adv {a}" for a in adversaries])
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            color = "white" if mat[i, j] < 0.6 else "black"
            ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", color=color)
    ax.set_title(f"{title}: ASR, {label}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, out / f"asr_{_safe(label)}.png")


def sweep_groups(metrics: dict[str, Any]) -> dict[tuple[str, str], list[tuple[float, str]]]:
    """(swept entry, parameter) -> [(value, attack label)] for one-parameter sweeps."""
    groups: dict[tuple[str, str], list[tuple[float, str]]] = defaultdict(list)
    for label, a in metrics["repeats"][0]["attacks"].items():
        point = a.get("sweep_point") or {}
        if a.get("sweep_of") and len(point) == 1:
            ((param, value),) = point.items()
            groups[(a["sweep_of"], param)].append((float(value), label))
    return {k: sorted(v) for k, v in groups.items() if len(v) > 1}


def _band(metrics: dict[str, Any], labels: list[str], key: str) -> tuple[np.ndarray, np.ndarray]:
    vals = np.array(
        [[np.nan if (v := r["attacks"][lab][key]) is None else v for lab in labels]
         for r in metrics["repeats"]],
        dtype=float,
    )  # fmt: skip
    return np.nanmean(vals, axis=0), np.nanstd(vals, axis=0)


def sweep_figure(
    title: str, metrics: dict[str, Any], entry: str, param: str, points: list, out: Path
) -> Path:
    xs = np.array([v for v, _ in points])
    labels = [lab for _, lab in points]
    with_cost = param == "max_iter"
    fig, axes = plt.subplots(1, 2 if with_cost else 1, figsize=(11 if with_cost else 6, 4))
    ax = axes[0] if with_cost else axes
    for key, name in (("aasr_own", "adversary's own model"), ("aasr_benign", "benign models")):
        mean, std = _band(metrics, labels, key)
        ax.plot(xs, mean, marker="o", label=name)
        ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel(param)
    ax.set_ylabel("ASR")
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}: {entry}, ASR vs {param}")
    ax.legend()
    if with_cost:
        costs = [
            np.mean([c for r in metrics["repeats"] for c in r["attacks"][lab]["cost_s"]])
            for lab in labels
        ]
        axes[1].plot(xs, costs, marker="o")
        axes[1].set_xlabel("steps (max_iter)")
        axes[1].set_ylabel("seconds per batch")
        axes[1].set_title("attack cost vs steps")
    return _save(fig, out / f"sweep_{_safe(entry)}_{param}.png")


def examples_figure(
    title: str,
    classes: list[str],
    entry: str,
    points: list[tuple[float, str]],
    seed: int,
    examples: Path,
    out: Path,
) -> Path | None:
    loaded = []
    for value, label in points:
        path = examples / f"seed{seed}_{_safe(label)}.pt"
        if not path.exists():
            return None
        loaded.append((value, torch.load(path, weights_only=True)))
    first = loaded[0][1]
    fig, axes = plt.subplots(1, len(loaded) + 1, figsize=(2.2 * (len(loaded) + 1), 2.8))

    def show(ax: Any, img: torch.Tensor, caption: str) -> None:
        arr = img.permute(1, 2, 0).numpy()
        ax.imshow(arr[..., 0] if arr.shape[-1] == 1 else arr, cmap="gray", vmin=0, vmax=1)
        ax.set_title(caption, fontsize=8)
        ax.axis("off")

    show(axes[0], first["x"], f"clean\npred {class_name(classes, first['pred_clean'])}")
    for ax, (value, ex) in zip(axes[1:], loaded, strict=True):
        show(ax, ex["x_adv"], f"{entry} {value:g}\npred {class_name(classes, ex['pred_adv'])}")
    fig.suptitle(f"{title}: true {classes[first['label']]}, adversary {first['adversary']}")
    return _save(fig, out / f"examples_{_safe(entry)}.png")


def _mean_loss(losses: dict[str, float | None]) -> float:
    """Mean over the clients that have a finite loss; NaN (a gap in the line) if none. A
    diverged client's NaN comes back from metrics.json as null."""
    vals = np.array([np.nan if v is None else v for v in losses.values()], dtype=float)
    finite = vals[np.isfinite(vals)]
    return float(finite.mean()) if finite.size else float("nan")


def training_loss(title: str, metrics: dict[str, Any], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in metrics["repeats"]:
        rounds = [rec["round"] for rec in r["rounds"]]
        loss = [_mean_loss(rec["train_loss"]) for rec in r["rounds"]]
        ax.plot(rounds, loss, marker="o", label=f"seed {r['seed']}")
    ax.set_xlabel("round")
    ax.set_ylabel("mean local training loss")
    ax.set_title(title)
    ax.legend()
    return _save(fig, out / "training_loss.png")


def write_plots(title: str, metrics: dict[str, Any], out: Path, examples: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [training_loss(title, metrics, out)]
    groups = sweep_groups(metrics)
    swept = {lab for pts in groups.values() for _, lab in pts}
    for label in metrics["repeats"][0]["attacks"]:
        if label not in swept:
            paths.append(asr_matrix(title, metrics, label, out))
    seed = metrics["repeats"][0]["seed"]
    classes = metrics["dataset"]["classes"]
    for (entry, param), points in groups.items():
        paths.append(sweep_figure(title, metrics, entry, param, points, out))
        if param == "eps":
            fig = examples_figure(title, classes, entry, points, seed, examples, out)
            if fig is not None:
                paths.append(fig)
    from testbed.explain_plots import explain_figures  # it imports this module

    paths += explain_figures(title, metrics, examples, out)
    return paths
