"""What every `testbed` subcommand handler shares: the exit status for a user mistake,
the one-line error that goes with it, and where the datasets are.

Apart from cli.py (parser and dispatch) so that the handler modules, cli_run and
cli_commands, can use them without importing the entry point they are called from.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

DATA_ROOT_ENV = "TESTBED_DATA_ROOT"
USER_ERROR = 2


def _fail(console: Console, message: str) -> int:
    from rich.markup import escape

    # escape: file paths and messages such as "give [data] or [[tasks]]" are not markup
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return USER_ERROR


def _data_root(args: argparse.Namespace) -> Path | None:
    if args.data_root:
        return args.data_root
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env) if env else None
