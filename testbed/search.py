"""`testbed search`: the worst case of one attack under a perceptibility bound.

An Optuna study tunes the hyperparameters of one `[[attacks]]` entry (the scenario's
`[search]` table, testbed/search_config.py) to maximise the benign models' ASR (or the
adversary's own), on the federation of the scenario's first seed. Design:

- The federation is the cached one: a run of the scenario with no attacks trains it or,
  usually, finds it in the federation cache; its metrics name the cache key, and the
  weights are loaded from that entry. The search never trains a federation of its own.
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
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from pydantic import ValidationError
from rich.console import Console

from testbed.assemble import build_model, make_clients, per_run_objects
from testbed.builtins.datasets import cache_dir
from testbed.cache import BadEntry, FederationCache
from testbed.federation import set_weights
from testbed.perceptibility import pool_perceptibility
from testbed.pluginmanager import Host
from testbed.progress import make_progress
from testbed.rundir import RunError, safe_name
from testbed.runner import adversaries_of, resolve_device, run_scenario
from testbed.scenario import Attack, Evaluation, Scenario
from testbed.search_config import ParamRange, Search
from testbed.transfer import deploy, run_attack

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
                err = exc.errors()[0]
                raise RunError(f"search.space.{name} = {v!r}: {err['msg']}") from None
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


@dataclass
class Federation:
    """The deployed models and client data of one (task, seed), from the cache."""

    deployed: list[Any]
    clients: list[Any]
    classes: tuple[str, ...]
    seed: int
    device: torch.device
    cache_hit: bool


def load_federation(
    scenario: Scenario, host: Host, task_name: str, data_root: Path | None
) -> Federation:
    """Train (or find in the cache) the federation of the first seed through the runner
    with no attacks, then load the cache entry its metrics name."""
    seed = scenario.seeds()[0]
    task = next(t for t in scenario.task_list() if t.name == task_name)
    bare = scenario.model_copy(
        update={
            "attacks": [],
            "outsider": None,
            "evaluation": Evaluation(repeats=1, seeds=[seed]),
            "report": scenario.report.model_copy(update={"plots": False, "save_weights": False}),
            "data": task.data if scenario.data is not None else None,
            "tasks": [] if scenario.data is not None else [task],
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        metrics = run_scenario(
            bare, host, data_root=data_root, out=Path(tmp) / "run", show_progress=False
        ).metrics
    cache = metrics["tasks"][task_name]["repeats"][0]["cache"]
    try:
        entry = FederationCache(cache_dir() / "federations").load(cache["key"])
    except BadEntry as exc:
        raise RunError(f"federation cache entry {cache['key']}: {exc}") from None
    if entry is None:
        raise RunError(f"federation cache entry {cache['key']} vanished after training")
    device = resolve_device(scenario.federation.device)
    ds = host.registry.build("datasets", task.data.name, task.data.params, data_root=data_root)
    finals = []
    for cid in range(scenario.federation.clients):
        m = build_model(scenario, host, ds, seed).to(device)
        set_weights(m, entry["clients"][cid].to(device))
        finals.append(m)
    clients = make_clients(ds, scenario, host, seed, device)
    return Federation(deploy(finals), clients, tuple(ds.classes), seed, device, cache["hit"])


def default_storage(scenario: Scenario) -> str:
    out = Path(scenario.report.out_dir)
    out.mkdir(parents=True, exist_ok=True)
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

    def objective(trial: optuna.Trial) -> float:
        sampled = suggest(trial, search.space)
        trial.set_user_attr("params", sampled)  # realised: relative params already scaled
        params = {**spec.params, **sampled}
        trial_spec = spec.model_copy(update={"params": params})
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
            pooled = pool_perceptibility(percept)
            # MedianPruner knows no constraints: report 0 once the bound is broken, or the
            # strong but infeasible trials would set a median that prunes every feasible one
            feasible = _violations(pooled, ssim_min, linf_max) == [0.0, 0.0]
            trial.report(sum(values) / len(values) if feasible else 0.0, step)
            if search.pruning and trial.should_prune():
                _constrain(trial, pooled, ssim_min, linf_max)  # those of the adversaries run
                raise optuna.TrialPruned()
        _constrain(trial, pooled, ssim_min, linf_max)
        return sum(values) / len(values)

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the bar and summary say it
    storage = search.storage or default_storage(scenario)
    name = search.study_name or f"{scenario.scenario.name}-{search.attack}"
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        load_if_exists=True,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=search.sampler_seed + _trials_done(storage, name)),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
        if search.pruning
        else optuna.pruners.NopPruner(),
    )
    total = n_trials or search.n_trials
    remaining = total - len(study.trials)
    t0 = time.perf_counter()
    if remaining > 0:
        # inference-time defences (input transformations) act through the per-run objects
        with host.active(per_run_objects(scenario, host)):
            _optimize(study, objective, total, remaining, console, show_progress)
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
    out.mkdir(parents=True, exist_ok=True)
    best_toml = out / "best_attack.toml"
    best_toml.write_text(toml)
    figure = out / "pareto.png"
    pareto_figure(study, figure, search.objective)
    (out / "search.json").write_text(
        json.dumps(
            {
                "study": name,
                "storage": storage,
                "trials": len(study.trials),
                "seconds": time.perf_counter() - t0,
                "cache_hit": fed.cache_hit,
                "best": {
                    "params": best_params,
                    "value": best.value,
                    "perceptibility": best.user_attrs["perceptibility"],
                },
            },
            indent=2,
        )
    )
    return SearchResult(
        best_params, float(best.value), best.user_attrs["perceptibility"], len(study.trials),
        fed.cache_hit, figure, best_toml, toml,
    )  # fmt: skip


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


def pareto_figure(study: optuna.Study, path: Path, objective: str) -> None:
    """Perceptibility (1 - mean SSIM) against success over the finished trials, the
    non-dominated ones marked: a throwaway two-objective study lets Optuna find them."""
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
    ax.set_title(f"{study.study_name}: success against perceptibility")
    path.parent.mkdir(parents=True, exist_ok=True)
    ax.figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
