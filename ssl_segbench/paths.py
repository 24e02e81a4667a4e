"""Every environment variable ssl-segbench reads, and where it keeps datasets, cached features and records; plus the
two rules every write path follows: names taken from data become single safe path components, and a path is checked
to resolve inside its root before anything is written there.

| variable | default | what |
| --- | --- | --- |
| SSL_SEGBENCH_DATA | ./data | datasets found as <data>/<dataset id> when --data-root is not given |
| SSL_SEGBENCH_CACHE | ~/.cache/ssl_segbench | feature cache, manifests, generated synthetic data |
| SSL_SEGBENCH_RESULTS | ./results | records |
| SSL_SEGBENCH_REGISTRY | the packaged backbones.yaml | backbone registry |
| SSL_SEGBENCH_CHECKPOINT_SECONDS | 20 | seconds between checkpoints of a cache entry being filled |
| SSL_SEGBENCH_CRF_WORKERS | min(8, CPUs) | CRF worker processes (0: in this process) |
| SSL_SEGBENCH_CRF_TIMEOUT | 600 | seconds one CRF task may take |
| HF_HUB_OFFLINE | unset | read only to word the offline error (the Hub libraries read it themselves) |
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .digest import sha256_hex
from .errors import SegbenchError

_UNSAFE = re.compile(r"[^A-Za-z0-9._:@+=-]")
_UNSAFE_PORTABLE = re.compile(r"[^A-Za-z0-9._@+=-]")


class PathError(SegbenchError):
    """A write path that would leave its root."""


def cache_dir() -> Path:
    """Root of feature caches and generated data: $SSL_SEGBENCH_CACHE, else ~/.cache/ssl_segbench."""
    return Path(os.environ.get("SSL_SEGBENCH_CACHE", Path.home() / ".cache" / "ssl_segbench")).expanduser()


def results_dir() -> Path:
    """Root of the JSON records: $SSL_SEGBENCH_RESULTS, else ./results."""
    return Path(os.environ.get("SSL_SEGBENCH_RESULTS", "results")).expanduser()


def data_dir() -> Path:
    """Where datasets live when no --data-root is given: $SSL_SEGBENCH_DATA, else ./data (one folder per dataset id)."""
    return Path(os.environ.get("SSL_SEGBENCH_DATA", "data")).expanduser()


def registry_override() -> Path | None:
    """$SSL_SEGBENCH_REGISTRY, when set."""
    env = os.environ.get("SSL_SEGBENCH_REGISTRY")
    return Path(env).expanduser() if env else None


def checkpoint_seconds() -> float:
    return float(os.environ.get("SSL_SEGBENCH_CHECKPOINT_SECONDS", "20"))


def crf_workers() -> int:
    """$SSL_SEGBENCH_CRF_WORKERS, else min(8, CPU count); 0 means in this process."""
    env = os.environ.get("SSL_SEGBENCH_CRF_WORKERS")
    return max(0, int(env)) if env else min(8, os.cpu_count() or 1)


def crf_timeout(default: float) -> float:
    env = os.environ.get("SSL_SEGBENCH_CRF_TIMEOUT")
    return float(env) if env else default


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def safe_component(name: str, portable: bool = False) -> str:
    """`name` as one path component: unchanged when it is already plain (letters, digits and ._:@+=-, not starting with
    a dot); otherwise every other character becomes '_', leading dots are dropped and a short hash of the original is
    appended, so 'a/b' and 'a_b' never share a file and '..' or 'x/../y' never climb out of a directory (runs of dots
    become '_' too). `portable` treats ':' as unsafe as well: for published files (leaderboard pages, plots, figures),
    where a colon breaks Windows checkouts and makes a relative link read as a URL scheme ('hf:x.html')."""
    name, unsafe = str(name), _UNSAFE_PORTABLE if portable else _UNSAFE
    if name and not unsafe.search(name) and not name.startswith(".") and ".." not in name:
        return name
    plain = re.sub(r"\.{2,}", "_", unsafe.sub("_", name)).lstrip(".")[:80] or "_"
    return f"{plain}-{sha256_hex(name, 8)}"


def inside(root: str | Path, path: str | Path) -> Path:
    """`path` (absolute or relative to `root`), after checking that it resolves inside `root`; else PathError."""
    joined = Path(root) / path
    base, full = Path(root).resolve(), joined.resolve()
    if full != base and base not in full.parents:
        raise PathError(f"refusing to write {full}: it is outside {base}")
    return joined
