"""Rich progress bars and console shared by extraction and protocols (quiet when output is not a terminal)."""
from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)  # progress, status and errors
# command results (tables) on stdout; wide when piped, so rows are not wrapped for grep and files
out = Console(width=None if sys.stdout.isatty() else 200)


@contextlib.contextmanager
def progress_bar(total: int, description: str):
    """Yield `advance(n=1)`; draws a bar on a terminal, prints one start line otherwise."""
    if not console.is_terminal:
        print(f"{description} ({total})", file=sys.stderr, flush=True)
        yield lambda n=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)
