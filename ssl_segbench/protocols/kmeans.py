"""`kmeans`: K = number of classes, fitted on the evaluation split itself (transductive, as Leopart and the STEGO
baselines do), one-to-one Hungarian matching, mean ± std over seeds (PROTOCOLS.md §1).

Default: L2-normalised last-layer patch tokens, faiss spherical k-means (best of 5 restarts per seed, as Leopart) on
every token (a uniform subsample beyond `max_fit_points`), cosine scores bilinearly upsampled to label resolution,
Hungarian on pixel counts. `kmeans_backend` 'auto' fits with faiss wherever faiss can run on the run's device, else with
the torch port of its algorithm on the GPU (`cluster.torch_kmeans`); the resolved name is the recorded parameter.
Presets: `leopart` (StandardScaler + PCA-50, Euclidean k-means niter 100 / nredo 5 with faiss's 256-points-per-centroid
subsampling, 448 square input, nearest upsampling to 100×100, Hungarian on 1 − IoU) and `stego` (cosine clusters,
Hungarian on pixel counts, shorter side 320 centre crop).

CRF unaries (`crf=true`): softmax(scores / crf_temperature). Spherical k-means scores are cosine similarities, and the
default temperature 0.5 gives STEGO's log_softmax(2·cos) exactly. Euclidean k-means scores are −½‖x − c‖² (up to a
per-pixel constant, which the softmax ignores) on features rescaled to unit mean squared norm, where −½‖x − c‖² equals
the cosine up to a constant for unit vectors; so the same temperature means the same sharpness for both, instead of
raw squared distances in PCA units that make every unary one-hot and the CRF a no-op. The rescaling divides every
score by one positive number (`info.score_scale`), so it never changes the argmax: only the CRF sees it.
"""
from __future__ import annotations

from .base import Context, ProtocolResult, register_protocol
from .clustering import KMeansFamily, cluster_and_score


@register_protocol
class KMeansProtocol(KMeansFamily):
    name = "kmeans"
    version = "1"
    description = "k-means with K = classes on eval-split patch tokens, Hungarian matching"
    default_seeds = 5

    def evaluate(self, ctx: Context) -> ProtocolResult:
        p = self.p
        ds = ctx.eval_set
        k = p.k or ds.num_classes
        fs = ctx.get(ds, ("tokens",))
        return cluster_and_score(ctx, fs, k, p, p.matching)
