"""The one progress display of the training side: a transient bar per task on stderr.

Each task shows its description, a bar, done/total in its unit, a status line the caller
updates (loss, accuracy, images/s), elapsed time and ETA. ``enabled=False`` (``--quiet``)
draws nothing; the callers' log lines still go to stderr.
"""

from __future__ import annotations

from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


class StatusColumn(ProgressColumn):
    """The task's ``status`` field, empty when the caller sets none."""

    def render(self, task: Task) -> Text:
        return Text(task.fields.get("status", ""))


Stages = Callable[[str, int], Callable[[int], None]]  # (description, total) -> advance(done)


def no_stages(description: str, total: int) -> Callable[[int], None]:
    return lambda done: None


def stages_of(progress: Progress) -> Stages:
    """A bar per stage of a long job (export's verification passes), for code that takes ``Stages``."""
    def stage(description: str, total: int) -> Callable[[int], None]:
        task = progress.add_task(description, total=total)
        return lambda done: progress.advance(task, done)

    return stage


def progress_bar(enabled: bool, unit: str) -> Progress:
    """Drawn only on a terminal: piped or logged stderr keeps just the log lines."""
    console = Console(stderr=True)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn(f"{{task.completed}}/{{task.total}} {unit}"), StatusColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), disable=not (enabled and console.is_terminal),
                    transient=True, console=console)
