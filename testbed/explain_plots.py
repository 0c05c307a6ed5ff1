"""Figures of ``[explain]`` (testbed/explain.py): one PNG per attack, for the first seed,
``explain_<attack>.png``. One row per model (the adversary's, a benign one): the clean
image and the adversarial one with that model's prediction and confidence, the
perturbation amplified (its factor and L-inf stated; grey is zero), and for each method
the clean and the adversarial attribution map on one colour scale per pair."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from testbed.rundir import safe_name

METHOD_NAMES = {"saliency": "saliency", "integrated_gradients": "IG", "gradcam": "Grad-CAM"}
ROLE_NAMES = {"own": "own model", "benign": "benign model"}


def _image(ax: Any, img: torch.Tensor, caption: str) -> None:
    arr = img.permute(1, 2, 0).clamp(0, 1).numpy()
    ax.imshow(arr[..., 0] if arr.shape[-1] == 1 else arr, cmap="gray", vmin=0, vmax=1)
    ax.set_title(caption, fontsize=7)
    ax.axis("off")


def amplified(x: torch.Tensor, x_adv: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """0.5 + A * (x_adv - x) with A chosen so the largest change reaches 0 or 1; A and
    the perturbation's L-inf (A = 1 for no change)."""
    delta = x_adv - x
    linf = float(delta.abs().max())
    scale = 0.5 / linf if linf > 0 else 1.0
    return (0.5 + scale * delta).clamp(0, 1), scale, linf


def explain_figure(
    title: str, label: str, classes: list[str], fig_data: dict[str, Any], out: Path
) -> Path:
    models = fig_data["models"]
    methods = list(next(iter(models.values()))["maps"])
    cols = 3 + 2 * len(methods)
    fig, axes = plt.subplots(len(models), cols, figsize=(1.6 * cols, 2.3 * len(models)))
    axes = axes.reshape(len(models), cols)
    pert, scale, linf = amplified(fig_data["x"], fig_data["x_adv"])

    def name(c: int) -> str:
        return classes[c] if c < len(classes) else str(c)

    for row, (role, m) in zip(axes, models.items(), strict=True):
        who = f"{ROLE_NAMES.get(role, role)} (client {m['client']})"
        _image(
            row[0], fig_data["x"], f"{who}\nclean: {name(m['pred_clean'])} {m['conf_clean']:.2f}"
        )
        _image(row[1], fig_data["x_adv"], f"adversarial: {name(m['pred_adv'])} {m['conf_adv']:.2f}")
        _image(row[2], pert, f"perturbation x{scale:.3g}\n(L-inf {linf:.3g}, grey = 0)")
        for j, method in enumerate(methods):
            maps = m["maps"][method]
            vmax = float(max(maps["clean"].max(), maps["adv"].max())) or 1.0
            for k, kind in enumerate(("clean", "adv")):
                ax = row[3 + 2 * j + k]
                ax.imshow(maps[kind].numpy(), cmap="inferno", vmin=0, vmax=vmax)
                ax.set_title(f"{METHOD_NAMES.get(method, method)}, {kind}", fontsize=7)
                ax.axis("off")
    fig.suptitle(
        f"{title}: {label}, image {fig_data['index']} of adversary "
        f"{models['own']['client']}, true {name(fig_data['y'])} (prediction, confidence)",
        fontsize=9,
    )
    # about 1.3 screen pixels per image pixel: the noisy maps make large, incompressible PNGs
    path = out / f"explain_{safe_name(label)}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def explain_figures(title: str, metrics: dict[str, Any], examples: Path, out: Path) -> list[Path]:
    """A figure per explained attack of the first seed whose data was saved."""
    first = metrics["repeats"][0]
    classes = metrics["dataset"]["classes"]
    paths = []
    for label, a in first["attacks"].items():
        path = examples / f"seed{first['seed']}_{safe_name(label)}_explain.pt"
        if not a.get("explain") or not path.exists():
            continue
        data = torch.load(path, weights_only=True)
        if not data:  # a model with non-finite outputs: nothing to draw (explain.py)
            continue
        paths.append(explain_figure(title, label, classes, data, out))
    return paths
