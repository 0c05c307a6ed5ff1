"""`testbed search`: the worst case of one attack under a perceptibility bound.

An Optuna study tunes the hyperparameters of one `[[attacks]]` entry (the scenario's
`[search]` table, testbed/search_config.py) to maximise the benign models' ASR (or the
adversary's own), on the federation of the scenario's first seed. Design:

- The federation is the cached one (testbed/cached_federation.py): a run of the scenario
  with no attacks trains it or, usually, finds it in the federation cache. The search
  never trains a federation of its own.
- Single objective, constrained: each trial states its perceptibility constraints with
  `Trial.set_constraint` (SSIM and L-inf), so Optuna's TPE sampler models feasibility and
  `study.best_trial` is the best feasible trial (no penalty folded into the objective).
- Each adversary's attack is one intermediate value, so MedianPruner stops a trial whose
  first adversaries already fall below the median.
- The study is stored in sqlite by default; the same study name resumes it, up to
  `n_trials` trials in all.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from pydantic import ValidationError
from rich.console import Console

from testbed.assemble import per_run_objects
from testbed.builtins.dataset_cache import cache_dir
from testbed.cached_federation import load_federation
from testbed.perceptibility import pool_perceptibility
from testbed.pluginmanager import Host
from testbed.progress import make_progress
from testbed.rundir import RunError, make_dir, safe_name
from testbed.runner import adversaries_of
from testbed.scenario import Attack, Scenario
from testbed.search_config import ParamRange, Search
from testbed.search_output import attack_toml, pareto_figure
from testbed.transfer import clean_accuracy, run_attack

# float32 pixels: PGD's perturbation at exactly eps reads back a few ulps above it
LINF_TOLERANCE = 1e-6


@dataclass
class SearchResult:
    best_params: dict[str, Any]
    best_value: float
    best_perceptibility: dict[str, float | int]
    trials: int
    cache_hit: bool
    figure: Path
    best_toml: Path
    toml: str
    configured: list[dict[str, Any]]
    """Each configured ``[[attacks]]`` entry: label, objective, within the bound or not."""
    at_least_as_strong: bool | None


def check_space(scenario: Scenario, search: Search, host: Host) -> Attack:
    """The attack entry to tune; RunError (one line) if the space names a param its
    params model does not have, or a searched value would fail its validation."""
    spec = next(a for a in scenario.attacks if a.label == search.attack)
    model = host.registry["attacks"].get(spec.name).params
    unknown = sorted(set(search.space) - set(model.model_fields))
    if unknown:
        known = ", ".join(model.model_fields)
        raise RunError(f"search.space: {spec.name} has no param {', '.join(unknown)} ({known})")
    # each end of each range, the other searched params at their first value: a bound no
    # attack could take is a mistake in the space, not a trial to waste
    first = {n: r.choices[0] if r.choices is not None else r.low for n, r in search.space.items()}
    for name, r in search.space.items():
        for v in r.choices if r.choices is not None else [r.low, r.high]:
            point = {**first, name: v}
            for n, rn in search.space.items():
                if rn.relative_to is not None:
                    point[n] = point[n] * point[rn.relative_to]
            try:
                model.model_validate({**spec.params, **point})
            except ValidationError as exc:
                msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
                raise RunError(f"search.space.{name} = {v!r}: {msg}") from None
    return spec


def suggest(trial: optuna.Trial, space: dict[str, ParamRange]) -> dict[str, Any]:
    """Sample the space; relative params become a fraction of their base param."""
    out: dict[str, Any] = {}
    for name, r in space.items():
        if r.choices is not None:
            out[name] = trial.suggest_categorical(name, r.choices)
        elif r.is_int:
            step = int(r.step) if r.step is not None else 1
            out[name] = trial.suggest_int(name, int(r.low), int(r.high), step=step, log=r.log)
        else:
            out[name] = trial.suggest_float(
                name, float(r.low), float(r.high), step=r.step, log=r.log
            )
    for name, r in space.items():
        if r.relative_to is not None:
            out[name] = out[name] * out[r.relative_to]
    return out


def default_storage(scenario: Scenario) -> str:
    out = Path(scenario.report.out_dir)
    make_dir(out, "the search's study folder")
    return f"sqlite:///{out / f'search-{safe_name(scenario.scenario.name)}.db'}"


def run_search(
    scenario: Scenario,
    host: Host,
    *,
    data_root: Path | None,
    out: Path,
    n_trials: int | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> SearchResult:
    search = scenario.search
    if search is None:
        raise RunError("the scenario has no [search] table (see README: testbed search)")
    console = console or Console(stderr=True)
    spec = check_space(scenario, search, host)
    make_dir(out, f"the search folder {out}")
    make_dir(cache_dir() / "federations", "the federation cache the search reads its models from")
    storage = search.storage or default_storage(scenario)
    name = search.study_name or f"{scenario.scenario.name}-{search.attack}"
    study = _open_study(search, storage, name)  # all three before any training
    task_name = search.task or scenario.task_list()[0].name
    fed = load_federation(scenario, host, task_name, data_root)
    console.print(
        f"federation: {'cache hit' if fed.cache_hit else 'trained and cached'}",
        markup=False,
        highlight=False,
    )
    adversaries = adversaries_of(scenario, fed.seed)
    linf_max = search.linf_bound()
    metric = "aasr_benign" if search.objective == "benign" else "aasr_own"
    samples = scenario.threat_model.samples_per_adversary
    ssim_min = search.constraints.ssim_min

    def score(
        trial_spec: Attack, report: Callable[[float, dict[str, Any], int], None] | None = None
    ) -> tuple[float, dict[str, float | int]]:
        """The objective and pooled perceptibility of one attack configuration over the
        adversaries; ``report`` sees the running mean after each (for pruning)."""
        values: list[float] = []
        percept: list[dict[str, float | int]] = []
        for step, a in enumerate(adversaries):
            res, _ = run_attack(
                trial_spec, fed.deployed, fed.clients, [a], host.registry, host.hook,
                seed=fed.seed, samples=samples, num_classes=len(fed.classes),
                device=fed.device, classes=fed.classes,
            )  # fmt: skip
            # one adversary has no benign cell when it is the only client: score own then
            v = res[metric]
            values.append(res["aasr_own"] if v is None or math.isnan(v) else float(v))
            percept.append(res["perceptibility"])
            if report is not None:
                report(sum(values) / len(values), pool_perceptibility(percept), step)
        return sum(values) / len(values), pool_perceptibility(percept)

    def objective(trial: optuna.Trial) -> float:
        sampled = suggest(trial, search.space)
        trial.set_user_attr("params", sampled)  # realised: relative params already scaled
        trial_spec = spec.model_copy(update={"params": {**spec.params, **sampled}})

        def report(running: float, pooled: dict[str, float | int], step: int) -> None:
            # MedianPruner knows no constraints: report 0 once the bound is broken, or the
            # strong but infeasible trials would set a median that prunes every feasible one
            feasible = _violations(pooled, ssim_min, linf_max) == [0.0, 0.0]
            trial.report(running if feasible else 0.0, step)
            if search.pruning and trial.should_prune():
                _constrain(trial, pooled, ssim_min, linf_max)  # those of the adversaries run
                raise optuna.TrialPruned()

        value, pooled = score(trial_spec, report)
        _constrain(trial, pooled, ssim_min, linf_max)
        return value

    _check_or_start(study, spec, search, fed.key)
    total = n_trials or search.n_trials
    # a queued (not yet run) trial, such as the configured attack, is still to come
    waiting = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    remaining = total - len([t for t in study.trials if t.state not in waiting])
    t0 = time.perf_counter()
    if remaining > 0:
        # inference-time defences (input transformations) act through the per-run objects
        with host.active(per_run_objects(scenario, host)):
            *_, diverged = clean_accuracy(fed.deployed, fed.clients, host.hook, fed.seed)
            if diverged:  # every trial would score NaN and read as "no feasible trial"
                e = diverged[0]
                raise RunError(
                    f"the federation diverged: client {e['client']}'s model gives {e['detail']}"
                    f"{f' (and {len(diverged) - 1} more clients)' if len(diverged) > 1 else ''}"
                    "; no attack on it can be scored"
                )
            _optimize(study, objective, total, remaining, console, show_progress)
    configured = _configured(study, scenario, spec, score, ssim_min, linf_max)
    try:
        best = study.best_trial
    except ValueError:
        raise RunError(
            f"no feasible trial in {len(study.trials)}: no attack configuration of this "
            f"space meets SSIM >= {search.constraints.ssim_min}"
            + (f" and Linf <= {linf_max}" if linf_max is not None else "")
        ) from None
    best_params = {**spec.params, **best.user_attrs["params"]}
    toml = attack_toml(spec, best_params, best.value)
    best_toml = out / "best_attack.toml"
    best_toml.write_text(toml)
    figure = out / "pareto.png"
    pareto_figure(study, figure, search.objective, best, ssim_min)
    (out / "search.json").write_text(
        json.dumps(
            {
                "study": name,
                "storage": storage,
                "trials": len(study.trials),
                "seconds": time.perf_counter() - t0,
                "cache_hit": fed.cache_hit,
                **({"trained_on": fed.trained_on} if fed.trained_on else {}),
                "best": {
                    "params": best_params,
                    "value": best.value,
                    "perceptibility": best.user_attrs["perceptibility"],
                },
                "configured": configured,
                "at_least_as_strong": _at_least_as_strong(best.value, configured),
            },
            indent=2,
        )
    )
    return SearchResult(
        best_params, float(best.value), best.user_attrs["perceptibility"], len(study.trials),
        fed.cache_hit, figure, best_toml, toml, configured,
        _at_least_as_strong(best.value, configured),
    )  # fmt: skip


def _configured(
    study: optuna.Study,
    scenario: Scenario,
    spec: Attack,
    score: Callable[[Attack], tuple[float, dict[str, float | int]]],
    ssim_min: float,
    linf_max: float | None,
) -> list[dict[str, Any]]:
    """Every ``[[attacks]]`` entry of the scenario as configured, scored on the same
    objective and bound as the trials: the bar the search must clear. The searched entry
    is the study's first (enqueued) trial when it lay in the space; the others are run
    once and kept in the study, so a resumed search does not rerun them."""
    stored = study.user_attrs.get("configured")
    if stored is not None:
        return stored
    rows = []
    first = study.trials[0] if study.user_attrs.get("first_is_configured") else None
    for a in scenario.attacks:
        if a.label == spec.label and first is not None and first.value is not None:
            value, p = first.value, first.user_attrs["perceptibility"]
        else:
            value, p = score(a)
        feasible = _violations(p, ssim_min, linf_max) == [0.0, 0.0]
        rows.append({"label": a.label, "value": value, "feasible": feasible, "perceptibility": p})
    study.set_user_attr("configured", rows)
    return rows


def _at_least_as_strong(best: float, configured: list[dict[str, Any]]) -> bool | None:
    """Whether the search's best meets every configured attack that lies within the bound
    (None: none does, so there is nothing to compare with)."""
    feasible = [r["value"] for r in configured if r["feasible"]]
    return None if not feasible else best >= max(feasible) - 1e-12


def _violations(p: dict[str, float | int], ssim_min: float, linf_max: float | None) -> list[float]:
    """How far the perceptibility ``p`` breaks each constraint (0: met)."""
    ssim = max(0.0, ssim_min - float(p["ssim_mean"]))
    linf = 0.0 if linf_max is None else float(p["linf_max"]) - linf_max - LINF_TOLERANCE
    return [ssim, max(0.0, linf)]


def _constrain(
    trial: optuna.Trial, p: dict[str, float | int], ssim_min: float, linf_max: float | None
) -> None:
    """Record the trial's perceptibility and its constraints (> 0: broken); once per
    trial, as Optuna keeps the first value of a constraint."""
    trial.set_user_attr("perceptibility", p)
    ssim, linf = _violations(p, ssim_min, linf_max)
    trial.set_constraint("ssim", ssim)
    trial.set_constraint("linf", linf)


def _check_or_start(study: optuna.Study, spec: Attack, search: Search, key: str) -> None:
    """A new study records what it searches, and tries the configured attack first (so the
    result is at least as strong as it, when it is feasible); a resumed one must search
    the same thing on the same federation, or its trials would mix two problems."""
    what = {
        "federation": key,
        "attack": spec.model_dump(mode="json"),
        "search": search.model_dump(mode="json", exclude={"n_trials", "storage"}),
    }
    if "searches" not in study.user_attrs:
        study.set_user_attr("searches", what)
        start = {}
        for name, r in search.space.items():
            v = spec.params.get(name)
            if v is not None and r.relative_to is not None:
                base = spec.params.get(r.relative_to)
                v = v / base if base else None
            if _in_space(v, r):
                start[name] = v
        if len(start) == len(search.space):
            study.enqueue_trial(start)
            study.set_user_attr("first_is_configured", True)
    elif study.user_attrs["searches"] != what:
        raise RunError(
            f"study {study.study_name!r} in {search.storage or 'the default storage'} searched "
            "another attack, space or federation; set search.study_name for a new study"
        )


def _in_space(v: Any, r: ParamRange) -> bool:
    """Whether Optuna could propose ``v`` from the range ``r`` (on its step grid)."""
    if r.choices is not None:
        return v in r.choices
    if not isinstance(v, int | float) or not r.low <= v <= r.high:
        return False
    return r.step is None or abs((v - r.low) / r.step - round((v - r.low) / r.step)) < 1e-6


def _open_study(search: Search, storage: str, name: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the bar and summary say it
    try:
        return optuna.create_study(
            study_name=name,
            storage=storage,
            load_if_exists=True,
            direction="maximize",
            sampler=optuna.samplers.TPESampler(
                seed=search.sampler_seed + _trials_done(storage, name)
            ),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
            if search.pruning
            else optuna.pruners.NopPruner(),
        )
    except Exception as exc:  # each storage backend (SQLAlchemy, journal, gRPC) has its own
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunError(f"search.storage {storage!r}: cannot open the study ({first})") from None


def _trials_done(storage: str, name: str) -> int:
    """Trials the stored study already holds: a resumed search seeds its sampler anew,
    or it would propose the first trials' points again."""
    try:
        return len(optuna.load_study(study_name=name, storage=storage).trials)
    except KeyError:  # no such study yet
        return 0


def _optimize(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    total: int,
    remaining: int,
    console: Console,
    show_progress: bool,
) -> None:
    progress = make_progress(console) if show_progress else None
    if progress is None:
        study.optimize(objective, n_trials=remaining)
        return
    with progress:
        bar = progress.add_task("search trials", total=total, completed=total - remaining)

        def advance(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            progress.advance(bar)

        study.optimize(objective, n_trials=remaining, callbacks=[advance])
