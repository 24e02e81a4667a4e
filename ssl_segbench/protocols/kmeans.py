"""`kmeans`: K = number of classes, fitted on the evaluation split itself (transductive, as Leopart and the STEGO
baselines do), one-to-one Hungarian matching, mean ± std over seeds (PROTOCOLS.md §1).

Default: L2-normalised last-layer patch tokens, faiss spherical k-means (best of 5 restarts per seed, as Leopart) on
every token (a uniform subsample beyond `max_fit_points`), cosine scores bilinearly upsampled to label resolution,
Hungarian on pixel counts.
Presets: `leopart` (StandardScaler + PCA-50, Euclidean k-means niter 100 / nredo 5 with faiss's 256-points-per-centroid
subsampling, 448 square input, nearest upsampling to 100×100, Hungarian on 1 − IoU) and `stego` (cosine clusters,
Hungarian on pixel counts, shorter side 320 centre crop).
"""
from __future__ import annotations

from ..cluster import Preprocess, centroid_scores, kmeans, sample_rows
from ..progress import progress_bar
from . import register_protocol
from .base import Context, MaskSaver, Protocol, accumulate_confusion, match_seeds


@register_protocol
class KMeansProtocol(Protocol):
    name = "kmeans"
    version = "1"
    description = "k-means with K = classes on eval-split patch tokens, Hungarian matching"
    default_seeds = 5
    defaults = {
        "k": None,  # None: number of classes
        "resize": None, "size": None,  # None: the run's transform
        "standardize": False, "pca_dim": None, "l2_normalize": True, "spherical": True,
        "niter": 100, "nredo": 5, "max_points_per_centroid": None, "max_fit_points": 2_000_000,
        "upsample": "bilinear", "eval_size": None, "matching": "hungarian-pixels", "crf": False,
    }
    presets = {
        "leopart": {"resize": "square", "size": 448, "standardize": True, "pca_dim": 50, "l2_normalize": False,
                    "spherical": False, "niter": 100, "nredo": 5, "max_points_per_centroid": 256,
                    "upsample": "nearest", "eval_size": 100, "matching": "hungarian-iou"},
        "stego": {"resize": "shorter", "size": 320, "l2_normalize": True, "spherical": True,
                  "upsample": "bilinear", "eval_size": None, "matching": "hungarian-pixels"},
    }
    matchings = ("hungarian-pixels", "hungarian-iou")

    def run(self, ctx: Context) -> dict:
        p = self.params
        self.require_choice("matching", self.matchings)
        ds = ctx.eval_set
        k = p["k"] or ds.num_classes
        fs = ctx.get(ds, ("tokens",))
        return cluster_and_score(ctx, fs, k, p, p["matching"])


def cluster_and_score(ctx: Context, fs, k: int, p: dict, matching: str) -> dict:
    """Fit k-means per seed on the split's tokens, predict every image, match and score (shared with overclustering)."""
    ds = ctx.eval_set
    fit = sample_rows(fs["tokens"], p["max_fit_points"], seed=0)
    pre = Preprocess.fit(fit, p["standardize"], p["pca_dim"], p["l2_normalize"])
    x = pre(fit)
    del fit
    score_fns = []
    with progress_bar(len(ctx.seeds), f"k-means K={k} on {len(x)} tokens") as advance:
        for seed in ctx.seeds:
            c = kmeans(x, k, seed, p["niter"], p["nredo"], p["spherical"], p["max_points_per_centroid"])
            score_fns.append(centroid_scores(c, p["spherical"]))
            advance()
    per_image, saver = [], MaskSaver(ctx)
    with progress_bar(len(ds), f"predicting {ds.id}/{ds.split}") as advance:
        confs = accumulate_confusion(fs["tokens"], fs.labels, score_fns, ds.num_classes, k, ds.ignore_index,
                                     p["upsample"], p["eval_size"], advance,
                                     prepare=lambda t: pre(t.reshape(-1, t.shape[-1])).reshape(*t.shape[:2], -1),
                                     on_labels=saver, per_image=per_image)
    per_seed, stats = match_seeds(confs, per_image, matching, saver)
    return {"per_seed": per_seed, "info": {"k": k, "fit_points": int(len(x)), "feature_dim": int(x.shape[1])},
            "confusions": [c.tolist() for c in confs], "image_stats": stats}
