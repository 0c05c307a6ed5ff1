"""Run a scenario: for each seed, train the federation, then attack; write the run folder."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from testbed import __version__
from testbed.builtins.partitioners import split_train_test
from testbed.data import ImageDataset
from testbed.federation import (
    ClientData,
    FederationState,
    LocalConfig,
    get_weights,
    run_round,
    seeded,
    set_weights,
)
from testbed.metrics import mean_std
from testbed.pluginmanager import Host
from testbed.scenario import Scenario, Task, resolved_dict
from testbed.state import derive_seed, generator
from testbed.transfer import deploy, evaluate_transfer

SCHEMA_VERSION = 1
log = logging.getLogger("testbed")
log.propagate = False  # ART configures the root logger; our log goes to run.log only


class RunError(Exception):
    """A run cannot proceed because of its input (data, device); one line for the user."""


def resolve_device(pref: str) -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise RunError("device 'cuda' requested but no CUDA device is available")
    return torch.device(pref)


def make_clients(
    ds: ImageDataset, scenario: Scenario, host: Host, seed: int, device: torch.device
) -> list[ClientData]:
    n = scenario.federation.clients
    spec = scenario.partition
    partition = host.registry.build("partitioners", spec.name, spec.params)
    parts = partition(ds.y, n, generator(seed, "partition"))
    clients = []
    for cid, idx in enumerate(parts):
        tr, te = split_train_test(idx, ds.y, spec.train_fraction, generator(seed, "split", cid))
        if len(tr) == 0 or len(te) == 0:
            raise RunError(
                f"client {cid} got {len(tr)} training and {len(te)} test images; "
                "use fewer clients or more data"
            )
        clients.append(
            ClientData(
                cid,
                ds.x[tr].to(device),
                ds.y[tr].to(device),
                ds.x[te].to(device),
                ds.y[te].to(device),
            )
        )
    return clients


def build_model(scenario: Scenario, host: Host, ds: ImageDataset, seed: int) -> torch.nn.Module:
    mean, std = ds.channel_stats()
    spec = scenario.model
    with seeded(derive_seed(seed, "init"), torch.device("cpu")):
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


def make_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def run_repeat(
    scenario: Scenario,
    task: Task,
    host: Host,
    ds: ImageDataset,
    seed: int,
    device: torch.device,
    progress: Progress | None,
    label: str,
) -> tuple[dict[str, Any], list[torch.nn.Module]]:
    fed = scenario.federation
    clients = make_clients(ds, scenario, host, seed, device)
    model = build_model(scenario, host, ds, seed).to(device)
    init = get_weights(model)
    state = FederationState(0, init, {c: init.clone() for c in range(fed.clients)})
    cfg = LocalConfig(
        fed.local_epochs,
        fed.batch_size,
        fed.lr,
        fed.momentum,
        fed.weight_decay,
        task.data.augment,
    )
    aggregator = host.registry.build(
        "aggregators", scenario.aggregator.name, scenario.aggregator.params
    )
    per_run = [
        host.registry.build(kind, spec.name, spec.params)
        for _, kind, spec in scenario.components()
        if kind in ("dp_mechanisms", "defences")
    ]
    adversaries = (
        list(range(fed.clients))
        if scenario.threat_model.adversaries == "rotate"
        else list(scenario.threat_model.adversaries)
    )
    rounds_task = clients_task = attack_task = None
    if progress is not None:
        rounds_task = progress.add_task(f"{label} rounds", total=fed.rounds)
        clients_task = progress.add_task(f"{label} clients", total=fed.m)
        attack_task = progress.add_task(
            f"{label} attacks", total=len(scenario.attacks) * len(adversaries)
        )

    def client_done(_: int) -> None:
        if progress is not None:
            progress.advance(clients_task)

    round_times = []
    with host.active(per_run):
        for _ in range(fed.rounds):
            t0 = time.perf_counter()
            if progress is not None:
                progress.reset(clients_task, total=fed.m)
            state = run_round(
                state,
                model,
                clients,
                cfg,
                aggregator,
                host.hook,
                seed=seed,
                rounds=fed.rounds,
                m=fed.m,
                on_client_done=client_done,
            )
            round_times.append(time.perf_counter() - t0)
            rec = state.history[-1]
            log.info(
                "seed %d round %d: loss %s (%.2f s)",
                seed,
                rec["round"],
                rec["train_loss"],
                round_times[-1],
            )
            if progress is not None:
                progress.advance(rounds_task)
        privacy = [p for p in host.hook.testbed_privacy_spent() if p]

        finals = []
        for cid in range(fed.clients):
            m = build_model(scenario, host, ds, seed).to(device)
            set_weights(m, state.client_weights[cid])
            finals.append(m)
        t0 = time.perf_counter()
        evaluation = evaluate_transfer(
            deploy(finals),
            clients,
            scenario.attacks,
            adversaries,
            host.registry,
            host.hook,
            seed=seed,
            samples=scenario.threat_model.samples_per_adversary,
            num_classes=len(ds.classes),
            device=device,
            on_attack_done=(lambda: progress.advance(attack_task)) if progress else None,
        )
        attack_time = time.perf_counter() - t0
    metrics = {
        "seed": seed,
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
        **evaluation,
        "privacy": privacy,
        "rounds": state.history,
        "timing": {
            "round_s": round_times,
            "train_s": sum(round_times),
            "attack_phase_s": attack_time,
        },
    }
    return metrics, finals


def summarise(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    attacks: dict[str, Any] = {}
    for label in repeats[0]["attacks"]:
        rows = [r["attacks"][label] for r in repeats]
        attacks[label] = {
            key: mean_std([row[key] for row in rows])
            for key in ("aasr", "aasr_own", "aasr_benign", "aetr")
        }
        attacks[label]["cost_s"] = mean_std([c for row in rows for c in row["cost_s"]])
    eps = [p["epsilon"] for r in repeats for p in r["privacy"]]
    return {
        "acc_mean": mean_std([r["acc_mean"] for r in repeats]),
        "attacks": attacks,
        "epsilon": mean_std(eps) if eps else None,
        "round_s": mean_std([t for r in repeats for t in r["timing"]["round_s"]]),
    }


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) else ("inf" if math.isinf(obj) else obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


@contextmanager
def staged_run_dir(final: Path) -> Iterator[Path]:
    """Build the run folder under a hidden name and rename it only when complete, so a
    failed or interrupted run never leaves a half-written report."""
    if final.exists():
        raise RunError(f"run folder {final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.replace(staging, final)


def run_task(
    scenario: Scenario,
    task: Task,
    host: Host,
    data_root: Path | None,
    device: torch.device,
    progress: Progress | None,
    run_dir: Path,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    spec = task.data
    ds = host.registry.build("datasets", spec.name, spec.params, data_root=data_root)
    load_s = time.perf_counter() - t0
    log.info(
        "task %s: %d images %s, loaded in %.1f s", task.name, len(ds), tuple(ds.x.shape[1:]), load_s
    )
    seeds = scenario.seeds()
    repeats = []
    for r, seed in enumerate(seeds):
        label = task.name + (f" [{r + 1}/{len(seeds)}]" if len(seeds) > 1 else "")
        metrics, finals = run_repeat(scenario, task, host, ds, seed, device, progress, label)
        repeats.append(metrics)
        if scenario.report.save_weights:
            wdir = run_dir / "weights" / task.name
            wdir.mkdir(parents=True, exist_ok=True)
            for cid, m in enumerate(finals):
                torch.save(m.state_dict(), wdir / f"seed{seed}_client{cid}.pt")
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


def run_scenario(
    scenario: Scenario,
    host: Host,
    *,
    data_root: Path | None,
    out: Path | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> RunResult:
    console = console or Console(stderr=True)
    device = resolve_device(scenario.federation.device)
    final_dir = out or default_run_dir(scenario)
    t_start = time.perf_counter()
    with staged_run_dir(final_dir) as run_dir:
        handler = logging.FileHandler(run_dir / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            write_json(run_dir / "scenario.json", resolved_dict(scenario))
            tasks = {}
            progress = make_progress(console) if show_progress else None
            with progress if progress is not None else _null():
                for task in scenario.task_list():
                    tasks[task.name] = run_task(
                        scenario, task, host, data_root, device, progress, run_dir
                    )
            result = {
                "schema_version": SCHEMA_VERSION,
                "testbed_version": __version__,
                "scenario": scenario.scenario.name,
                "seeds": scenario.seeds(),
                "tasks": tasks,
                "hardware": hardware(device),
                "timing": {"total_s": time.perf_counter() - t_start},
            }
            if scenario.report.plots:
                from testbed.plots import write_plots

                for name, task_result in tasks.items():
                    write_plots(
                        f"{scenario.scenario.name}/{name}", task_result, run_dir / "plots" / name
                    )
            write_json(run_dir / "metrics.json", result)
        finally:
            log.removeHandler(handler)
            handler.close()
    return RunResult(final_dir, result)


@contextmanager
def _null() -> Iterator[None]:
    yield
