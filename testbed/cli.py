"""`testbed run | validate | plugins`: exit 0 on success, 2 on a user mistake."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed import __version__

# Everything heavy (torch, pydantic, rich) is imported inside main(), under its
# KeyboardInterrupt handler: a Ctrl-C while start-up imports torch is one line, not a
# traceback from the middle of an import.
if TYPE_CHECKING:
    from rich.console import Console

    from testbed.pluginmanager import Host

DATA_ROOT_ENV = "TESTBED_DATA_ROOT"
USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="testbed", description=__doc__)
    p.add_argument("--version", action="version", version=f"testbed {__version__}")
    p.add_argument(
        "-p",
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="also load this plugin module (repeatable)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a scenario and write its report folder")
    run.add_argument("scenario", type=Path, nargs="?", help="scenario file (TOML or JSON)")
    run.add_argument("--out", type=Path, help="run folder (default reports/<name>-<time>/)")
    run.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue an interrupted run from its last checkpoint",
    )
    run.add_argument("--seed", type=int, help="override scenario.seed")
    run.add_argument("--repeats", type=int, help="override evaluation.repeats (seeds seed..)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override any scenario value, e.g. --set federation.rounds=3 (repeatable)",
    )
    run.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this task of a [[tasks]] scenario (repeatable)",
    )
    run.add_argument("--device", choices=["cpu", "cuda", "auto"], help="override federation.device")
    run.add_argument(
        "--engine",
        choices=["inprocess", "batched", "flower"],
        help="override engine.name: in this process, stacked (batched), or on Flower",
    )
    run.add_argument(
        "--data-root", type=Path, help=f"folder holding the datasets (or ${DATA_ROOT_ENV})"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument(
        "--no-cache",
        action="store_true",
        help="retrain even if this federation was trained before (the cache is refreshed)",
    )
    _mlflow_option(run)

    val = sub.add_parser("validate", help="check scenario files; report every problem")
    val.add_argument("scenarios", type=Path, nargs="+")
    val.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="validate with this override applied, as `run --set` would (repeatable)",
    )

    sub.add_parser("plugins", help="list plugins, versions, hooks and components")

    cmp = sub.add_parser("compare", help="run scenarios side by side: one table of defences")
    cmp.add_argument("scenarios", type=Path, nargs="+")
    cmp.add_argument("--out", type=Path, help="comparison folder (default reports/compare-<time>/)")
    cmp.add_argument("--data-root", type=Path, help=f"datasets folder (or ${DATA_ROOT_ENV})")
    cmp.add_argument("--device", choices=["cpu", "cuda", "auto"], help="override for every run")
    cmp.add_argument("--repeats", type=int, help="override evaluation.repeats for every run")
    cmp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    cmp.add_argument("--no-progress", action="store_true")
    cmp.add_argument("--no-cache", action="store_true")
    _mlflow_option(cmp)

    rep = sub.add_parser("report", help="re-render a finished run's report (no recomputing)")
    rep.add_argument("run_dir", type=Path)

    srch = sub.add_parser(
        "search", help="worst-case attack search: tune the [search] attack under its bound"
    )
    srch.add_argument("scenario", type=Path)
    srch.add_argument("--out", type=Path, help="output folder (default reports/search-<name>/)")
    srch.add_argument("--trials", type=int, help="override search.n_trials (trials in all)")
    srch.add_argument("--data-root", type=Path, help=f"datasets folder (or ${DATA_ROOT_ENV})")
    srch.add_argument("--device", choices=["cpu", "cuda", "auto"], help="override the device")
    srch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    srch.add_argument("--no-progress", action="store_true")

    aud = sub.add_parser(
        "audit",
        help="empirical lower bound on the scenario's DP epsilon (canary audit); "
        "exit 1 if it exceeds the claim",
    )
    aud.add_argument("scenario", type=Path)
    aud.add_argument("--trials", type=int, default=300, help="canary trials per world")
    aud.add_argument("--seed", type=int, default=0)
    aud.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    return p


def _mlflow_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mlflow",
        nargs="?",
        const="./mlruns",
        metavar="URI",
        help="log to MLflow when done (default store ./mlruns; needs the mlflow extra); "
        "put it after the scenario files or write --mlflow=URI",
    )


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


def _fail(console: Console, message: str) -> int:
    from rich.markup import escape

    # escape: file paths and messages such as "give [data] or [[tasks]]" are not markup
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return USER_ERROR


def cmd_validate(host: Host, files: list[Path], overrides: list[str], console: Console) -> int:
    from testbed.scenario import ScenarioError, load_scenario

    bad = 0
    for f in files:
        try:
            load_scenario(f, host.registry, overrides)
        except ScenarioError as exc:
            bad += 1
            for problem in exc.problems:
                console.print(str(problem), markup=False, highlight=False, soft_wrap=True)
        else:
            console.print(f"{f}: ok", markup=False, highlight=False)
    return USER_ERROR if bad else 0


def _type_name(annotation: Any) -> str:
    import typing

    # tuple[str, ...] is a type too, but its name alone would hide the element type
    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def param_rows(model: Any) -> list[tuple[str, str, str]]:
    """(name, type, default) per field of a component's params model."""
    from pydantic_core import PydanticUndefined

    out = []
    for name, f in model.model_fields.items():
        if f.is_required():
            default = "(required)"
        elif f.default is PydanticUndefined:
            default = "(computed)"  # a default_factory: no single value to show
        else:
            default = repr(f.default)
        out.append((name, _type_name(f.annotation), default))
    return out


def cmd_plugins(host: Host, console: Console) -> int:
    from rich.markup import escape
    from rich.table import Table

    from testbed.registry import singular

    t = Table(title="testbed plugins")
    for col in ("plugin", "distribution", "version", "hooks"):
        t.add_column(col)
    for info in host.plugins():
        t.add_row(info.name, info.distribution, info.version, "\n".join(info.hooks))
    console.print(t)
    c = Table(title="components")
    for col in ("kind", "name", "plugin", "description"):
        c.add_column(col)
    p = Table(title="component params (`params = { ... }` in a scenario)")
    for col in ("component", "param", "type", "default"):
        p.add_column(col, overflow="fold")  # a cut-off default or type would mislead
    for kind, kreg in host.registry.kinds.items():
        for name in kreg.names():
            comp = kreg.components[name]
            c.add_row(kind, name, comp.plugin, escape(comp.description))
            rows = param_rows(comp.params) or [("-", "", "")]
            for i, row in enumerate(rows):
                first, last = i == 0, i == len(rows) - 1
                cells = [escape(x) for x in row]  # "tuple[str, ...]" is not rich markup
                p.add_row(f"{singular(kind)} {name}" if first else "", *cells, end_section=last)
    console.print(c)
    console.print(p)
    return 0


def _data_root(args: argparse.Namespace) -> Path | None:
    if args.data_root:
        return args.data_root
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env) if env else None


def cmd_run(host: Host, args: argparse.Namespace, console: Console) -> int:
    from rich.console import Console

    from testbed.report import render
    from testbed.runner import RunError, final_dir_of, partial_dir, run_scenario
    from testbed.scenario import load_scenario

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
        if unknown or scenario.data is not None:
            return _fail(console, f"--task {unknown or args.task}: tasks are {', '.join(known)}")
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
    from testbed.runner import RunError, run_scenario
    from testbed.scenario import ScenarioError, load_scenario
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
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("reports") / f"compare-{stamp}"
    if out.exists():
        return _fail(console, f"{out} already exists")
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


def cmd_report(run_dir: Path, console: Console) -> int:
    import json

    from rich.console import Console

    from testbed.problems import read_regular_file
    from testbed.report import render
    from testbed.report_check import metrics_problems
    from testbed.runner import write_report

    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(read_regular_file(path))
    except FileNotFoundError:
        return _fail(console, f"{path}: not found (is {run_dir} a finished run folder?)")
    except RecursionError:
        return _fail(console, f"{path}: unreadable: nested too deeply")
    except OSError as exc:
        return _fail(console, f"{path}: unreadable: {exc.strerror or exc}")
    except ValueError as exc:
        return _fail(console, f"{path}: unreadable: {exc}")
    if not isinstance(metrics, dict) or metrics.get("schema_version") != 1:
        return _fail(console, f"{path}: not a testbed metrics file of schema version 1")
    problems = metrics_problems(metrics)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return _fail(console, f"{path}: incomplete metrics: {problems[0]}{more}")
    try:
        render(metrics, Console())
        problem = write_report(run_dir, metrics)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        # The check above covers what the report reads today; a key it misses (a newer
        # section of the report) is still one line, never a traceback.
        return _fail(console, f"{path}: incomplete metrics: {type(exc).__name__}: {exc}")
    if problem:
        return _fail(console, f"{run_dir}: {problem}")
    console.print(
        f"Report written to {run_dir / 'report.md'} and {run_dir / 'report.html'}",
        highlight=False,
    )
    return 0


def cmd_search(host: Host, args: argparse.Namespace, console: Console) -> int:
    from rich.markup import escape

    from testbed.runner import RunError
    from testbed.scenario import load_scenario
    from testbed.search import run_search

    if args.trials is not None and not 1 <= args.trials <= 100_000:
        return _fail(console, "--trials must be between 1 and 100,000")
    scenario = load_scenario(args.scenario, host.registry, args.overrides)
    if args.device is not None:
        fed = scenario.federation.model_copy(update={"device": args.device})
        scenario = scenario.model_copy(update={"federation": fed})
    out = args.out or Path(scenario.report.out_dir) / f"search-{scenario.scenario.name}"
    try:
        result = run_search(
            scenario, host, data_root=_data_root(args), out=out, n_trials=args.trials,
            console=console, show_progress=not args.no_progress,
        )  # fmt: skip
    except RunError as exc:
        return _fail(console, f"{args.scenario}: {exc}")
    p = result.best_perceptibility
    print(result.toml, end="")
    console.print(
        f"{result.trials} trials; best objective {result.best_value:.4f} at mean SSIM "
        f"{p['ssim_mean']:.4f}, Linf {p['linf_max']:.4f}; figure {result.figure}, "
        f"entry {result.best_toml}",
        markup=False,
        highlight=False,
    )
    within = [r for r in result.configured if r["feasible"]]
    if within:
        top = max(within, key=lambda r: r["value"])
        line = f"strongest configured attack within the bound: {top['label']} ({top['value']:.4f})"
        if result.at_least_as_strong:
            console.print(line + ": the search is at least as strong", markup=False)
        else:  # a search weaker than what the scenario already runs must not look like a win
            console.print(
                f"[yellow]warning:[/] {escape(line)} is stronger than the search's best; "
                "raise n_trials or widen search.space",
                highlight=False,
                soft_wrap=True,
            )
    else:
        console.print("no configured attack lies within the bound", markup=False)
    return 0


def cmd_audit(host: Host, args: argparse.Namespace, console: Console) -> int:
    """Claimed epsilon beside an audited lower bound (testbed/audit.py); a bound above the
    claim means the mechanism or its accountant is broken: exit 1, as a failed check."""
    from rich.console import Console

    from testbed.audit import audit_scenario
    from testbed.scenario import load_scenario

    if not 10 <= args.trials <= 1_000_000:
        return _fail(console, "--trials must be between 10 and 1,000,000")
    if not 0 <= args.seed < 2**63:
        return _fail(console, "--seed must be between 0 and 2**63 - 1")
    scenario = load_scenario(args.scenario, host.registry, args.overrides)
    try:
        result = audit_scenario(scenario, trials=args.trials, seed=args.seed).as_dict()
    except ValueError as exc:
        return _fail(console, f"{args.scenario}: {exc}")
    out = Console()
    out.print(
        "canary setting (the scenario's mechanism and noise, one full-batch step): "
        f"claimed epsilon {result['claimed_epsilon']:.4g} (delta {result['delta']:g}); "
        f"audited lower bound {result['lower_bound']:.4g} at confidence "
        f"{result['confidence']:g} over {result['trials_per_world']} trials per world: "
        f"{result['verdict']}",
        markup=False,
        highlight=False,
    )
    return 1 if result["lower_bound"] > result["claimed_epsilon"] else 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C before the console exists (argument parsing, importing torch, loading
        # plugins): plain stderr, exit 2, no traceback.
        print("error: interrupted", file=sys.stderr)
        return USER_ERROR


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    from rich.console import Console

    from testbed.data import DatasetError
    from testbed.pluginmanager import PluginError, build_host
    from testbed.scenario import ScenarioError

    console = Console(stderr=True)
    try:
        host = build_host(extra_modules=args.plugin)
        if args.command == "validate":
            return cmd_validate(host, args.scenarios, args.overrides, Console())
        if args.command == "plugins":
            return cmd_plugins(host, Console())
        if args.command == "compare":
            return cmd_compare(host, args, console)
        if args.command == "report":
            return cmd_report(args.run_dir, console)
        if args.command == "search":
            return cmd_search(host, args, console)
        if args.command == "audit":
            return cmd_audit(host, args, console)
        return cmd_run(host, args, console)
    except ScenarioError as exc:
        for problem in exc.problems:
            console.print(f"error: {problem}", markup=False, highlight=False, soft_wrap=True)
        return USER_ERROR
    except (PluginError, DatasetError) as exc:
        return _fail(console, str(exc))
    except KeyboardInterrupt:
        return _fail(console, "interrupted")


if __name__ == "__main__":
    sys.exit(main())
