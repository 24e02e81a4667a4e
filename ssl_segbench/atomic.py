"""Atomic file writes: a temporary file in the same directory, then a rename, so a reader (or a crash) sees the old
file or the new one, never half of one. A write that fails (disk full, no permission, read-only file system, a file
size limit) is a one-line `WriteError` naming the path and the fix, with the temporary file removed."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import SegbenchError


class WriteError(SegbenchError):
    """A file or folder could not be written; nothing half-written was kept."""


@contextmanager
def write_guard(path: Path, what: str = "file"):
    """Turn an OSError raised while writing `path` into a WriteError that names it, the cause and the fix."""
    try:
        yield
    except OSError as e:
        raise WriteError(f"could not write the {what} {path}: {e.strerror or e}. Nothing half-written was kept; free "
                         f"space there, fix its permissions, or write elsewhere, then rerun.") from e


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    with write_guard(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj) -> None:
    """Sorted keys and a trailing newline: the same object always gives the same bytes."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")
