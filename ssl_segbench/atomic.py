"""Atomic file writes: a temporary file in the same directory, then a rename, so a reader (or a crash) sees the old
file or the new one, never half of one. A write that fails (disk full, no permission, read-only file system, a file
size limit) is a one-line `WriteError` naming the path and the fix, with the temporary file removed.

Folders are replaced the same way (`replacing_dir`): built in `<name>.tmp-<pid>-<random>` beside the target and
exchanged with it. Temporary names carry the process id and a random part, so two overlapping runs (processes or
threads) never write into or rename each other's folders, and a later run removes only those of dead processes."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
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


@contextmanager
def replacing_dir(target: Path):
    """Yield a new empty folder beside `target`, unique to this call (`<name>.tmp-<pid>-<random>`); when the body
    returns, the folder takes `target`'s place (`swap_dir`) and `target`'s old content is removed; when it raises, the
    folder is removed and `target` is left as it was. Leftovers of killed runs are removed first."""
    target = Path(target)
    remove_leftovers(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        swap_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap it holds the old content


def remove_leftovers(target: Path) -> None:
    """Delete the `<name>.tmp…` and `<name>.old…` folders beside `target` that a killed run left: those whose process
    id no longer runs, and those without one (older versions' names); a live process's, this one's included (another
    thread), are left alone."""
    pattern = re.compile(rf"{re.escape(target.name)}\.(tmp|old)(?:-(\d+)(?:-\w+)?|-\w+)?")
    if not target.parent.is_dir():
        return
    for path in target.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and not (match[2] and _alive(int(match[2]))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def swap_dir(new: Path, target: Path) -> None:
    """Put folder `new` at `target`, `target`'s old content ending at `new`. Where renameat2(RENAME_EXCHANGE) exists
    (Linux 3.15+, glibc 2.28+, local file systems) the exchange is atomic: there is no moment without `target`.
    Elsewhere the old folder is renamed away (to a name unique to this call) and the new one in: `target` is missing
    between those two renames."""
    if not target.exists():
        try:
            os.rename(new, target)
            return
        except OSError as e:  # another run put a folder there meanwhile: exchange with it
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if not _exchange(new, target):
        old = target.with_name(f"{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(target, old)
        try:
            os.rename(new, target)
        except OSError:
            os.rename(old, target)
            raise
        os.rename(old, new)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE); False where the call or the flag is unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # no such libc function (macOS, old glibc), or no libc (Windows)
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
