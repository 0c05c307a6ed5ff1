"""`testbed run` (and `run --resume`) and `testbed compare`: the subcommands that train
federations and write run folders, with the MLflow tracker both can log to.

Apart from cli.py (parser and dispatch) and cli_commands.py (the other subcommands):
these two share the run-folder and --mlflow handling. As everywhere in the CLI, heavy
modules are imported inside the handlers, under main()'s KeyboardInterrupt handler.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.cli_common import _data_root, _fail

if TYPE_CHECKING:
    from rich.console import Console

    from testbed.pluginmanager import Host


def _tracker(args: argparse.Namespace) -> Any:
    """The MLflow tracker for --mlflow, made before any run so that a missing mlflow or a
    store it cannot open is one line before hours of training; None without --mlflow."""
    from testbed.tracking import Tracker

    uri = args.mlflow
    if uri is None:
        return None
    if Path(uri).suffix.lower() in (".toml", ".json") and Path(uri).is_file():
        raise _TrackingSetup(
            f"--mlflow took the scenario file {uri} as its store; put --mlflow after the "
            "scenario files, or write --mlflow=URI"
        )
    return Tracker(uri)


class _TrackingSetup(Exception):
    pass


def cmd_run(host: Host, args: argparse.Namespace, console: Console) -> int:
    from rich.console import Console

    from testbed.report import render
    from testbed.runner import RunError, final_dir_of, partial_dir, run_scenario
    from testbed.scenario_load import load_scenario

    if args.resume is not None:
        if args.scenario is not None or args.out is not None:
            return _fail(console, "--resume takes the run folder only, not a scenario or --out")
        out = final_dir_of(args.resume)
        source = partial_dir(out) / "scenario.json"
        if not source.exists():
            return _fail(console, f"nothing to resume at {args.resume}")
    elif args.scenario is None:
        return _fail(console, "give a scenario file, or --resume RUN_DIR")
    else:
        out, source = args.out, args.scenario
    if args.overrides and args.resume is not None:
        return _fail(console, "--resume continues the run as it was; --set is not allowed")
    if args.resume is not None and (args.seed is not None or args.repeats is not None):
        return _fail(console, "--resume continues with the run's own seed and repeats")
    # --seed and --repeats go into the document before validation, so that a negative or
    # huge value is the same one-line problem as in the file.
    scenario = load_scenario(
        source, host.registry, args.overrides, seed=args.seed, repeats=args.repeats
    )
    updates: dict[str, object] = {}
    if args.device is not None:
        updates["federation"] = scenario.federation.model_copy(update={"device": args.device})
    if args.engine is not None and args.engine != scenario.engine.name:
        # the file's engine params belong to its engine: the new one starts from its defaults
        params = host.registry["engines"].components[args.engine].params()
        updates["engine"] = scenario.engine.model_copy(
            update={"name": args.engine, "params": params.model_dump(mode="json")}
        )
    if args.task:
        known = [t.name for t in scenario.task_list()]
        unknown = [t for t in args.task if t not in known]
        if scenario.data is not None:
            return _fail(console, "--task picks among [[tasks]]; this scenario has one [data]")
        if unknown:
            return _fail(
                console, f"--task {', '.join(unknown)}: not a task of this scenario "
                f"(its tasks: {', '.join(known)})",
            )  # fmt: skip
        updates["tasks"] = [t for t in scenario.tasks if t.name in args.task]
    if updates and args.resume is not None:
        return _fail(console, "--resume continues with the run's own seed and device")
    scenario = scenario.model_copy(update=updates)
    from testbed.tracking import TrackingError

    try:
        tracker = _tracker(args)
    except (TrackingError, _TrackingSetup) as exc:
        return _fail(console, str(exc))
    started: list[Path] = []

    def on_start(run_dir: Path) -> None:
        started.append(run_dir)
        console.print(
            f"Run folder: {run_dir} (complete when metrics.json is there)",
            markup=False,
            highlight=False,
        )

    try:
        result = run_scenario(
            scenario,
            host,
            data_root=_data_root(args),
            out=out,
            resume=args.resume is not None,
            console=console,
            show_progress=not args.no_progress,
            on_start=on_start,
            use_cache=not args.no_cache,
        )
    except RunError as exc:
        return _fail(console, f"{source}: {exc}")
    except KeyboardInterrupt:
        if started and partial_dir(started[0]).exists():
            return _fail(console, f"interrupted; continue with `testbed run --resume {started[0]}`")
        return _fail(console, "interrupted; nothing written")
    render(result.metrics, Console())
    console.print(f"Report written to {result.run_dir}", markup=False, highlight=False)
    if tracker is not None:
        try:
            run_id = tracker.log_run(result.run_dir, result.metrics)
        except TrackingError as exc:
            return _fail(console, f"{exc} (the run folder {result.run_dir} is complete)")
        console.print(f"MLflow run {run_id} in {tracker.uri}", markup=False, highlight=False)
    return 0


def cmd_compare(host: Host, args: argparse.Namespace, console: Console) -> int:
    from datetime import UTC, datetime

    from rich.console import Console
    from rich.markup import escape

    from testbed import compare
    from testbed.data import DatasetError
    from testbed.fingerprint import data_fingerprint
    from testbed.problems import ScenarioError
    from testbed.runner import RunError, load_task_data, run_scenario
    from testbed.scenario_load import load_scenario
    from testbed.tracking import TrackingError

    scenarios, problems = [], []
    for f in args.scenarios:
        try:
            s = load_scenario(f, host.registry, args.overrides, repeats=args.repeats)
        except ScenarioError as exc:
            problems += exc.problems
            continue
        if args.device is not None:
            fed = s.federation.model_copy(update={"device": args.device})
            s = s.model_copy(update={"federation": fed})
        scenarios.append(s)
    if problems:
        raise ScenarioError(problems)
    names = [s.scenario.name for s in scenarios]
    if len(set(names)) != len(names):
        return _fail(console, f"scenario names must differ to be compared: {names}")
    paired = list(zip(map(str, args.scenarios), scenarios, strict=True))
    if clash := compare.label_clash(paired):
        return _fail(console, clash)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("reports") / f"compare-{stamp}"
    if out.exists():
        return _fail(console, f"{out} already exists")
    loaded = []
    for path, scenario in zip(args.scenarios, scenarios, strict=True):
        # every scenario's data before the first trains (each run loads it again, from the
        # dataset cache): a missing dataset of the last one is not found hours in
        for task in scenario.task_list():
            try:
                ds, _ = load_task_data(scenario, task, host, _data_root(args))
            except (RunError, DatasetError) as exc:
                return _fail(console, f"{path}: {exc}")
            params = host.registry["datasets"].get(task.data.name).params  # defaults filled
            spec = {"name": task.data.name, **params.model_validate(task.data.params).model_dump()}
            loaded.append((str(path), task.name, spec, data_fingerprint(ds)))
    if clash := compare.data_clash(loaded):
        return _fail(console, clash)
    try:
        tracker = _tracker(args)
    except (TrackingError, _TrackingSetup) as exc:
        return _fail(console, str(exc))
    results = {}
    for path, scenario in zip(args.scenarios, scenarios, strict=True):
        console.print(f"[bold]{scenario.scenario.name}[/] ({escape(str(path))})")
        try:
            results[scenario.scenario.name] = run_scenario(
                scenario,
                host,
                data_root=_data_root(args),
                out=out / scenario.scenario.name,
                console=console,
                show_progress=not args.no_progress,
                use_cache=not args.no_cache,
            ).metrics
        except RunError as exc:
            return _fail(console, f"{path}: {exc}")
    labels, rows = compare.rows(results)
    compare.render(labels, rows, Console())
    compare.write_outputs(out, labels, rows, results)
    console.print(f"Comparison written to {out}", markup=False, highlight=False)
    if tracker is not None:
        try:
            run_id = tracker.log_compare(out, rows, results)
        except TrackingError as exc:
            return _fail(console, f"{exc} (the comparison in {out} is complete)")
        console.print(f"MLflow run {run_id} in {tracker.uri}", markup=False, highlight=False)
    return 0
