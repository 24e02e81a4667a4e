"""`overcluster`: k-means overclustering (K = 100, 300 or 500 clusters, far more than classes) fitted on the evaluation
split itself, each cluster assigned to the class that maximises its precision tp / (tp + fp), i.e. its majority class
(many-to-one), mean ± std over 5 seeds (PROTOCOLS.md §2).

Reproduces Leopart's overclustering evaluation (`experiments/overcluster/sup_overcluster.py` with
`PredsmIoU.compute(many_to_one=True, precision_based=True)`); Leopart reports K = 500 as its headline, which is the
default here. One record per K: the record's parameters carry it (`--param overcluster.k=100`).

Default: the `kmeans` protocol's feature pipeline (L2-normalised last-layer patch tokens, faiss spherical k-means, best
of 5 restarts, cosine scores bilinearly upsampled to label resolution), clustering and scoring shared with it
through `clustering.cluster_and_score`. Preset `leopart`: StandardScaler + PCA-50, Euclidean k-means (niter 100, nredo
5, faiss's 256-points-per-centroid subsampling), 448 square input, nearest upsampling of the cluster map to 100×100.

Deliberate departures from Leopart's code:
- mIoU averages over the classes present in ground truth or prediction (this project's definition, PROTOCOLS.md §9);
  Leopart averages over every class, counting an absent class as IoU 0;
- the greedy per-cluster argmax is computed from one dataset-level confusion matrix (the same assignment, without the
  per-pair pixel scans);
- K larger than the number of fitted tokens is an error rather than a faiss warning; the record's `points_per_cluster`
  says how thin the clusters were (many-to-one scores climb towards 100 % as K approaches the number of tokens, so
  compare only rows with similar values).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import (
    Context,
    Protocol,
    ProtocolError,
    ProtocolResult,
    kmeans_backend_axis,
    matching_axis,
    register_protocol,
)
from .clustering import KMeansFamily, KMeansParams, cluster_and_score


@dataclass(frozen=True)
class OverclusterParams(KMeansParams):
    """The k-means parameters with K required (500 by default) and many-to-one matching (Hungarian is `kmeans`)."""

    k: int = 500
    matching: Literal["many-to-one"] = "many-to-one"


@register_protocol
class OverclusterProtocol(Protocol):
    name = "overcluster"
    axes = {"matching": matching_axis, "kmeans": kmeans_backend_axis}
    version = "1"
    description = "k-means overclustering (K=100/300/500) on eval-split patch tokens, many-to-one matching"
    default_seeds = 5
    Params = OverclusterParams
    presets = {"leopart": {**KMeansFamily.presets["leopart"], "matching": "many-to-one"}}
    resolvers = KMeansFamily.resolvers
    check = KMeansFamily.check

    def evaluate(self, ctx: Context) -> ProtocolResult:
        p = self.p
        k = p.k
        ds = ctx.eval_set
        fs = ctx.get(ds, ("tokens",))
        n_tokens = int(fs["tokens"].data.shape[0])
        fit_points = min(n_tokens, p.max_fit_points or n_tokens)
        if k > fit_points:
            raise ProtocolError(f"overcluster: k={k} clusters but only {fit_points} tokens to fit them on "
                                f"({len(ds)} images of {ds.id}/{ds.split}); lower it, e.g. --param overcluster.k=100")
        out = cluster_and_score(ctx, fs, k, p, "many-to-one")
        out.info["points_per_cluster"] = round(out.info["fit_points"] / k, 2)
        for s in out.per_seed:
            mapping = s["cluster_to_class"]
            s["classes_hit"] = len({c for c in mapping if c >= 0})
        return out
