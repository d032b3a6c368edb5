"""The one rich Console (stderr, so stdout stays clean for translations), progress bars, errors."""

import os

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskProgressColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from mtkit.errors import MtkitError

# soft_wrap: long messages stay one line in logs instead of breaking at 80 columns.
console = Console(stderr=True, highlight=False, soft_wrap=True)
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 120  # tables in logs: rich's 80-column default squeezes them


def progress_bar() -> Progress:
    """A progress display for long work; silent when stderr is not a terminal (logs, CI)."""
    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=not console.is_terminal or bool(os.environ.get("MTKIT_QUIET")),
    )


def table(title: str, columns: list[str]) -> Table:
    """A results table. A value too long for a narrow terminal (a sacreBLEU signature, a path) is
    folded onto the next line rather than cut to an ellipsis."""
    t = Table(title=title, title_justify="left", header_style="bold")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    return t


def info(message: str) -> None:
    console.print(message)


def print_error(err: MtkitError) -> None:
    console.print(f"[bold red]error:[/] {escape(err.message)}")
    if err.hint:
        console.print(f"[cyan]hint:[/] {escape(err.hint)}")
