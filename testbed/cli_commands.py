"""`testbed validate | plugins | report | search | audit`: check scenario files, list
plugins and components, re-render a finished run's report, search for an attack's worst
case, audit a DP claim.

Each handler hands its work to one module (testbed.scenario, the plugin registry,
testbed.report, testbed.search, testbed.audit) and prints the outcome; none writes a run
folder. They are apart from cli.py (parser and dispatch) and cli_run.py (run, resume and
compare, which do). As everywhere in the CLI, heavy modules are imported inside the
handlers, under main()'s KeyboardInterrupt handler.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.cli_common import USER_ERROR, _data_root, _fail

if TYPE_CHECKING:
    from rich.console import Console

    from testbed.pluginmanager import Host


def cmd_validate(host: Host, files: list[Path], overrides: list[str], console: Console) -> int:
    from testbed.problems import ScenarioError
    from testbed.scenario_load import load_scenario

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
    from testbed.scenario_load import load_scenario
    from testbed.search import run_search

    if args.trials is not None and not 1 <= args.trials <= 100_000:
        return _fail(console, "--trials must be between 1 and 100,000")
    scenario = load_scenario(args.scenario, host.registry, args.overrides)
    if args.device is not None:
        fed = scenario.federation.model_copy(update={"device": args.device})
        scenario = scenario.model_copy(update={"federation": fed})
    out = args.out or Path(scenario.report.out_dir) / f"search-{scenario.scenario.name}"
    fresh = not out.exists()  # made early to fail before training; not left behind empty
    try:
        result = run_search(
            scenario, host, data_root=_data_root(args), out=out, n_trials=args.trials,
            console=console, show_progress=not args.no_progress,
        )  # fmt: skip
    except BaseException as exc:
        if fresh and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if isinstance(exc, RunError):
            return _fail(console, f"{args.scenario}: {exc}")
        raise
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
    from testbed.scenario_load import load_scenario

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
