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
import os
import platform
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from testbed import __version__
from testbed.assemble import (
    build_model,
    load_plugin_states,
    make_clients,
    make_server,
    per_run_objects,
    plugin_states,
)
from testbed.builtins.datasets import cache_dir
from testbed.cache import BadEntry, FederationCache, check_entry, training_key
from testbed.data import ImageDataset
from testbed.engines import Engine, TrainingSetup
from testbed.explain import explain_for_run
from testbed.federation import (
    FederationState,
    LocalConfig,
    UpdatePolicy,
    get_weights,
    set_weights,
)
from testbed.fingerprint import code_fingerprint, data_fingerprint
from testbed.outsider import run_outsider
from testbed.pluginmanager import Host
from testbed.poisoning_run import (
    build_threat,
    poisoning_metrics,
    threat_key,
    threat_warnings,
)
from testbed.progress import Bars, make_progress
from testbed.robust_eval import evaluate_repeat
from testbed.rundir import (
    Checkpoints,
    RunError,
    check_same,
    file_digest,
    final_dir_of,
    json_safe,
    partial_dir,
    safe_name,
    staged_run_dir,
    torch_save_atomic,
    write_json,
)
from testbed.scenario import Scenario, Task, resolved_dict
from testbed.state import derive_seed
from testbed.summary import summarise
from testbed.threat import malicious_clients
from testbed.transfer import clean_accuracy, deploy, run_attack, target_problem

SCHEMA_VERSION = 1
log = logging.getLogger("testbed")
log.propagate = False  # ART configures the root logger; our log goes to run.log only

__all__ = [
    "RunError",
    "build_model",
    "final_dir_of",
    "make_clients",
    "partial_dir",
    "per_run_objects",
    "run_scenario",
    "write_json",
]


def resolve_device(pref: str) -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise RunError("device 'cuda' requested but no CUDA device is available")
    return torch.device(pref)


# --------------------------------------------------------------------------------------
# One task and seed
# --------------------------------------------------------------------------------------


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
    data_fp: str
    """The decoded dataset's content fingerprint."""
    code_fp: dict[str, str]
    """Module -> source digest of testbed and every loaded plugin."""
    warn: Callable[[str], None]


def training_defences(scenario: Scenario, host: Host) -> list[dict[str, Any]]:
    """The defences that act during training: the only ones the cache key depends on."""
    reg = host.registry["defences"]
    return [
        d.model_dump(mode="json") for d in scenario.defences if reg.get(d.name).stage != "inference"
    ]


def _load_cached(job: Repeat, key: str, numel: int) -> dict[str, Any] | None:
    """A usable cache entry, or None; a bad entry is discarded with a warning."""
    fed = job.scenario.federation
    try:
        cached = job.cache.load(key)
        if cached is not None:
            check_entry(cached, clients=fed.clients, rounds=fed.rounds, numel=numel)
    except BadEntry as exc:
        job.warn(f"cache entry {key} discarded ({exc}); retraining")
        log.warning("%s seed %d: cache entry %s discarded: %s", job.task.name, job.seed, key, exc)
        job.cache.discard(key)
        return None
    return cached


def _load_checkpoint(job: Repeat, numel: int) -> dict[str, Any] | None:
    saved = job.ckpt.load_training(job.task.name, job.seed)
    if saved is not None:
        try:
            check_entry(
                {**saved, "privacy": []},
                clients=job.scenario.federation.clients,
                rounds=int(saved["round"]),
                numel=numel,
            )
        except (BadEntry, TypeError, ValueError) as exc:
            raise RunError(
                f"the training checkpoint of {job.task.name} seed {job.seed} does not belong "
                f"to this run ({exc})"
            ) from None
    return saved


def adversaries_of(scenario: Scenario, seed: int) -> list[int]:
    """The clients that craft attacks in the repeat of ``seed`` (the threat model's)."""
    n, adv = scenario.federation.clients, scenario.threat_model.adversaries
    if adv == "rotate":
        return list(range(n))
    if adv == "malicious":
        return list(malicious_clients(scenario.threat_model, n, seed))
    return list(adv)


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
    # the server's root set (FLTrust): the examples make_clients kept from every client
    server = make_server(ds, scenario, aggregator, seed, device, model, cfg)
    adversaries = adversaries_of(scenario, seed)
    threat = build_threat(scenario, host, seed)
    warnings = threat_warnings(scenario, threat) if threat is not None else []
    for w in warnings:
        job.warn(w)

    key = training_key(
        scenario, task, seed, device, data=job.data_fp, code=job.code_fp,
        training_defences=training_defences(scenario, host), threat=threat_key(scenario),
        root_set=server.spec.key() if server is not None else None,
    )  # fmt: skip
    numel = sum(p.numel() for p in model.parameters())
    saved = _load_checkpoint(job, numel)
    cached = _load_cached(job, key, numel) if saved is None and job.use_cache else None
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
        load_plugin_states(per_run, saved["plugins"])
        load_plugin_states([aggregator], [saved.get("aggregator")])
        log.info("%s seed %d: resumed after round %d", task.name, seed, state.round)

    rounds_bar = bars.add(f"{label} rounds", fed.rounds)
    clients_bar = bars.add(f"{label} clients", fed.m)
    attacks_bar = bars.add(f"{label} attacks", len(scenario.attacks) * len(adversaries))
    bars.reset(rounds_bar, fed.rounds, state.round)

    if state.round < fed.rounds:
        setup = TrainingSetup(
            scenario, task, seed, device, job.data_root, host, model, clients, cfg,
            aggregator, policy, per_run, threat, server,
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
                "plugins": plugin_states(per_run),
                "aggregator": plugin_states([aggregator])[0],
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
    acc = clean_accuracy(deployed, clients, host.hook, seed)
    attacks: dict[str, Any] = ckpt.load_json(task.name, seed, "attacks") or {}
    bars.reset(attacks_bar, len(scenario.attacks) * len(adversaries), 0)
    for spec in scenario.attacks:
        if spec.label not in attacks:
            attacks[spec.label], example = run_attack(
                spec, deployed, clients, adversaries, host.registry, host.hook,
                seed=seed, samples=scenario.threat_model.samples_per_adversary,
                num_classes=len(ds.classes), device=device,
                on_adversary_done=lambda: bars.advance(attacks_bar), classes=ds.classes,
                keep=scenario.explain.images if scenario.explain else 0,
            )  # fmt: skip
            if (batch := example.pop("batch", None)) is not None:  # [explain] (explain.py)
                attacks[spec.label]["explain"], fig = explain_for_run(
                    scenario.explain, finals, adversaries[0], batch
                )
                name = f"seed{seed}_{safe_name(spec.label)}_explain.pt"
                torch_save_atomic(fig, job.examples_dir / name)
            torch_save_atomic(example, job.examples_dir / f"seed{seed}_{safe_name(spec.label)}.pt")
            ckpt.save_json(task.name, seed, "attacks", attacks)
        else:
            for _ in adversaries:
                bars.advance(attacks_bar)
    outsider = None
    if scenario.outsider is not None:  # crafted on surrogates trained on own data only
        outsider = run_outsider(
            scenario.attacks, deployed, clients, adversaries,
            lambda: build_model(scenario, host, ds, derive_seed(seed, "outsider")),
            cfg, scenario.outsider.epochs, host.registry, host.hook,
            seed=seed, samples=scenario.threat_model.samples_per_adversary,
            num_classes=len(ds.classes), device=device, classes=ds.classes,
            done=ckpt.load_json(task.name, seed, "outsider"),
            on_attack_done=lambda r: ckpt.save_json(task.name, seed, "outsider", r),
        )  # fmt: skip
    events = [{"round": r["round"], **e} for r in state.history for e in r["events"]]
    if threat is not None:
        poisoning = poisoning_metrics(
            threat, deployed, clients, host.hook, seed=seed, num_classes=len(ds.classes),
            acc=acc, history=state.history, warnings=warnings,
        )  # fmt: skip
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
        # robust accuracy over the attacks and Carlini et al.'s sanity checks
        "robustness": evaluate_repeat(
            {spec.label: attacks[spec.label] for spec in scenario.attacks}
        ),
        "privacy": privacy,
        "events": events,
        "rounds": state.history,
        "timing": {"round_s": round_times, "train_s": sum(round_times)},
    }
    if threat is not None:
        metrics["poisoning"] = poisoning
    if server is not None:
        metrics["server"] = {"root_set": server.info()}
    if outsider is not None:
        metrics["outsider"] = outsider
    return metrics, finals


def _save_round_weights(job: Repeat, state: FederationState) -> None:
    """The global model after each round (report.save_round_weights), for trajectory
    analysis and the engines' equivalence test."""
    wdir = job.ckpt.root.parent / "weights" / safe_name(job.task.name)
    wdir.mkdir(parents=True, exist_ok=True)
    torch_save_atomic(
        state.global_weights.cpu(), wdir / f"seed{job.seed}_round{state.round}_global.pt"
    )


def _check_task_data(ckpt: Checkpoints, task: str, ds: ImageDataset) -> str:
    """The dataset's fingerprint, recorded in the run's manifest the first time; a resume
    that loads other data (another --data-root, a changed copy) is refused."""
    fp = data_fingerprint(ds)
    manifest = ckpt.read_manifest()
    recorded = manifest.setdefault("data", {})
    if task in recorded and recorded[task] != fp:
        raise RunError(
            f"task {task}: the data differs from the data this run started with "
            "(another --data-root or a changed dataset); resume with the same data"
        )
    if task not in recorded:
        recorded[task] = fp
        ckpt.write_manifest(manifest)
    return fp


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
    code_fp: dict[str, str],
    warn: Callable[[str], None],
) -> dict[str, Any]:
    t0 = time.perf_counter()
    spec = task.data
    ds = host.registry.build("datasets", spec.name, spec.params, data_root=data_root)
    load_s = time.perf_counter() - t0
    log.info(
        "task %s: %d images %s, loaded in %.1f s", task.name, len(ds), tuple(ds.x.shape[1:]), load_s
    )
    for spec_ in scenario.attacks:  # before any training: it may take hours
        if problem := target_problem(spec_, ds.classes):
            raise RunError(f"task {task.name}: {problem}")
    ckpt = Checkpoints(run_dir / "checkpoint")
    data_fp = _check_task_data(ckpt, task.name, ds)
    cache = FederationCache(cache_dir() / "federations")
    seeds = scenario.seeds()
    repeats = []
    for r, seed in enumerate(seeds):
        done = ckpt.load_json(task.name, seed, "done")
        if done is not None:
            repeats.append(done)
            continue
        label = task.name + (f" [{r + 1}/{len(seeds)}]" if len(seeds) > 1 else "")
        examples_dir = run_dir / "examples" / safe_name(task.name)
        examples_dir.mkdir(parents=True, exist_ok=True)
        job = Repeat(
            scenario, task, host, ds, seed, device, data_root, engine, bars, ckpt, label,
            cache, use_cache, examples_dir, data_fp, code_fp, warn,
        )  # fmt: skip
        metrics, finals = run_repeat(job)
        if scenario.report.save_weights:
            wdir = run_dir / "weights" / safe_name(task.name)
            wdir.mkdir(parents=True, exist_ok=True)
            for cid, m in enumerate(finals):
                torch_save_atomic(m.state_dict(), wdir / f"seed{seed}_client{cid}.pt")
        ckpt.save_json(task.name, seed, "done", metrics)
        repeats.append(json.loads(json.dumps(json_safe(metrics))))
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


def write_report(run_dir: Path, metrics: dict[str, Any]) -> str | None:
    """report.md, then report.html (testbed/report_html.py); the problem that kept
    report.html from being written, if any: a bug in the page must not cost a run."""
    from testbed.report import markdown
    from testbed.report_html import write_run_html

    tmp = run_dir / "report.md.tmp"
    tmp.write_text(markdown(metrics))
    os.replace(tmp, run_dir / "report.md")
    try:
        write_run_html(run_dir, metrics)
    except Exception as exc:  # reported to the user; the run folder stays
        return f"report.html not written: {type(exc).__name__}: {exc}"
    return None


def _start_or_check_manifest(
    run_dir: Path, scenario: Scenario, code_fp: dict[str, str], resume: bool
) -> None:
    """A new run records what it starts from; a resumed one must match it."""
    ckpt = Checkpoints(run_dir / "checkpoint")
    stored = run_dir / "scenario.json"
    if not resume:
        write_json(stored, resolved_dict(scenario))
        ckpt.write_manifest({"scenario_sha256": file_digest(stored), "code": code_fp, "data": {}})
        return
    manifest = ckpt.read_manifest()
    hint = "start a new run"
    check_same("scenario.json", manifest.get("scenario_sha256"), file_digest(stored), hint)
    check_same(
        "code", manifest.get("code"), code_fp, "finish it with the code that started it, or " + hint
    )


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
            code_fp = code_fingerprint(host)
            _start_or_check_manifest(run_dir, scenario, code_fp, resume)

            def warn(message: str) -> None:
                console.print(f"warning: {message}", style="yellow", markup=False, highlight=False)

            def run_tasks(engine: Engine) -> dict[str, Any]:
                tasks = {}
                progress = make_progress(console) if show_progress else None
                with progress if progress is not None else nullcontext():
                    for task in scenario.task_list():
                        tasks[task.name] = run_task(
                            scenario, task, host, data_root, device, Bars(progress), run_dir,
                            use_cache, engine, code_fp, warn,
                        )  # fmt: skip
                return tasks

            if engine is not None:
                tasks = run_tasks(engine)
            else:  # the scenario's engine, a registered component (testbed/builtins/engines.py)
                runner = host.registry.build("engines", scenario.engine.name, {})
                tasks = runner.run(scenario, device, run_tasks)
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
            result = json.loads(json.dumps(json_safe(result)))
            if scenario.report.plots:
                from testbed.plots import write_plots

                plots = []
                for name, task_result in tasks.items():
                    title = f"{scenario.scenario.name}/{name}"
                    plots += write_plots(
                        title,
                        task_result,
                        run_dir / "plots" / safe_name(name),
                        run_dir / "examples" / safe_name(name),
                    )
                result["plots"] = [str(p.relative_to(run_dir)) for p in plots]
            write_json(run_dir / "metrics.json", result)
            if problem := write_report(run_dir, result):
                warn(problem)
            shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
        finally:
            log.removeHandler(handler)
            handler.close()
    return RunResult(final_dir, result)
