"""Progress bars with an ETA over rounds, clients and attacks (rich)."""

from __future__ import annotations

from dataclasses import dataclass

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
