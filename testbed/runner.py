"""Run a scenario: per task and seed, train the federation, then attack; write the run folder.

The folder is built under a hidden name (`.NAME.partial`) and renamed when complete, so a
finished report is never half-written. Every round, every finished attack and every
finished seed is checkpointed there with atomic writes; `--resume` continues an
interrupted run from the last checkpoint and, because every random draw derives from
(seed, round, purpose), finishes with the same metrics as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from testbed import __version__
from testbed.builtins.datasets import cache_dir
from testbed.builtins.partitioners import split_train_test
from testbed.cache import FederationCache, training_key
from testbed.data import ImageDataset
from testbed.engines import Engine, InProcess, TrainingSetup
from testbed.federation import (
    ClientData,
    FederationState,
    LocalConfig,
    UpdatePolicy,
    get_weights,
    seeded,
    set_weights,
)
from testbed.metrics import mean_std
from testbed.pluginmanager import Host
from testbed.scenario import Scenario, Task, resolved_dict
from testbed.state import InferenceBatch, derive_seed, generator
from testbed.transfer import clean_accuracy, deploy, run_attack

SCHEMA_VERSION = 1
log = logging.getLogger("testbed")
log.propagate = False  # ART configures the root logger; our log goes to run.log only


class RunError(Exception):
    """A run cannot proceed because of its input (data, device, folder); one line."""


def resolve_device(pref: str) -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise RunError("device 'cuda' requested but no CUDA device is available")
    return torch.device(pref)


# --------------------------------------------------------------------------------------
# Files: atomic writes and checkpoints
# --------------------------------------------------------------------------------------


def _json_safe(obj: Any) -> Any:
    """Strict JSON: NaN (an undefined rate) becomes null, infinity the string "inf"."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else ("inf" if math.isinf(obj) else obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _torch_save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Checkpoints:
    root: Path

    def _dir(self, task: str) -> Path:
        d = self.root / task
        d.mkdir(parents=True, exist_ok=True)
        return d

    def save_training(self, task: str, seed: int, payload: dict[str, Any]) -> None:
        _torch_save_atomic(payload, self._dir(task) / f"seed{seed}.train.pt")

    def load_training(self, task: str, seed: int) -> dict[str, Any] | None:
        path = self.root / task / f"seed{seed}.train.pt"
        # weights_only: a checkpoint is data, never code
        return torch.load(path, weights_only=True) if path.exists() else None

    def save_json(self, task: str, seed: int, kind: str, obj: Any) -> None:
        write_json(self._dir(task) / f"seed{seed}.{kind}.json", obj)

    def load_json(self, task: str, seed: int, kind: str) -> Any:
        path = self.root / task / f"seed{seed}.{kind}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def any(self) -> bool:
        return self.root.is_dir() and any(self.root.rglob("*.pt"))


def safe_name(label: str) -> str:
    """A label as a file name: letters, digits, '.', '_' and '-' only."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label)


def partial_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.partial"


def final_dir_of(path: Path) -> Path:
    """Accept either a run folder or its hidden partial folder."""
    name = path.name
    if name.startswith(".") and name.endswith(".partial"):
        return path.parent / name[1 : -len(".partial")]
    return path


@contextmanager
def staged_run_dir(final: Path, resume: bool) -> Iterator[Path]:
    """Yield the partial folder; rename it to `final` only when the run completes. On a
    failure before the first checkpoint the folder is removed (nothing to resume);
    after that it stays, for `--resume`."""
    staging = partial_dir(final)
    if final.exists():
        raise RunError(f"run folder {final} already exists" + (" (complete)" if resume else ""))
    if resume:
        if not staging.is_dir():
            raise RunError(f"nothing to resume: {staging} does not exist")
    else:
        if staging.exists():
            raise RunError(
                f"an interrupted run is in {staging}: resume it with "
                f"`testbed run --resume {final}` or delete it"
            )
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    try:
        yield staging
    except BaseException:
        if not Checkpoints(staging / "checkpoint").any():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    os.replace(staging, final)


# --------------------------------------------------------------------------------------
# One task and seed
# --------------------------------------------------------------------------------------


def _client_training_inputs(host: Host, cid: int, x: torch.Tensor) -> torch.Tensor:
    """A client's training images through its own input pipeline, if a plugin sets one."""
    if not host.pm.hook.testbed_training_inputs.get_hookimpls():
        return x
    batch = InferenceBatch(cid, x.float().div(255))
    host.hook.testbed_training_inputs(batch=batch)
    return batch.x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def make_clients(
    ds: ImageDataset, scenario: Scenario, host: Host, seed: int, device: torch.device
) -> list[ClientData]:
    n = scenario.federation.clients
    spec = scenario.partition
    partition = host.registry.build("partitioners", spec.name, spec.params)
    try:
        parts = partition(ds.y, n, generator(seed, "partition"))
    except ValueError as exc:  # the data cannot be split this way: a scenario mistake
        raise RunError(f"partitioner {spec.name!r}: {exc}") from None
    clients = []
    for cid, idx in enumerate(parts):
        tr, te = split_train_test(idx, ds.y, spec.train_fraction, generator(seed, "split", cid))
        if len(tr) == 0 or len(te) == 0:
            raise RunError(
                f"client {cid} got {len(tr)} training and {len(te)} test images; "
                "use fewer clients or more data"
            )
        x_train = _client_training_inputs(host, cid, ds.x[tr])
        on = [t.to(device) for t in (x_train, ds.y[tr], ds.x[te], ds.y[te])]
        clients.append(ClientData(cid, *on))
    return clients


def build_model(scenario: Scenario, host: Host, ds: ImageDataset, seed: int) -> torch.nn.Module:
    mean, std = ds.channel_stats()
    spec = scenario.model
    with seeded(derive_seed(seed, "init"), torch.device("cpu")):
        try:
            return host.registry.build(
                "models",
                spec.name,
                spec.params,
                in_channels=ds.channels,
                image_size=ds.image_size,
                num_classes=len(ds.classes),
                mean=mean,
                std=std,
            )
        except ValueError as exc:  # e.g. images too small for the model's poolings
            raise RunError(f"model {spec.name!r}: {exc}") from None


def _plugin_states(objs: list[object]) -> list[Any]:
    return [o.state_dict() if hasattr(o, "state_dict") else None for o in objs]


def _load_plugin_states(objs: list[object], states: list[Any]) -> None:
    for o, st in zip(objs, states, strict=True):
        if st is not None:
            o.load_state_dict(st)  # type: ignore[attr-defined]


@dataclass
class Bars:
    """Progress bars with ETA over rounds, clients and attacks."""

    progress: Progress | None

    def add(self, label: str, total: int) -> TaskID | None:
        return self.progress.add_task(label, total=total) if self.progress else None

    def advance(self, task: TaskID | None) -> None:
        if self.progress is not None and task is not None:
            self.progress.advance(task)

    def reset(self, task: TaskID | None, total: int, completed: int = 0) -> None:
        if self.progress is not None and task is not None:
            self.progress.reset(task, total=total, completed=completed)


@dataclass(frozen=True)
class Repeat:
    """One (task, seed) of a run and where its results go."""

    scenario: Scenario
    task: Task
    host: Host
    ds: ImageDataset
    seed: int
    device: torch.device
    data_root: Path | None
    engine: Engine
    bars: Bars
    ckpt: Checkpoints
    label: str
    cache: FederationCache
    use_cache: bool
    examples_dir: Path


def per_run_objects(scenario: Scenario, host: Host) -> list[object]:
    """A fresh DP mechanism and defence objects for one repeat (they hold its state)."""
    specs = [
        (k, spec) for _, k, spec in scenario.components() if k in ("dp_mechanisms", "defences")
    ]
    objs = [host.registry.build(kind, spec.name, spec.params) for kind, spec in specs]
    # testbed_local_training is firstresult: a second trainer would silently never run.
    trainers = [
        s.name
        for (_, s), o in zip(specs, objs, strict=True)
        if hasattr(o, "testbed_local_training")
    ]
    if len(trainers) > 1:
        raise RunError(
            f"{' and '.join(trainers)} both replace local training; only one can run per client"
        )
    return objs


def run_repeat(job: Repeat) -> tuple[dict[str, Any], list[torch.nn.Module]]:
    per_run = per_run_objects(job.scenario, job.host)
    with job.host.active(per_run):
        return _run_repeat(job, per_run)


def _run_repeat(job: Repeat, per_run: list[object]) -> tuple[dict[str, Any], list[torch.nn.Module]]:
    scenario, task, host, ds, seed, device = (
        job.scenario, job.task, job.host, job.ds, job.seed, job.device
    )  # fmt: skip
    bars, ckpt, label, cache = job.bars, job.ckpt, job.label, job.cache
    fed = scenario.federation
    clients = make_clients(ds, scenario, host, seed, device)
    model = build_model(scenario, host, ds, seed).to(device)
    cfg = LocalConfig(
        fed.local_epochs, fed.batch_size, fed.lr, fed.momentum, fed.weight_decay, task.data.augment
    )
    policy = UpdatePolicy(fed.max_update_norm, fed.on_excess_norm)
    agg = scenario.aggregator
    aggregator = host.registry.build("aggregators", agg.name, agg.params)
    adversaries = (
        list(range(fed.clients))
        if scenario.threat_model.adversaries == "rotate"
        else list(scenario.threat_model.adversaries)
    )

    key = training_key(scenario, task, seed, device)
    saved = ckpt.load_training(task.name, seed)
    cached = cache.load(key) if saved is None and job.use_cache else None
    if cached is not None:
        state = FederationState(
            fed.rounds,
            cached["global"].to(device),
            {c: w.to(device) for c, w in cached["clients"].items()},
            cached["history"],
        )
        round_times = cached["round_s"]
        log.info("%s seed %d: trained federation from the cache (%s)", task.name, seed, key)
    elif saved is None:
        init = get_weights(model)
        state = FederationState(0, init, {c: init.clone() for c in range(fed.clients)})
        round_times: list[float] = []
    else:
        state = FederationState(
            saved["round"],
            saved["global"].to(device),
            {c: w.to(device) for c, w in saved["clients"].items()},
            saved["history"],
        )
        round_times = saved["round_s"]
        _load_plugin_states(per_run, saved["plugins"])
        log.info("%s seed %d: resumed after round %d", task.name, seed, state.round)

    rounds_bar = bars.add(f"{label} rounds", fed.rounds)
    clients_bar = bars.add(f"{label} clients", fed.m)
    attacks_bar = bars.add(f"{label} attacks", len(scenario.attacks) * len(adversaries))
    bars.reset(rounds_bar, fed.rounds, state.round)

    if state.round < fed.rounds:
        setup = TrainingSetup(
            scenario, task, seed, device, job.data_root, host, model, clients, cfg,
            aggregator, policy, per_run,
        )  # fmt: skip
        step = job.engine.round_step(setup)
    while state.round < fed.rounds:
        t0 = time.perf_counter()
        bars.reset(clients_bar, fed.m)
        state = step(state, lambda _: bars.advance(clients_bar))
        if scenario.report.save_round_weights:
            _save_round_weights(job, state)
        round_times.append(time.perf_counter() - t0)
        rec = state.history[-1]
        for ev in rec["events"]:
            log.warning("%s seed %d round %d: %s", task.name, seed, rec["round"], ev)
        log.info(
            "%s seed %d round %d: loss %s (%.2f s)",
            task.name, seed, rec["round"], rec["train_loss"], round_times[-1],
        )  # fmt: skip
        ckpt.save_training(
            task.name,
            seed,
            {
                "round": state.round,
                "global": state.global_weights.cpu(),
                "clients": {c: w.cpu() for c, w in state.client_weights.items()},
                "history": state.history,
                "round_s": round_times,
                "plugins": _plugin_states(per_run),
            },
        )
        bars.advance(rounds_bar)
    if cached is not None:
        privacy = cached["privacy"]
    else:
        privacy = [p for p in host.hook.testbed_privacy_spent() if p]
        cache.save(
            key,
            {
                "global": state.global_weights.cpu(),
                "clients": {c: w.cpu() for c, w in state.client_weights.items()},
                "history": state.history,
                "round_s": round_times,
                "privacy": privacy,
            },
        )

    finals = []
    for cid in range(fed.clients):
        m = build_model(scenario, host, ds, seed).to(device)
        set_weights(m, state.client_weights[cid])
        finals.append(m)
    deployed = deploy(finals)
    acc = clean_accuracy(deployed, clients, host.hook)
    attacks: dict[str, Any] = ckpt.load_json(task.name, seed, "attacks") or {}
    bars.reset(attacks_bar, len(scenario.attacks) * len(adversaries), 0)
    for spec in scenario.attacks:
        if spec.label not in attacks:
            attacks[spec.label], example = run_attack(
                spec, deployed, clients, adversaries, host.registry, host.hook,
                seed=seed, samples=scenario.threat_model.samples_per_adversary,
                num_classes=len(ds.classes), device=device,
                on_adversary_done=lambda: bars.advance(attacks_bar),
            )  # fmt: skip
            _torch_save_atomic(example, job.examples_dir / f"seed{seed}_{safe_name(spec.label)}.pt")
            ckpt.save_json(task.name, seed, "attacks", attacks)
        else:
            for _ in adversaries:
                bars.advance(attacks_bar)
    events = [{"round": r["round"], **e} for r in state.history for e in r["events"]]
    metrics = {
        "seed": seed,
        "cache": {"key": key, "hit": cached is not None},
        "clients": [
            {
                "id": c.client_id,
                "train": c.n_train,
                "test": int(c.y_test.shape[0]),
                "train_label_counts": torch.bincount(
                    c.y_train.cpu(), minlength=len(ds.classes)
                ).tolist(),
            }
            for c in clients
        ],
        "acc": acc,
        "acc_mean": sum(acc.values()) / len(acc),
        "attacks": {spec.label: attacks[spec.label] for spec in scenario.attacks},
        "privacy": privacy,
        "events": events,
        "rounds": state.history,
        "timing": {"round_s": round_times, "train_s": sum(round_times)},
    }
    return metrics, finals


def _save_round_weights(job: Repeat, state: FederationState) -> None:
    """The global model after each round (report.save_round_weights), for trajectory
    analysis and the engines' equivalence test."""
    wdir = job.ckpt.root.parent / "weights" / job.task.name
    wdir.mkdir(parents=True, exist_ok=True)
    _torch_save_atomic(
        state.global_weights.cpu(), wdir / f"seed{job.seed}_round{state.round}_global.pt"
    )


def summarise(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    attacks: dict[str, Any] = {}
    for label in repeats[0]["attacks"]:
        rows = [r["attacks"][label] for r in repeats]
        attacks[label] = {
            key: mean_std([_num(row[key]) for row in rows])
            for key in ("aasr", "aasr_own", "aasr_benign", "aetr")
        }
        attacks[label]["cost_s"] = mean_std([c for row in rows for c in row["cost_s"]])
    eps = [_num(p["epsilon"]) for r in repeats for p in r["privacy"]]
    return {
        "acc_mean": mean_std([r["acc_mean"] for r in repeats]),
        "attacks": attacks,
        "epsilon": mean_std(eps) if eps else None,
        "events": sum(len(r["events"]) for r in repeats),
        "round_s": mean_std([t for r in repeats for t in r["timing"]["round_s"]]),
    }


def _num(v: Any) -> float:
    """Undo _json_safe for values that come back from a checkpoint."""
    if v is None:
        return math.nan
    if v == "inf":
        return math.inf
    return float(v)


def run_task(
    scenario: Scenario,
    task: Task,
    host: Host,
    data_root: Path | None,
    device: torch.device,
    bars: Bars,
    run_dir: Path,
    use_cache: bool,
    engine: Engine,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    spec = task.data
    ds = host.registry.build("datasets", spec.name, spec.params, data_root=data_root)
    load_s = time.perf_counter() - t0
    log.info(
        "task %s: %d images %s, loaded in %.1f s", task.name, len(ds), tuple(ds.x.shape[1:]), load_s
    )
    ckpt = Checkpoints(run_dir / "checkpoint")
    cache = FederationCache(cache_dir() / "federations")
    seeds = scenario.seeds()
    repeats = []
    for r, seed in enumerate(seeds):
        done = ckpt.load_json(task.name, seed, "done")
        if done is not None:
            repeats.append(done)
            continue
        label = task.name + (f" [{r + 1}/{len(seeds)}]" if len(seeds) > 1 else "")
        examples_dir = run_dir / "examples" / task.name
        examples_dir.mkdir(parents=True, exist_ok=True)
        job = Repeat(
            scenario, task, host, ds, seed, device, data_root, engine, bars, ckpt, label,
            cache, use_cache, examples_dir,
        )  # fmt: skip
        metrics, finals = run_repeat(job)
        if scenario.report.save_weights:
            wdir = run_dir / "weights" / task.name
            wdir.mkdir(parents=True, exist_ok=True)
            for cid, m in enumerate(finals):
                _torch_save_atomic(m.state_dict(), wdir / f"seed{seed}_client{cid}.pt")
        ckpt.save_json(task.name, seed, "done", metrics)
        repeats.append(json.loads(json.dumps(_json_safe(metrics))))
    return {
        "dataset": {
            "name": spec.name,
            "images": len(ds),
            "shape": list(ds.x.shape[1:]),
            "classes": list(ds.classes),
            "info": ds.info,
        },
        "repeats": repeats,
        "summary": summarise(repeats),
        "timing": {"dataset_load_s": load_s},
    }


# --------------------------------------------------------------------------------------
# The whole scenario
# --------------------------------------------------------------------------------------


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]


def default_run_dir(scenario: Scenario) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path(scenario.report.out_dir) / f"{scenario.scenario.name}-{stamp}"


def hardware(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def make_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


def write_report(run_dir: Path, metrics: dict[str, Any]) -> None:
    from testbed.report import markdown

    tmp = run_dir / "report.md.tmp"
    tmp.write_text(markdown(metrics))
    os.replace(tmp, run_dir / "report.md")


def run_scenario(
    scenario: Scenario,
    host: Host,
    *,
    data_root: Path | None,
    out: Path | None = None,
    resume: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
    on_start: Callable[[Path], None] | None = None,
    use_cache: bool = True,
    engine: Engine | None = None,
) -> RunResult:
    """Run every task and seed of the scenario into a run folder. ``engine`` defaults to
    the scenario's: in-process, or a Flower simulation started here for the whole run; a
    Flower ServerApp passes its own (deployment)."""
    console = console or Console(stderr=True)
    device = resolve_device(scenario.federation.device)
    final_dir = out or default_run_dir(scenario)
    t_start = time.perf_counter()
    with staged_run_dir(final_dir, resume) as run_dir:
        if on_start:
            on_start(final_dir)
        handler = logging.FileHandler(run_dir / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            if not resume:
                write_json(run_dir / "scenario.json", resolved_dict(scenario))

            def run_tasks(engine: Engine) -> dict[str, Any]:
                tasks = {}
                progress = make_progress(console) if show_progress else None
                with progress if progress is not None else nullcontext():
                    for task in scenario.task_list():
                        tasks[task.name] = run_task(
                            scenario, task, host, data_root, device, Bars(progress), run_dir,
                            use_cache, engine,
                        )  # fmt: skip
                return tasks

            if engine is not None:
                tasks = run_tasks(engine)
            elif scenario.engine.name == "flower":
                try:
                    from testbed.flower.simulation import simulate
                except ImportError as exc:
                    raise RunError(
                        f"engine 'flower' needs the flower extra "
                        f"(pip install -e '.[flower]'): {exc}"
                    ) from None
                tasks = simulate(scenario, device, run_tasks)
            else:
                tasks = run_tasks(InProcess())
            result = {
                "schema_version": SCHEMA_VERSION,
                "testbed_version": __version__,
                "scenario": scenario.scenario.name,
                "seeds": scenario.seeds(),
                "tasks": tasks,
                "hardware": hardware(device),
                "engine": scenario.engine.model_dump(mode="json"),
                "timing": {"total_s": time.perf_counter() - t_start},
            }
            result = json.loads(json.dumps(_json_safe(result)))
            if scenario.report.plots:
                from testbed.plots import write_plots

                plots = []
                for name, task_result in tasks.items():
                    title = f"{scenario.scenario.name}/{name}"
                    plots += write_plots(
                        title, task_result, run_dir / "plots" / name, run_dir / "examples" / name
                    )
                result["plots"] = [str(p.relative_to(run_dir)) for p in plots]
            write_json(run_dir / "metrics.json", result)
            write_report(run_dir, result)
            shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
        finally:
            log.removeHandler(handler)
            handler.close()
    return RunResult(final_dir, result)
