"""What the k-means protocols (`kmeans`, `overcluster`) share: their parameters, presets and checks
(`KMeansFamily`), and fitting k-means per seed then scoring every image (`cluster_and_score`); see kmeans.py for the
pipeline and its CRF unaries."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..cluster import KMEANS_BACKENDS, Preprocess, centroid_scores, kmeans_backend, kmeans_seeds, sample_rows
from ..metrics import match
from ..progress import progress_bar
from .base import (
    Context,
    MaskSaver,
    Predictions,
    Protocol,
    ProtocolResult,
    SharedParams,
    count_confusions,
    kmeans_backend_axis,
    matching_axis,
    score_seeds,
)


@dataclass(frozen=True)
class KMeansParams(SharedParams):
    """Parameters of k-means on patch tokens (kmeans.py's docstring)."""

    k: int | None = None  # None: number of classes
    standardize: bool = False
    pca_dim: int | None = None
    l2_normalize: bool = True
    spherical: bool = True
    niter: int = 100
    nredo: int = 5
    max_points_per_centroid: int | None = None
    max_fit_points: int | None = 2_000_000
    upsample: Literal["bilinear", "nearest"] = "bilinear"
    matching: Literal["hungarian-pixels", "hungarian-iou"] = "hungarian-pixels"
    crf_temperature: float = 0.5
    kmeans_backend: Literal[KMEANS_BACKENDS] = "auto"


class KMeansFamily(Protocol):
    """Parameters, presets and checks of k-means on the evaluation split's tokens (not registered: `kmeans` and
    `overcluster` are)."""
    axes = {"matching": matching_axis, "kmeans": kmeans_backend_axis}
    Params = KMeansParams
    resolvers = {"kmeans_backend": kmeans_backend}
    presets = {
        "leopart": {"resize": "square", "size": 448, "standardize": True, "pca_dim": 50, "l2_normalize": False,
                    "spherical": False, "niter": 100, "nredo": 5, "max_points_per_centroid": 256,
                    "upsample": "nearest", "eval_size": 100, "matching": "hungarian-iou"},
        "stego": {"resize": "shorter", "size": 320, "l2_normalize": True, "spherical": True,
                  "upsample": "bilinear", "eval_size": None, "matching": "hungarian-pixels"},
    }

    def check(self) -> None:
        self.positive("k", "pca_dim", "max_points_per_centroid", "max_fit_points", allow_none=True)
        self.positive("niter", "nredo")


def cluster_and_score(ctx: Context, fs, k: int, p: KMeansParams, matching: str) -> ProtocolResult:
    """Fit k-means per seed on the split's tokens, predict every image, match and score (shared with overclustering)."""
    ds = ctx.eval_set
    fit = sample_rows(fs["tokens"], p.max_fit_points, seed=0)
    pre = Preprocess.fit(fit, p.standardize, p.pca_dim, p.l2_normalize)
    x = pre(fit)
    del fit
    # Euclidean scores are measured on features of unit mean squared norm (module docstring); cosine needs nothing
    scale = 1.0 if p.spherical else max(float(np.mean(np.einsum("nd,nd->n", x, x))), 1e-12)
    with progress_bar(len(ctx.seeds), f"k-means K={k} on {len(x)} tokens") as advance:
        fits = kmeans_seeds(x, k, list(ctx.seeds), p.niter, p.nredo, p.spherical, p.max_points_per_centroid,
                            p.kmeans_backend, ctx.device, advance)
    score_fns = [centroid_scores(c, p.spherical, scale) for c in fits]
    saver = MaskSaver(ctx)
    with progress_bar(len(ds), f"predicting {ds.id}/{ds.split}") as advance:
        stream = Predictions(fs["tokens"], fs.labels, score_fns, k, p.upsample, p.eval_size, ctx.scoring,
                             prepare=lambda t: pre(t.reshape(-1, t.shape[-1])).reshape(*t.shape[:-1], -1),
                             score_type=score_type(p))
        confs, per_image = count_confusions(stream, ds.num_classes, ds.ignore_index, saver, advance)
    per_seed, stats = score_seeds(confs, per_image, lambda j, conf: match(conf, matching), saver)
    info = {"k": k, "fit_points": int(len(x)), "feature_dim": int(x.shape[1]), "score_scale": round(scale, 6)}
    return ProtocolResult(per_seed, info, confs, stats)


def score_type(p: KMeansParams) -> str:
    """What the centroid scores are, for the record of the CRF's unaries."""
    if p.spherical:
        return "cosine similarity to centroids" if p.l2_normalize else "inner product with centroids"
    return "-0.5 squared distance to centroids, features at unit mean squared norm"
