"""Feature preprocessing and faiss k-means shared by the clustering protocols."""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch

from .cache import ArrayStore
from .errors import SegbenchError


def sample_rows(store: ArrayStore, max_rows: int | None, seed: int) -> np.ndarray:
    """All rows of a token entry as float32, or `max_rows` of them drawn uniformly without replacement (sorted, so the
    memory map is read in order)."""
    n = store.data.shape[0]
    if max_rows is None or n <= max_rows:
        return np.asarray(store.data, dtype=np.float32)
    idx = np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))
    return np.asarray(store.data[idx], dtype=np.float32)


@dataclass
class Preprocess:
    """Token preprocessing: optional standardisation (StandardScaler), optional PCA, optional L2 normalisation."""

    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    pca: faiss.PCAMatrix | None = None
    l2: bool = False

    @classmethod
    def fit(cls, x: np.ndarray, standardize: bool, pca_dim: int | None, l2: bool) -> "Preprocess":
        p = cls(l2=l2)
        if standardize:
            p.mean = x.mean(0)
            std = x.std(0)
            p.scale = np.where(std > 0, std, 1.0).astype(np.float32)
        if pca_dim:
            y = p._standardize(x)
            p.pca = faiss.PCAMatrix(y.shape[1], pca_dim)
            p.pca.train(np.ascontiguousarray(y))
        return p

    def _standardize(self, x: np.ndarray) -> np.ndarray:
        return x if self.mean is None else (x - self.mean) / self.scale

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(n, D) → (n, D') float32."""
        y = np.ascontiguousarray(self._standardize(np.asarray(x, dtype=np.float32)), dtype=np.float32)
        if self.pca is not None:
            y = self.pca.apply(y)
        if self.l2:
            y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(y, dtype=np.float32)


def kmeans(x: np.ndarray, k: int, seed: int, niter: int, nredo: int, spherical: bool,
           max_points_per_centroid: int | None) -> np.ndarray:
    """faiss k-means centroids (k, D). `max_points_per_centroid=None` fits on every given point (faiss's own default
    of 256 silently subsamples; Leopart's preset keeps it)."""
    if len(x) < k:
        raise SegbenchError(f"k-means with k={k} needs at least {k} points, got {len(x)}: lower k")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, seed=seed, spherical=spherical, verbose=False,
                      max_points_per_centroid=max_points_per_centroid or (len(x) // k + 1))
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids.copy()


def centroid_scores(centroids: np.ndarray, spherical: bool, scale: float = 1.0):
    """Scoring function (h, w, D) → (k, h, w): the inner product x·c for spherical k-means (the cosine for unit
    vectors), else (x·c − ½|c|²) / scale, which is −½‖x − c‖² / scale up to a per-pixel constant. argmax is the nearest
    centroid either way, the scores can be upsampled, and `scale` (a positive number) only sets their sharpness for a
    softmax."""
    c = torch.from_numpy(centroids)
    bias = torch.zeros(len(c)) if spherical else -0.5 * (c * c).sum(1)
    factor = 1.0 if spherical else 1.0 / scale

    def score(x: np.ndarray) -> torch.Tensor:
        h, w, d = x.shape
        s = factor * ((torch.from_numpy(np.ascontiguousarray(x.reshape(-1, d))) @ c.T) + bias)
        return s.T.reshape(len(c), h, w)

    return score
