"""Build feature-cache entries from arrays, for protocol tests with planted answers."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from ssl_segbench.cache import ArrayStore, RowWriter
from ssl_segbench.data.base import SegmentationDataset
from ssl_segbench.features import FeatureSet


class PlantedDataset(SegmentationDataset):
    """Only what the protocols read of a dataset (class names, split, length, sample names, optionally images);
    features and labels come from `feature_set`."""

    id = "planted"
    ignore_index = 255

    def __init__(self, class_names, n: int | None = None, split: str = "val", images: list | None = None):
        self.class_names, self.split, self.images = tuple(class_names), split, images
        self._n = len(images) if images is not None else n
        self.samples = [SimpleNamespace(name=f"img{i}") for i in range(self._n)]

    def __len__(self):
        return self._n

    def content_sha256(self):
        return f"planted-{self.split}"

    def load_image(self, i):
        return Image.fromarray(self.images[i])


def store(path: Path, arrays: list[np.ndarray], dtype=np.float16) -> ArrayStore:
    """(h, w, D) arrays (or (H, W) label maps) → a committed entry."""
    arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
    w = RowWriter(path, {"test": str(path)}, [a.shape[:2] for a in arrays], arrays[0].shape[-1], dtype, False)
    for i, a in enumerate(arrays):
        w.write(i, a.reshape(-1, a.shape[-1]))
    return w.commit({})


def feature_set(path: Path, tokens: list[np.ndarray], labels: list[np.ndarray]) -> FeatureSet:
    return FeatureSet({"tokens": store(path / "tokens", tokens)}, store(path / "labels", labels, np.uint8),
                      keys={})
