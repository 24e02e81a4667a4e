"""Rich progress bars and console shared by extraction and protocols (quiet when output is not a terminal), and the
one place where the libraries' own output is kept out of ours."""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)  # progress, status and errors
# command results (tables) on stdout. A pipe or file has no width: there a table takes its natural width, so no cell is
# folded or cut for grep and files (a fixed width cut the wide tables)
out = Console(width=None if sys.stdout.isatty() else 1_000_000)


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


# The libraries' own switches for their tqdm bars and advisory log lines, read when they are imported. Our own bars
# (`progress_bar`) say what is loaded and extracted; transformers' "Some weights ... were not initialized" is judged by
# the strict weight check (backbones/weights.py), which refuses a checkpoint that does not fit.
_LIBRARY_QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                  "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as one line on our console (kind, message, where), not a raw two-line dump."""
    console.print(f"[yellow]warning[/] ({category.__name__}, {os.path.basename(filename)}:{lineno}): "
                  f"{escape(str(message))}", highlight=False)


@contextlib.contextmanager
def quiet_libraries():
    """Within: huggingface_hub, transformers and datasets draw no progress bars and log only errors, and Python
    warnings are printed by `_show_warning`. Set through their environment variables, which they read when imported:
    the CLI enters this before importing any of them, so it needs none of them for `--help`; a variable the user set
    wins (HF_HUB_DISABLE_PROGRESS_BARS=0 brings the bars back). Both are undone on leaving."""
    added = [key for key in _LIBRARY_QUIET if key not in os.environ]
    os.environ.update({key: _LIBRARY_QUIET[key] for key in added})
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            yield
    finally:
        for key in added:
            os.environ.pop(key, None)
