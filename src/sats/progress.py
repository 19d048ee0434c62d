"""The one progress bar of every long command: description, bar, done/total, elapsed,
time left, and an optional ``info`` text field (losses, volumes, ...)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(console: Console | None, info: bool = False, transient: bool = False) -> Progress:
    """A rich Progress; silent when ``console`` is None.

    Example:
        >>> with progress_bar(Console()) as bar:  # doctest: +SKIP
        ...     task = bar.add_task("cases", total=10)
        ...     bar.advance(task)

    With ``info=True`` every task needs an ``info`` field: ``add_task(..., info="")``.
    """
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, console=console, transient=transient, disable=console is None)
