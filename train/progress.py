"""The one progress display of the training side: a transient bar per task on stderr.

Each task shows its description, a bar, done/total in its unit, a status line the caller
updates (loss, accuracy, images/s), elapsed time and ETA. ``enabled=False`` (``--quiet``)
draws nothing; the callers' log lines still go to stderr.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


class StatusColumn(ProgressColumn):
    """The task's ``status`` field, empty when the caller sets none."""

    def render(self, task: Task) -> Text:
        return Text(task.fields.get("status", ""))


def progress_bar(enabled: bool, unit: str) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn(f"{{task.completed}}/{{task.total}} {unit}"), StatusColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled, transient=True,
                    console=Console(stderr=True))
