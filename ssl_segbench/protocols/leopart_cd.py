"""`leopart-cd`: Leopart's fully unsupervised segmentation, cluster-based foreground extraction (CBFE) followed by
community detection over a cluster co-occurrence graph (PROTOCOLS.md §4; Leopart
`experiments/fully_unsup_seg/fully_unsup_seg.py` and `experiments/utils.py`).

Steps, on cached features only (facets `tokens` and `attn`):
1. fit images: the evaluation split and, by default, the train split too (Leopart fits on VOC train + val; without a
   train split under the root the evaluation split alone is used and the record says so). Tokens standardised and
   PCA-50, fitted on all fit images.
2. noisy foreground per image: last-block CLS attention averaged over heads, Gaussian blur (kernel 7, σ 0.6,
   torchvision's reflect-padded blur, as Leopart), keep the most attended patches holding 65 % of the attention mass,
   drop 8-connected components of ≤ 2 pixels. This runs on the token grid, exactly where Leopart's code runs it
   (`process_attentions` on the 28×28 map); the mask is nearest-upsampled afterwards.
3. CBFE: spherical k-means (K = 200) over all fit tokens; each cluster's precision against the noisy foreground at the
   working resolution (`eval_size`, 100×100 as Leopart), averaged over the images the cluster occurs in, per split;
   clusters whose precision is below `cbfe_threshold` become background. The threshold is chosen WITHOUT labels:
   default 0.5, i.e. a cluster is foreground when, on average, most of its pixels lie in the attention foreground (a
   majority vote that needs no labels and no assumption about the shape of the precision histogram); `"otsu"` takes
   the Otsu point of the precision histogram instead. Leopart tunes this threshold with train ground truth (a sweep
   assigning 55–75 % of clusters to background, scored by foreground IoU): that label-using oracle is not offered.
4. foreground tokens clustered into k clusters (Euclidean k-means); background is cluster k.
5. co-occurrence graph over the k + 1 clusters (background included, as Leopart): per image
   `skimage.feature.graycomatrix` of the cluster map at the working resolution, distances [1, 2], the 8 angles
   i·π/4; summed over distances and angles, diagonal zeroed, each row normalised to sum 1 in that image; summed over
   images; row i divided by the number of images containing cluster i. Undirected edge (i, j) of weight
   min(a_ij, a_ji) kept when both are ≥ the weight threshold.
6. community detection: `infomap` (two-level, undirected, markov time mt, preferred number of modules = classes − 1,
   Leopart's 20 for VOC's 21 classes) once per seed (10 seeds); each cluster's module is its merged label; merged label
   maps of the evaluation images are matched to classes with Hungarian on 1 − IoU (Leopart's `PredsmIoU`) at the
   working resolution. When the number of merged labels differs from the number of classes, unmatched labels count as
   wrong and unmatched classes score IoU 0.
7. `crf=True`: the shared dense CRF (ssl_segbench.crf) refines each seed's merged label map at the working resolution
   before it is scored and matched (the hard labels become probabilities: `mask_confidence` on the pixel's label, the
   rest spread evenly; the RGB image is resized bilinearly to the working resolution). Every seed's per-image
   confusions also go into the record (`image_stats`, for bootstrap intervals over images).

Hyper-parameters (k, markov time, weight threshold) are Leopart's, found by an optuna search that maximised train
mIoU, i.e. WITH labels (the record says so): ViT-S/16 k=149, mt=2, wt=0.09 (preset `vits16`); ViT-B/8 k=109,
mt=0.4, wt=0.07 (preset `vitb8`). Left at None they are taken from the backbone: the ViT-B/8 values when its embedding
width is ≥ 768, else the ViT-S/16 values; the record's info names the choice and whether the backbone matches the
model they were searched for.

Deliberate departures from Leopart's code:
- angles are the 8 evenly spaced i·π/4; Leopart's list has 4π/3 where 5π/4 was meant (one diagonal is missed and one
  vertical offset counted twice);
- row i is divided by the number of images CONTAINING cluster i (PROTOCOLS.md §4); Leopart counts only images in
  which the cluster has a neighbour of another cluster (the two differ only when a cluster fills an image);
- clusters without any edge keep their own label each (`isolated_clusters: own-label`); Leopart leaves them at 0 in
  a zero-initialised map, so all isolated clusters silently merge into one label (`shared-label`, preset `leopart`);
- merged labels that Hungarian leaves unmatched count as wrong (`unmatched: wrong`); Leopart's `PredsmIoU` merges them
  into the background class (`unmatched: background`, with `background_class`, preset `leopart`);
- foreground k-means runs on each foreground token once; Leopart clusters the embeddings nearest-upsampled to
  100×100, which weights tokens by their 3–4 px upsampled footprint;
- infomap ≥ 2.16 rejects seed 0: run seed s uses infomap seed s + 1 (Leopart used s with an older infomap);
- the CBFE threshold is label-free (see step 3); mIoU is this project's (PROTOCOLS.md §9).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..cluster import KMEANS_BACKENDS, Preprocess, assign, kmeans, kmeans_backend, sample_rows, subsample_rows
from ..extras import require
from ..metrics import match
from ..progress import progress_bar
from ..registry import is_int, is_number
from .base import (
    Context,
    MaskSaver,
    Protocol,
    ProtocolError,
    ProtocolResult,
    SharedParams,
    kmeans_backend_axis,
    matching_axis,
    register_protocol,
    score_label_maps,
    score_seeds,
    upsample_nearest,
)

# Leopart's published community-detection hyper-parameters, searched on VOC train mIoU (with labels).
CD_HPARAMS = {"vits16": {"k": 149, "markov_time": 2.0, "weight_threshold": 0.09},
              "vitb8": {"k": 109, "markov_time": 0.4, "weight_threshold": 0.07}}
_CD_SOURCE = {"vits16": ("Leopart ViT-S/16", 384, 16), "vitb8": ("Leopart ViT-B/8", 768, 8)}
CD_HPARAMS_NOTE = ("found by Leopart with labels: an optuna TPE search (300 trials) maximising train-split mIoU on "
                   "PASCAL VOC 2012 (fully_unsup_seg.py)")
ANGLES = tuple(i * np.pi / 4 for i in range(8))


@dataclass(frozen=True)
class LeopartCDParams(SharedParams):
    """Parameters of Leopart's community detection (PROTOCOLS.md §4): the fit splits, standardisation + PCA and
    k-means, the attention foreground, cluster-based foreground extraction (CBFE), the foreground clusters and
    co-occurrence graph (k, markov_time, weight_threshold: None takes Leopart's values for the nearest backbone),
    matching, and the CRF's confidence in the hard merged labels."""

    eval_size: int | None = 100
    fit_splits: Literal["eval", "eval+train"] = "eval+train"
    standardize: bool = True
    pca_dim: int | None = 50
    max_fit_points: int | None = 2_000_000
    niter: int = 100
    nredo: int = 5
    max_points_per_centroid: int | None = None
    cluster_seed: int = 0
    kmeans_backend: Literal[KMEANS_BACKENDS] = "auto"
    attn_blur_kernel: int = 7
    attn_blur_sigma: float = 0.6
    attn_mass: float = 0.65
    attn_drop_upto: int = 2
    cbfe_k: int = 200
    cbfe_threshold: float | str = 0.5
    k: int | None = None
    markov_time: float | None = None
    weight_threshold: float | None = None
    preferred_modules: int | None = None
    distances: list = field(default_factory=lambda: [1, 2])
    matching: Literal["hungarian-iou", "hungarian-pixels"] = "hungarian-iou"
    isolated_clusters: Literal["own-label", "shared-label"] = "own-label"
    unmatched: Literal["wrong", "background"] = "wrong"
    background_class: int = 0
    mask_confidence: float = 0.7  # CRF: the hard merged labels as unaries, mask_confidence on the label


@register_protocol
class LeopartCDProtocol(Protocol):
    name = "leopart-cd"
    axes = {"matching": matching_axis, "kmeans": kmeans_backend_axis}
    requires = ("skimage", "infomap")
    version = "1"
    description = "Leopart CBFE + cluster co-occurrence community detection (infomap), Hungarian matching"
    default_seeds = 10
    Params = LeopartCDParams
    resolvers = {"kmeans_backend": kmeans_backend}
    presets = {
        "leopart": {"resize": "square", "size": 448, "eval_size": 100, "max_points_per_centroid": 256,
                    "isolated_clusters": "shared-label", "unmatched": "background"},
        "vits16": dict(CD_HPARAMS["vits16"]),
        "vitb8": dict(CD_HPARAMS["vitb8"]),
    }

    def check(self) -> None:
        p = self.p
        self.fraction("mask_confidence", 0.5, 1.0)
        self.positive("pca_dim", "max_fit_points", "max_points_per_centroid", "k", "markov_time",
                      "preferred_modules", allow_none=True)
        self.positive("niter", "nredo", "cbfe_k", "attn_mass")
        _check_cbfe_threshold(p.cbfe_threshold)
        if not p.distances or not all(is_int(d) and d > 0 for d in p.distances):
            raise ProtocolError(f"leopart-cd: distances must be a list of positive integers, got {p.distances!r}")
        if p.background_class < 0:
            raise ProtocolError(f"leopart-cd: background_class must be a class index, got {p.background_class!r}")

    def facets_needed(self) -> dict[str, tuple[str, ...]]:
        facets = ("tokens", "attn")
        return {"eval": facets, "train": facets} if self.p.fit_splits == "eval+train" else {"eval": facets}

    def train_split_wanted(self) -> list[str] | None:
        return ["default"] if self.p.fit_splits == "eval+train" else None

    def evaluate(self, ctx: Context) -> ProtocolResult:
        p = self.p
        ds = ctx.eval_set
        if p.unmatched == "background" and not p.background_class < ds.num_classes:
            raise ProtocolError(f"leopart-cd: background_class {p.background_class} is not a class of '{ds.id}' "
                                f"(0..{ds.num_classes - 1})")
        hp, info = self._cd_hparams(ctx)
        k = hp["k"]
        preferred = p.preferred_modules or max(ds.num_classes - 1, 1)
        info.update({"k": k, "preferred_modules": preferred, "infomap_seeds": [s + 1 for s in ctx.seeds]})

        splits = [("eval", ds)]
        if p.fit_splits == "eval+train":
            if ctx.train_set is None:
                info["fit_splits"] = f"eval only ({ds.split}): {ctx.train_note or 'no train split under this root'}"
            else:
                splits.append(("train", ctx.train_set))
        info.setdefault("fit_splits", " + ".join(s.split for _, s in splits))
        feats = [ctx.get(s, ("tokens", "attn")) for _, s in splits]
        images = [(si, i) for si, fs in enumerate(feats) for i in range(len(fs["tokens"]))]

        def work_shape(si: int, i: int) -> tuple[int, int]:
            s = p.eval_size
            return (s, s) if s else tuple(feats[si].labels.labels(i).shape)

        # 1. standardisation + PCA on all fit tokens
        pre = Preprocess.fit(_fit_rows([fs["tokens"] for fs in feats], p.max_fit_points),
                             p.standardize, p.pca_dim, False)
        x = [pre(np.asarray(feats[si]["tokens"].image(i), dtype=np.float32).reshape(
            -1, feats[si]["tokens"].data.shape[1])) for si, i in images]
        grids = [tuple(feats[si]["tokens"].image(i).shape[:2]) for si, i in images]

        # 2. noisy foreground from attention
        fg_attn = [noisy_foreground(feats[si]["attn"].image(i), p.attn_blur_kernel, p.attn_blur_sigma,
                                    p.attn_mass, p.attn_drop_upto) for si, i in images]
        info["attention_foreground_fraction"] = round(float(np.mean([f.mean() for f in fg_attn])), 4)

        # 3. cluster-based foreground extraction
        fit_x = subsample_rows(np.concatenate(x), p.max_fit_points)
        if p.cbfe_k > len(fit_x):
            raise ProtocolError(f"leopart-cd: cbfe_k={p.cbfe_k} clusters but only {len(fit_x)} tokens; lower "
                                "it, e.g. --param leopart-cd.cbfe_k=50")
        with progress_bar(2 + len(ctx.seeds), f"leopart-cd on {len(images)} images") as advance:
            c_fg = kmeans(fit_x, p.cbfe_k, p.cluster_seed, p.niter, p.nredo, True,
                          p.max_points_per_centroid, p.kmeans_backend, ctx.device)
            advance()
            cbfe_maps = [assign(xi, c_fg, True, ctx.device).reshape(g) for xi, g in zip(x, grids)]
            fg_tokens = [np.zeros(g, dtype=bool) for g in grids]
            info["cbfe"] = {}
            for si, (sname, sset) in enumerate(splits):
                idx = [n for n, (s, _) in enumerate(images) if s == si]
                precs = cluster_precisions([cbfe_maps[n] for n in idx], [fg_attn[n] for n in idx], p.cbfe_k,
                                           [work_shape(*images[n]) for n in idx])
                thr = cbfe_threshold(precs, p.cbfe_threshold)
                fg_ids = np.flatnonzero(np.nan_to_num(precs, nan=-1.0) >= thr)
                is_fg = np.zeros(p.cbfe_k, dtype=bool)
                is_fg[fg_ids] = True
                for n in idx:
                    fg_tokens[n] = is_fg[cbfe_maps[n]]
                info["cbfe"][sname] = {"split": sset.split, "threshold": round(float(thr), 6),
                                       "foreground_clusters": int(len(fg_ids)),
                                       "foreground_fraction": round(float(np.mean([fg_tokens[n].mean() for n in idx])),
                                                                    4)}

            # 4. foreground clustering; background = cluster k
            fg_x = np.concatenate([xi[f.ravel()] for xi, f in zip(x, fg_tokens)])
            if k > len(fg_x):
                raise ProtocolError(f"leopart-cd: k={k} foreground clusters but CBFE kept only {len(fg_x)} foreground "
                                    "tokens; lower it, e.g. --param leopart-cd.k=20")
            c_k = kmeans(subsample_rows(fg_x, p.max_fit_points), k, p.cluster_seed, p.niter, p.nredo, False,
                         p.max_points_per_centroid, p.kmeans_backend, ctx.device)
            advance()
            maps = []
            for n, (xi, f, g) in enumerate(zip(x, fg_tokens, grids)):
                m = np.full(g, k, dtype=np.int64)
                m[f] = assign(xi[f.ravel()], c_k, False, ctx.device)  # no foreground: nothing assigned, background
                maps.append(upsample_nearest(m, work_shape(*images[n])))

            # 5. co-occurrence graph (all fit images)
            t0 = time.perf_counter()
            adj = cooccurrence_matrix(maps, k + 1, p.distances)
            edges = graph_edges(adj, hp["weight_threshold"])
            in_graph = {a for e in edges for a in e[:2]}
            info["graph"] = {"nodes": k + 1, "edges": len(edges), "isolated_nodes": k + 1 - len(in_graph)}

            # 6. community detection per seed, evaluation on the eval split (its images come first in `images`)
            ev = [n for n, (si, _) in enumerate(images) if si == 0]
            merged = []
            for seed in ctx.seeds:
                merged.append(communities(edges, k + 1, hp["markov_time"], preferred, seed + 1,
                                          shared_isolated=p.isolated_clusters == "shared-label"))
                advance()
            info["graph"]["seconds"] = round(time.perf_counter() - t0, 3)  # co-occurrence + communities, all seeds
        n_labels = [int(m.max()) + 1 for m in merged]
        # the merged label maps are at the working resolution, which is the ground truth's (eval_size or label
        # resolution): scored as hard labels, nothing is resized
        saver = MaskSaver(ctx)
        confs, per_image = score_label_maps(ctx, [np.stack([m[maps[n]] for m in merged], -1).astype(np.float32)
                                                  for n in ev], feats[0].labels, n_labels, "nearest", p.eval_size,
                                            p.mask_confidence, saver, "scoring merged labels",
                                            "hard merged labels (mask_confidence)")
        def mapping_of(j: int, conf: np.ndarray) -> np.ndarray:
            """Seed j's merged labels matched to classes; the columns beyond its labels (other seeds merged into
            more) hold no pixels."""
            mapping = match(conf[:, : n_labels[j]], p.matching)
            if p.unmatched == "background":  # Leopart's PredsmIoU: unmatched predictions become background
                mapping[mapping < 0] = p.background_class
            return np.concatenate([mapping, np.full(conf.shape[1] - n_labels[j], -1, dtype=mapping.dtype)])

        per_seed, stats = score_seeds(confs, per_image, mapping_of, saver, extra=lambda j, conf, m: {
            "cluster_to_class": m[: n_labels[j]].tolist(), "merged_labels": n_labels[j],
            "merged_label_of_cluster": merged[j].tolist()})
        confs = [conf[:, : n_labels[j]].tolist() for j, conf in enumerate(confs)]
        if ctx.save_masks is not None:
            res = f"{p.eval_size}x{p.eval_size}" if p.eval_size else "label resolution"
            unmatched = "background class" if p.unmatched == "background" else "ignore index"
            info["saved_masks"] = (f"{ctx.save_masks}: seed {ctx.seeds[0]}, class space after matching, {res}, "
                                   f"unmatched labels = {unmatched}")
        return ProtocolResult(per_seed, info, confs, stats)

    def _cd_hparams(self, ctx: Context) -> tuple[dict, dict]:
        """k, markov time and weight threshold: the parameters where given, else Leopart's values for the nearest of
        its two backbones."""
        p = self.p
        hp = {"k": p.k, "markov_time": p.markov_time, "weight_threshold": p.weight_threshold}
        missing = [n for n, v in hp.items() if v is None]
        note = {"found_with_labels": CD_HPARAMS_NOTE}
        if not missing:
            note["source"] = "parameters" + (f" (preset '{self.preset}')" if self.preset in CD_HPARAMS else "")
        else:
            if ctx.backbone_ref is None:
                raise ProtocolError("leopart-cd: k, markov_time and weight_threshold are chosen from the backbone when "
                                    "left at None, but this run has no backbone: set them or use preset vits16/vitb8")
            spec = ctx.backbone_ref.spec
            key = "vitb8" if spec.embed_dim >= 768 else "vits16"
            name, dim, patch = _CD_SOURCE[key]
            for n in missing:
                hp[n] = CD_HPARAMS[key][n]
            note["source"] = (f"{name} values for {missing}: backbone embed_dim "
                              f"{spec.embed_dim} {'≥' if key == 'vitb8' else '<'} 768")
            note["same_width_and_patch_as_source"] = bool(spec.embed_dim == dim and spec.patch_size == patch)
        if not is_int(hp["k"]) or hp["k"] < 1:
            raise ProtocolError(f"leopart-cd: k must be a positive integer, got {hp['k']!r}")
        return hp, {"cd_hparams": {**hp, **note}}


def _fit_rows(stores, max_rows: int | None) -> np.ndarray:
    """Rows of several token entries for fitting, at most `max_rows` in all (drawn from each in proportion)."""
    total = sum(s.data.shape[0] for s in stores)
    if max_rows is None or total <= max_rows:
        return np.concatenate([np.asarray(s.data, dtype=np.float32) for s in stores])
    return np.concatenate([sample_rows(s, max(1, round(max_rows * s.data.shape[0] / total)), seed=0) for s in stores])


def noisy_foreground(attn: np.ndarray, kernel: int = 7, sigma: float = 0.6, mass: float = 0.65,
                     drop_upto: int = 2) -> np.ndarray:
    """(h, w, heads) CLS attention → (h, w) bool: heads averaged, Gaussian-blurred, the most attended patches holding
    `mass` of the total kept, 8-connected components of at most `drop_upto` patches removed (Leopart's
    `process_attentions`)."""
    from torchvision.transforms.functional import gaussian_blur

    label = require("skimage.measure", "protocol 'leopart-cd'").label

    a = torch.from_numpy(np.asarray(attn, dtype=np.float32).mean(-1))[None, None]
    h, w = a.shape[-2:]
    if kernel and kernel > 1:
        if min(h, w) <= kernel // 2:
            raise ProtocolError(f"leopart-cd: a {kernel}×{kernel} blur needs token grids larger than {kernel // 2}, "
                                f"got {h}×{w}; use a larger input size")
        a = gaussian_blur(a, [kernel, kernel], [sigma, sigma])
    val, idx = torch.sort(a.flatten())
    keep = torch.cumsum(val / val.sum(), 0) > (1 - mass)
    fg = torch.zeros_like(keep)
    fg[idx] = keep
    fg = fg.reshape(h, w).numpy()
    comp = label(fg, connectivity=2)
    small = np.bincount(comp.ravel()) <= drop_upto
    small[0] = False
    fg[small[comp]] = False
    return fg


def cluster_precisions(cluster_maps: list[np.ndarray], fg_maps: list[np.ndarray], k: int,
                       shapes: list[tuple[int, int]]) -> np.ndarray:
    """Each cluster's precision against the foreground masks (|cluster ∩ fg| / |cluster| per image, both
    nearest-upsampled to that image's shape), averaged over the images the cluster occurs in; NaN for clusters that
    never occur."""
    sums, n = np.zeros(k), np.zeros(k)
    for cm, fg, shape in zip(cluster_maps, fg_maps, shapes):
        c = upsample_nearest(cm, shape).ravel()
        f = upsample_nearest(fg, shape).ravel().astype(np.float64)
        cnt = np.bincount(c, minlength=k)
        tp = np.bincount(c, weights=f, minlength=k)
        present = cnt > 0
        sums[present] += tp[present] / cnt[present]
        n[present] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, sums / n, np.nan)


def _check_cbfe_threshold(how) -> None:
    if isinstance(how, str):
        if how != "otsu":
            raise ProtocolError(f"leopart-cd: cbfe_threshold must be a number in [0, 1] or 'otsu', got {how!r}")
    elif not is_number(how) or not 0 <= how <= 1:
        raise ProtocolError(f"leopart-cd: cbfe_threshold must be a number in [0, 1] or 'otsu', got {how!r}")


def cbfe_threshold(precisions: np.ndarray, how) -> float:
    """The precision at or above which a cluster is foreground: a fixed number, or 'otsu' (Otsu point of the
    histogram of the clusters' precisions). Neither uses labels."""
    _check_cbfe_threshold(how)
    if isinstance(how, str):
        threshold_otsu = require("skimage.filters", "protocol 'leopart-cd'").threshold_otsu
        vals = precisions[np.isfinite(precisions)]
        return float(vals.min()) if len(np.unique(vals)) < 2 else float(threshold_otsu(vals))
    return float(how)


def cooccurrence_matrix(maps: list[np.ndarray], levels: int, distances=(1, 2)) -> np.ndarray:
    """(levels, levels) row-stochastic-per-image co-occurrence of cluster ids (PROTOCOLS.md §4 step 5)."""
    graycomatrix = require("skimage.feature", "protocol 'leopart-cd'").graycomatrix
    total = np.zeros((levels, levels))
    images_with = np.zeros(levels)
    dtype = np.uint8 if levels <= 256 else np.uint16
    for m in maps:
        counts = graycomatrix(np.asarray(m, dtype=dtype), distances=list(distances), angles=list(ANGLES),
                              levels=levels).sum(axis=(2, 3)).astype(np.float64)
        np.fill_diagonal(counts, 0)
        rows = counts.sum(1, keepdims=True)
        total += np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
        images_with[np.unique(m)] += 1
    return np.divide(total, images_with[:, None], out=np.zeros_like(total), where=images_with[:, None] > 0)


def graph_edges(a: np.ndarray, weight_threshold: float) -> list[tuple[int, int, float]]:
    """Undirected edges (i < j, min(a_ij, a_ji)) where both directions reach the threshold (and are positive)."""
    i, j = np.triu_indices(len(a), 1)
    w = np.minimum(a[i, j], a[j, i])
    keep = (a[i, j] >= weight_threshold) & (a[j, i] >= weight_threshold) & (w > 0)
    return [(int(s), int(t), float(v)) for s, t, v in zip(i[keep], j[keep], w[keep])]


def communities(edges: list[tuple[int, int, float]], n_nodes: int, markov_time: float, preferred_modules: int,
                seed: int, shared_isolated: bool = False) -> np.ndarray:
    """Merged label (0..M-1) of every node: infomap's two-level modules; a node without edges is its own label, or,
    with `shared_isolated`, all such nodes share one label (Leopart's zero-initialised map). Labels are numbered by
    the smallest node id they contain, so they do not depend on infomap's module ids."""
    infomap = require("infomap", "protocol 'leopart-cd'")
    module = np.full(n_nodes, -1, dtype=np.int64)
    if edges:
        net = infomap.Network()
        for s, t, w in edges:
            net.add_link(s, t, w)
        opts = infomap.Options(two_level=True, directed=False, markov_time=float(markov_time),
                               preferred_number_of_modules=int(preferred_modules), seed=int(seed))
        for node, mod in infomap.run(net, options=opts).modules().items():
            module[node] = mod
    out = np.empty(n_nodes, dtype=np.int64)
    ids: dict[tuple, int] = {}
    for node in range(n_nodes):
        if module[node] >= 0:
            key = ("module", int(module[node]))
        else:
            key = ("isolated",) if shared_isolated else ("node", node)
        out[node] = ids.setdefault(key, len(ids))
    return out
