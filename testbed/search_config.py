"""The `[search]` table of a scenario: which attack `testbed search` tunes, over which
space, for which objective, under which perceptibility bound (testbed/search.py runs it).

It lives in the scenario (not in CLI flags) so that the search is as reproducible and
reviewable as the run it belongs to; `testbed run` ignores it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from testbed.strict import StrictModel as _Strict


class ParamRange(_Strict):
    """One hyperparameter's range: ``low``/``high`` (ints give an integer range), optional
    ``log`` or ``step``; or ``choices``. ``relative_to = "eps"`` samples a fraction of that
    param (eps_step as a fraction of eps keeps PGD's step within its budget)."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = Field(None, gt=0)
    choices: list[int | float | str | bool] | None = Field(None, min_length=1)
    relative_to: str | None = None

    @model_validator(mode="after")
    def _shape(self) -> ParamRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step:
                raise ValueError("give either choices or low/high, not both")
            if self.relative_to is not None:
                raise ValueError("relative_to needs low/high, not choices")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high, or choices")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("Optuna samples either log or with a step, not both")
        return self

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int) and self.relative_to is None


class Constraints(_Strict):
    """The perceptibility bound: mean SSIM over the attacked images at least ``ssim_min``
    and the largest L-inf perturbation at most ``linf_max`` (default: the space's eps
    upper bound, if it searches eps; else no L-inf bound)."""

    ssim_min: float = Field(0.95, ge=0, le=1)
    linf_max: float | None = Field(None, gt=0, le=1)


class Search(_Strict):
    attack: str = Field(description="Label of the [[attacks]] entry to tune.")
    space: dict[str, ParamRange] = Field(
        min_length=1, description="Per param of that attack: its range or choices."
    )
    n_trials: int = Field(30, ge=1, le=100_000, description="Trials in all (a resume counts).")
    objective: Literal["benign", "own"] = Field(
        "benign", description="Maximise the benign models' ASR (transfer) or the own model's."
    )
    constraints: Constraints = Field(default_factory=Constraints)
    storage: str | None = Field(
        None, description="Optuna storage URL; default sqlite:///<out_dir>/search-<name>.db."
    )
    study_name: str | None = Field(None, description="Default <scenario>-<attack label>.")
    pruning: bool = Field(True, description="MedianPruner over the per-adversary values.")
    sampler_seed: int = Field(0, ge=0, description="Seed of Optuna's TPE sampler.")
    task: str | None = Field(None, description="Task to search on; default the first.")

    @model_validator(mode="after")
    def _relative_targets(self) -> Search:
        for name, r in self.space.items():
            if r.relative_to is not None and r.relative_to not in self.space:
                # relative to a fixed value would just be an absolute range: say so
                raise ValueError(
                    f"space.{name}.relative_to = {r.relative_to!r} is not a searched param"
                )
            if r.relative_to is not None and self.space[r.relative_to].relative_to is not None:
                raise ValueError(f"space.{name}: relative_to a relative param")
        return self

    def linf_bound(self) -> float | None:
        if self.constraints.linf_max is not None:
            return self.constraints.linf_max
        eps = self.space.get("eps")
        return float(eps.high) if eps is not None and eps.high is not None else None

    def problem(self, labels: list[str], tasks: list[str]) -> str | None:
        """What is wrong with this search in its scenario (attack labels, task names)."""
        if self.attack not in labels:
            known = ", ".join(labels) or "none"
            return f"search.attack {self.attack!r} is not an [[attacks]] label (labels: {known})"
        if self.task is not None and self.task not in tasks:
            return f"search.task {self.task!r} is not a task (tasks: {', '.join(tasks)})"
        return None
