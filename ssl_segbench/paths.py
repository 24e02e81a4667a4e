"""Where ssl-segbench keeps generated data, cached features and records (overridable by environment variables)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of feature caches and generated data: $SSL_SEGBENCH_CACHE, else ~/.cache/ssl_segbench."""
    return Path(os.environ.get("SSL_SEGBENCH_CACHE", Path.home() / ".cache" / "ssl_segbench")).expanduser()


def results_dir() -> Path:
    """Root of the JSON records: $SSL_SEGBENCH_RESULTS, else ./results."""
    return Path(os.environ.get("SSL_SEGBENCH_RESULTS", "results")).expanduser()
