"""`random-centroids`: a floor under k-means: K = classes patch tokens drawn at random (per seed) as centroids, cosine
scores upsampled to label resolution, Hungarian matching. The example protocol of docs/extending.md: saved as
ssl_segbench/protocols/random_centroids.py it is registered, listed and runnable with no other edit."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

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
    register_protocol,
    score_seeds,
)


@dataclass(frozen=True)
class RandomCentroidsParams(SharedParams):
    upsample: Literal["bilinear", "nearest"] = "bilinear"


@register_protocol
class RandomCentroids(Protocol):
    name = "random-centroids"
    description = "K = classes random patch tokens as centroids, cosine scores, Hungarian matching"
    Params = RandomCentroidsParams

    def evaluate(self, ctx: Context) -> ProtocolResult:
        ds, k = ctx.eval_set, ctx.eval_set.num_classes
        fs = ctx.get(ds, ("tokens",))
        fns = []
        for seed in ctx.seeds:
            rows = np.sort(np.random.default_rng(seed).choice(len(fs["tokens"].data), k, replace=False))
            c = torch.nn.functional.normalize(torch.from_numpy(np.asarray(fs["tokens"].data[rows], np.float32)), dim=1)
            fns.append(lambda x, c=c: torch.einsum("bhwd,kd->bkhw", torch.nn.functional.normalize(x, dim=-1),
                                                   c.to(x.device)))
        saver = MaskSaver(ctx)
        with progress_bar(len(ds), f"random centroids on {ds.id}/{ds.split}") as advance:
            stream = Predictions(fs["tokens"], fs.labels, fns, k, self.p.upsample, self.p.eval_size, ctx.scoring)
            confs, per_image = count_confusions(stream, ds.num_classes, ds.ignore_index, saver, advance)
        per_seed, stats = score_seeds(confs, per_image, lambda j, conf: match(conf), saver)
        return ProtocolResult(per_seed, {"k": k}, confs, stats)
