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
    make_clients,
    per_run_objects,
)
from testbed.builtins.dataset_cache import cache_dir
from testbed.cache import FederationCache
from testbed.data import DatasetError, ImageDataset
from testbed.engines import Engine
from testbed.fingerprint import check_code_unchanged, code_fingerprint, data_fingerprint
from testbed.hostinfo import float_path, hardware
from testbed.pluginmanager import Host
from testbed.progress import Bars, make_progress
from testbed.repeat import Repeat, adversaries_of, run_repeat
from testbed.report import hosts_note, markdown
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
from testbed.summary import summarise
from testbed.transfer import target_problem

SCHEMA_VERSION = 1
log = logging.getLogger("testbed")
log.propagate = False  # ART configures the root logger; our log goes to run.log only

__all__ = [
    "RunError",
    "adversaries_of",
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


@dataclass(frozen=True)
class TaskData:
    """A task's dataset, loaded before any task trains, and its fingerprint."""

    ds: ImageDataset
    load_s: float
    fp: str


def load_task_data(
    scenario: Scenario, task: Task, host: Host, data_root: Path | None
) -> tuple[ImageDataset, float]:
    """The task's dataset and its load time; a dataset that cannot be loaded, or a targeted
    attack with no class to aim at, is a one-line error (DatasetError, RunError)."""
    t0 = time.perf_counter()
    spec = task.data
    try:
        ds = host.registry.build("datasets", spec.name, spec.params, data_root=data_root)
    except ValueError as exc:  # ImageDataset's contract, broken by a loader
        raise DatasetError(f"dataset {spec.name!r}: {exc}") from None
    load_s = time.perf_counter() - t0
    log.info(
        "task %s: %d images %s, loaded in %.1f s", task.name, len(ds), tuple(ds.x.shape[1:]), load_s
    )
    for spec_ in scenario.attacks:
        if problem := target_problem(spec_, ds.classes):
            raise RunError(f"task {task.name}: {problem}")
    return ds, load_s


def load_all_task_data(
    scenario: Scenario, host: Host, data_root: Path | None, run_dir: Path
) -> dict[str, TaskData]:
    """Every task's data before any task trains: a missing dataset, or a resume on other
    data, for the last task is one line at the start, not after the first tasks' hours."""
    ckpt = Checkpoints(run_dir / "checkpoint")
    loaded = {}
    for task in scenario.task_list():
        ds, load_s = load_task_data(scenario, task, host, data_root)
        loaded[task.name] = TaskData(ds, load_s, _check_task_data(ckpt, task.name, ds))
    return loaded


def run_task(
    scenario: Scenario,
    task: Task,
    data: TaskData,
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
    spec, ds, data_fp = task.data, data.ds, data.fp
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
        examples_dir = run_dir / "examples" / safe_name(task.name)  # made by the first attack
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
        "timing": {"dataset_load_s": data.load_s},
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


def write_report(run_dir: Path, metrics: dict[str, Any]) -> str | None:
    """report.md, then report.html (testbed/report_html.py); the problem that kept
    report.html from being written, if any: a bug in the page must not cost a run."""
    tmp = run_dir / "report.md.tmp"
    tmp.write_text(markdown(metrics))
    os.replace(tmp, run_dir / "report.md")
    try:
        from testbed.report_html import write_run_html

        write_run_html(run_dir, metrics)
    except Exception as exc:  # reported to the user; the run folder stays
        return f"report.html not written: {type(exc).__name__}: {exc}"
    return None


def _start_or_check_manifest(
    run_dir: Path, scenario: Scenario, code_fp: dict[str, str], resume: bool, host: dict[str, Any]
) -> dict[str, Any]:
    """A new run records what it starts from, and when; a resumed one must match its
    scenario, data and code. The host may differ (a job moved off a preempted machine is
    legitimate), but then the numbers are no single host's: every host it ran on is
    recorded. Returns the manifest."""
    ckpt = Checkpoints(run_dir / "checkpoint")
    stored = run_dir / "scenario.json"
    if not resume:
        write_json(stored, resolved_dict(scenario))
        manifest = {
            "scenario_sha256": file_digest(stored),
            "code": code_fp,
            "data": {},
            "hosts": [host],
            "started": time.time(),
        }
        ckpt.write_manifest(manifest)
        return manifest
    manifest = ckpt.read_manifest()
    hint = "start a new run"
    check_same("scenario.json", manifest.get("scenario_sha256"), file_digest(stored), hint)
    check_same(
        "code", manifest.get("code"), code_fp, "finish it with the code that started it, or " + hint
    )
    hosts = manifest.get("hosts")
    if not isinstance(hosts, list) or not hosts or not _is_time(manifest.get("started")):
        raise RunError(f"the run folder does not record its host and start; {hint}")
    if hosts[-1] != host:
        manifest["hosts"] = [*hosts, host]
        ckpt.write_manifest(manifest)
    return manifest


def _is_time(t: Any) -> bool:
    return isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)


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
            manifest = _start_or_check_manifest(
                run_dir, scenario, code_fp, resume, float_path(device)
            )
            hosts = manifest["hosts"]

            def warn(message: str) -> None:
                console.print(f"warning: {message}", style="yellow", markup=False, highlight=False)

            if note := hosts_note({"hardware": {"hosts": hosts}}):
                warn(note)

            data = load_all_task_data(scenario, host, data_root, run_dir)

            def run_tasks(engine: Engine) -> dict[str, Any]:
                tasks = {}
                progress = make_progress(console) if show_progress else None
                with progress if progress is not None else nullcontext():
                    for task in scenario.task_list():
                        tasks[task.name] = run_task(
                            scenario, task, data[task.name], host, data_root, device,
                            Bars(progress), run_dir, use_cache, engine, code_fp, warn,
                        )  # fmt: skip
                return tasks

            if engine is not None:
                tasks = run_tasks(engine)
            else:  # the scenario's engine, a registered component (testbed/builtins/engines.py)
                spec = scenario.engine
                runner = host.registry.build("engines", spec.name, spec.params)
                tasks = runner.run(scenario, device, run_tasks)
            result = {
                "schema_version": SCHEMA_VERSION,
                "testbed_version": __version__,
                "scenario": scenario.scenario.name,
                "seeds": scenario.seeds(),
                "tasks": tasks,
                "hardware": hardware(device) | ({"hosts": hosts} if len(hosts) > 1 else {}),
                "engine": scenario.engine.model_dump(mode="json"),
                # a resumed run's total is this process's; the span since its first start
                # (pauses included) says how long the whole run took
                "timing": {"total_s": time.perf_counter() - t_start}
                | ({"since_first_start_s": time.time() - manifest["started"]} if resume else {}),
            }
            result = json.loads(json.dumps(json_safe(result)))
            check_code_unchanged(host, code_fp, "before writing metrics.json")
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
