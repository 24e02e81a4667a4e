"""Where ssl-segbench keeps generated data, cached features and records (overridable by environment variables), and
the two rules every write path follows: names taken from data become single safe path components, and a path is
checked to resolve inside its root before anything is written there."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .errors import SegbenchError

_UNSAFE = re.compile(r"[^A-Za-z0-9._:@+=-]")


class PathError(SegbenchError):
    """A write path that would leave its root."""


def cache_dir() -> Path:
    """Root of feature caches and generated data: $SSL_SEGBENCH_CACHE, else ~/.cache/ssl_segbench."""
    return Path(os.environ.get("SSL_SEGBENCH_CACHE", Path.home() / ".cache" / "ssl_segbench")).expanduser()


def results_dir() -> Path:
    """Root of the JSON records: $SSL_SEGBENCH_RESULTS, else ./results."""
    return Path(os.environ.get("SSL_SEGBENCH_RESULTS", "results")).expanduser()


def safe_component(name: str) -> str:
    """`name` as one path component: unchanged when it is already plain (letters, digits and ._:@+=-, not starting with
    a dot); otherwise every other character becomes '_', leading dots are dropped and a short hash of the original is
    appended, so 'a/b' and 'a_b' never share a file and '..' or 'x/../y' never climb out of a directory (runs of dots
    become '_' too)."""
    name = str(name)
    if name and not _UNSAFE.search(name) and not name.startswith(".") and ".." not in name:
        return name
    plain = re.sub(r"\.{2,}", "_", _UNSAFE.sub("_", name)).lstrip(".")[:80] or "_"
    return f"{plain}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def inside(root: str | Path, path: str | Path) -> Path:
    """`path` (absolute or relative to `root`), after checking that it resolves inside `root`; else PathError."""
    joined = Path(root) / path
    base, full = Path(root).resolve(), joined.resolve()
    if full != base and base not in full.parents:
        raise PathError(f"refusing to write {full}: it is outside {base}")
    return joined
