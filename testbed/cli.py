"""testbed: defences for federated learning on medical images, measured.

Every command exits 0 on success and 2 on a user mistake, with a one-line error;
`audit` exits 1 when its lower bound on epsilon exceeds the claimed one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from testbed import __version__

# The handlers live in their own modules, by concern: cli_run (run, resume, compare),
# cli_commands (validate, plugins, report, search, audit), cli_common (what they share).
# This module keeps the parser and the dispatch, the console entry point (pyproject.toml)
# and `python -m testbed.cli`. Everything heavy (torch, pydantic, rich) is imported
# inside main() and the handlers, under main()'s KeyboardInterrupt handler: a Ctrl-C while
# start-up imports torch is one line, not a traceback from the middle of an import.
from testbed.cli_commands import cmd_audit, cmd_plugins, cmd_report, cmd_search, cmd_validate
from testbed.cli_common import DATA_ROOT_ENV, USER_ERROR, _fail
from testbed.cli_run import cmd_compare, cmd_run


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
    from testbed.problems import ScenarioError

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
