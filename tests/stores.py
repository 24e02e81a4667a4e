"""Build feature-cache entries from arrays, for protocol tests with planted answers."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ssl_segbench.features import ArrayStore, FeatureSet, _Writer


def store(path: Path, arrays: list[np.ndarray], dtype=np.float16) -> ArrayStore:
    """(h, w, D) arrays (or (H, W) label maps) → a committed entry."""
    arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
    w = _Writer(path, {"test": str(path)}, [a.shape[:2] for a in arrays], arrays[0].shape[-1], dtype, False)
    for i, a in enumerate(arrays):
        w.write(i, a.reshape(-1, a.shape[-1]))
    return w.commit({})


def feature_set(path: Path, tokens: list[np.ndarray], labels: list[np.ndarray]) -> FeatureSet:
    return FeatureSet({"tokens": store(path / "tokens", tokens)}, store(path / "labels", labels, np.uint8),
                      cache_hit=True, keys={})
