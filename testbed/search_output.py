"""What `testbed search` writes: the best configuration as an `[[attacks]]` entry, and
the Pareto figure of success against perceptibility."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from testbed.rundir import RunError
from testbed.scenario import Attack


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise RunError(f"cannot write {type(v).__name__} param {v!r} as TOML")


def attack_toml(spec: Attack, params: dict[str, Any], value: float) -> str:
    """The best configuration as a ready `[[attacks]]` entry."""
    inline = ", ".join(f"{k} = {_toml_value(v)}" for k, v in params.items())
    return (
        f"# testbed search: objective {value:.4f} under the [search] bound\n"
        f"[[attacks]]\nname = {json.dumps(spec.name)}\n"
        f"label = {json.dumps(spec.label + ' (searched)')}\nparams = {{ {inline} }}\n"
    )


def pareto_figure(
    study: optuna.Study, path: Path, objective: str, best: FrozenTrial, ssim_min: float
) -> None:
    """Perceptibility (1 - mean SSIM) against success over the finished trials, the
    non-dominated ones marked: a throwaway two-objective study lets Optuna find them. The
    SSIM bound is a line, the best feasible configuration a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_pareto_front

    front = optuna.create_study(directions=["minimize", "maximize"])
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        p = t.user_attrs["perceptibility"]
        front.add_trial(
            optuna.trial.create_trial(
                values=[1.0 - float(p["ssim_mean"]), float(t.value)],
                params=t.params,
                distributions=t.distributions,
            )
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = plot_pareto_front(front, target_names=["1 - mean SSIM", f"ASR ({objective} models)"])
    handles, _ = ax.get_legend_handles_labels()
    labels = ["dominated", "non-dominated (Pareto front)"][-len(handles) :]
    ax.axvline(1.0 - ssim_min, color="grey", linestyle="--", label=f"SSIM bound {ssim_min:g}")
    b = best.user_attrs["perceptibility"]
    ax.scatter(
        [1.0 - float(b["ssim_mean"])], [best.value], marker="*", s=250, color="gold",
        edgecolor="black", zorder=5, label="best feasible",
    )  # fmt: skip
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles, [*labels, f"SSIM bound {ssim_min:g}", "best feasible"])
    ax.set_title(f"{study.study_name}: success against perceptibility")
    path.parent.mkdir(parents=True, exist_ok=True)
    ax.figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
