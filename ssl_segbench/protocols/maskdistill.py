"""`maskdistill`: MaskDistill's object-mask pseudo labels (PROTOCOLS.md §6; official code wvangansbeke/MaskDistill,
`gen_masks.py` and `utils/cluster.py`), scored directly (`stage='pseudo'`) or distilled into a light head on the frozen
patch tokens (`stage='distill-linear'` / `'distill-conv'`). Each stage is its own record; the masks and their
embeddings are computed once per split and cached, so `--protocol maskdistill,maskdistill:distill-linear` finds the
masks of the first stage on disk.

1. One class-agnostic object mask per image, on the patch grid of the run's transform (the original's geometry, shorter
   side 640 zero-padded to a multiple of the patch size, is preset `original`), in this order:
   a. CLS map, averaged over the first `heads` (5) heads: `cls_map='softmax'` (default) reads the cached `attn` facet
      (last block, softmax attention of the CLS query over the patches, DINO's own attention map); `'raw-logits'`
      (presets `original*`, as the released code) reads `attn_logits`, the q_cls·k_j logits before the softmax (times
      the attention's scale, a positive factor that changes neither step b nor c). Ranks within one head are the same;
      the head average is not.
   b. Threshold to keep `mass` (50 %) of its mass, DINO's rule: sort ascending, normalise to sum 1, keep the patches
      whose cumulative sum exceeds 1 − mass. Patches outside are set to 0, as in the original.
   c. Proposals: the ⌊topk·n⌋ (40 %) highest patches of the thresholded map; the source is the first. The original
      leaves ties between the zeroed patches to `torch.topk`'s unspecified order; here ties are broken by the
      unthresholded attention, then by patch index, which makes the ranking deterministic (and equal to ranking by
      attention). `proposals='topk-in-mass'` instead drops proposals outside the mass set.
   d. Key affinity G = K Kᵀ with the heads concatenated (= the per-head Kᵢ Kᵢᵀ summed over heads), in float64.
   e. Keep the proposals with G[source, p] > 0 (the source itself included), sum their rows of G (computed as
      (Σ K_p) Kᵀ, the same sum without forming G), threshold > 0, and keep the connected component (4-connected, as
      `scipy.ndimage.label`'s default that the original uses) that contains the source.
   `center_keys=True` (our default; the `original*` presets turn it off, as the released code) subtracts the image's
   mean key first, which leaves attention unchanged (softmax is shift-invariant). The recipe relies on
   LOST's observation on DINO ViT-S/16 that object keys correlate positively with each other and negatively with
   background keys; DINOv2's keys share a large common component (on the VOC sample its norm is ~95 % of the average
   key norm), so every affinity is positive and the faithful recipe returns the whole image. Centring restores signs
   and keeps the protocol comparable across backbones (DatUS² makes the same choice).
2. Mask embedding: the mask's patch bounding box [c0·p, (c1+1)·p) × [r0·p, (r1+1)·p) in the transformed image is
   mapped back to the ORIGINAL image by undoing the transform (the centre-crop offset for 'shorter', then the per-axis
   resize scale; padding is clipped away) and rounded to whole pixels. That crop of the original image, normalised with
   the embedding backbone's mean/std and zero-padded right/bottom to a multiple of its patch size (as the original
   does), goes through the backbone (the run's, or `embed_backbone`: a registry id or path; the original uses DINO
   ViT-S/8) and its last-layer CLS token is the embedding. Crops of equal padded shape share a batch. `crop_size`
   (int) resizes every crop to that square instead (bicubic; one batch shape, faster; not the original).
3. Clustering: embeddings of the masks of the train and eval splits (`fit_set='all'`, the original clusters all its
   masks at once; 'eval' for the eval split only) are whitened (`whiten='std'`: each dimension divided by its standard
   deviation, `scipy.cluster.vq.whiten`, which the original calls; 'pca': PCA whitening; None) and L2-normalised, then
   sklearn `MiniBatchKMeans(batch_size=1000, n_init=3, random_state=seed)` (n_init 3 was sklearn's default when the
   original ran; the original's seed was 1234: `--seeds 1234`). K = (C − 1) × `overcluster` object clusters, or `k`.
   With fewer masks than K (tiny datasets) K is lowered to the number of masks, and the record says so.
4. Pseudo masks: label 0 outside the mask, 1 + cluster inside, on the patch grid, upsampled nearest to label
   resolution (the original's `interpolate(..., mode='nearest')`). Matching (`matching='auto'`: 'hungarian' when
   K = C − 1, else 'many-to-one'): with `background_class` (0, VOC-style datasets whose class 0 is background) label
   0 is fixed to that class; Hungarian (pixel counts) then matches the object clusters to the other classes, and
   many-to-one sends each object cluster to its majority class (background allowed). With `background_class=None`
   label 0 is matched like any cluster. Departure: the original matches clusters to classes per mask, by the class of
   the ground-truth box that overlaps the mask most; here matching uses the dataset-level pixel confusion, like every
   other protocol of this harness.
5. Distillation (departure: the original trains a Mask R-CNN, then a DeepLab-v3 with CRF rounds, on the pseudo masks; a
   frozen-backbone harness trains a light head on cached tokens instead): a 1×1 convolution ('distill-linear') or
   3×3 conv → BatchNorm → ReLU → 1×1 conv with `conv_hidden` channels ('distill-conv'), trained with cross-entropy on
   the pseudo labels of the train split (the eval images when there is none; the record says so) in cluster space
   (K + 1 outputs; padding ignored), with the linear probe's optimiser and schedule. Its predictions are matched on the
   eval split exactly as the pseudo masks are (the paper evaluates its distilled model by matching clusters too).
6. `--save-masks`: one PNG per eval image (sample name), the first seed's final label map (pseudo mask, or the
   distilled head's prediction under `<stage>/`) at label resolution, mapped to classes, in the dataset's palette.
7. `crf=True`: the shared dense CRF (ssl_segbench.crf, the original's parameters). For the pseudo stage the hard
   labels become probabilities (`mask_confidence` to the mask's label, the rest spread evenly).

Cache (`cache.py` entries: locked, checkpointed, resumable, committed atomically): the masks and boxes of a split in
`<cache>/pseudo/maskdistill-masks/...`, keyed by the cache keys of the CLS-map and `keys` entries (backbone, revision,
dataset content, transform, layer, precision) and the mask parameters; their crop embeddings in
`<cache>/pseudo/maskdistill-embeddings/...`, keyed by the masks' key, the embedding backbone's identity and precision,
and the crop size. A run killed while embedding crops resumes from its last checkpoint. Clustering (seconds) is
recomputed from them for every run; it is deterministic for a seed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import ndimage

from ..backbones import BackboneRef
from ..cache import Entry, ensure, filling, json_digest
from ..extras import require
from ..features import backbone_key, compute_precision, embed, fill_rows
from ..metrics import hungarian
from ..paths import cache_dir
from ..progress import progress_bar
from ..transforms import normalise
from .base import (
    Context,
    MaskSaver,
    Predictions,
    Protocol,
    ProtocolError,
    ProtocolResult,
    SharedParams,
    auto_matching,
    count_confusions,
    matching_axis,
    register_protocol,
    score_label_maps,
    score_seeds,
)
from .training import cached_steps, conv_head_scorer, train_head, train_split_info

STAGES = ("pseudo", "distill-linear", "distill-conv")
MATCHINGS = ("auto", "hungarian", "many-to-one")
WHITENING = ("std", "pca", None)
CACHE_VERSION = 3  # 2: masks and crop embeddings are separate, resumable cache entries; 3: the embedding
# backbone's key fields are features.backbone_key's (`backbone`, not `id`), the embeddings' meta says `seconds`
PSEUDO_IGNORE = -1  # label of padding in the pseudo labels a head trains on
_CLS_FACET = {"softmax": "attn", "raw-logits": "attn_logits"}  # where the CLS map is read from


# --- 1. object mask discovery ------------------------------------------------------------------------------------

def mass_threshold(a: np.ndarray, mass: float) -> np.ndarray:
    """Boolean mask of the largest values of `a` (1-D, non-negative) holding `mass` of its sum (DINO's rule: sort
    ascending, normalise, keep where the cumulative sum exceeds 1 − mass)."""
    order = np.argsort(a, kind="stable")
    total = float(a.sum())
    cum = np.cumsum(a[order], dtype=np.float64) / (total if total > 0 else 1.0)
    keep = np.zeros(a.shape, dtype=bool)
    keep[order] = cum > 1.0 - mass
    return keep


def object_mask(attn: np.ndarray, keys: np.ndarray, heads: int = 5, mass: float = 0.5, topk: float = 0.4,
                proposals: str = "topk", connectivity: int = 4, center_keys: bool = False) -> np.ndarray:
    """(h, w, H) CLS attention and (h, w, D) keys of one image → (h, w) bool object mask (module docstring, step 1).
    `center_keys` subtracts the image's mean key before the affinity (not in the original; see the docstring)."""
    h, w, n_heads = attn.shape
    if heads > n_heads:  # averaging fewer heads than recorded would put one result under two columns
        raise ProtocolError(f"maskdistill: heads={heads}, but the backbone's CLS attention has {n_heads} heads; set "
                            f"--param maskdistill.heads=N with N <= {n_heads}")
    n = h * w
    a = np.asarray(attn, dtype=np.float64).reshape(n, n_heads)[:, :heads].mean(1)
    keep = mass_threshold(a, mass)
    g = a * keep
    order = np.lexsort((np.arange(n), -a, -g))  # by thresholded attention, ties by attention, then index
    cand = order[: max(1, int(topk * n))]
    if proposals == "topk-in-mass":
        cand = cand[keep[cand]]
    elif proposals != "topk":
        raise ProtocolError(f"maskdistill: proposals must be 'topk' or 'topk-in-mass', got {proposals!r}")
    source = int(order[0])
    k = np.asarray(keys, dtype=np.float64).reshape(n, -1)
    if center_keys:
        k = k - k.mean(0)
    nodes = cand[k[cand] @ k[source] > 0]
    fg = (k[nodes].sum(0) @ k.T > 0).reshape(h, w) if len(nodes) else np.zeros((h, w), dtype=bool)
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    comp, _ = ndimage.label(fg, structure=structure)
    r, c = divmod(source, w)
    if comp[r, c] == 0:  # degenerate keys (a zero vector at the source): the source patch alone
        out = np.zeros((h, w), dtype=bool)
        out[r, c] = True
        return out
    return comp == comp[r, c]


def patch_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(r0, c0, r1, c1) inclusive patch rows/columns of a non-empty mask."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def box_to_original(box: tuple[int, int, int, int], transform, width: int, height: int) -> tuple[int, int, int, int]:
    """Patch box on the transformed grid → (left, top, right, bottom) pixels of the original width × height image
    (right/bottom exclusive): undo the centre crop ('shorter'), clip to the resized image (drops 'pad' padding), undo
    the per-axis resize scale, round, keep at least one pixel."""
    r0, c0, r1, c1 = box
    p = transform.patch_size
    rw, rh = transform._resized(width, height)  # the resize the transform applied before cropping / padding
    x0, x1, y0, y1 = c0 * p, (c1 + 1) * p, r0 * p, (r1 + 1) * p
    if transform.policy == "shorter":
        dx, dy = (rw - transform.size) // 2, (rh - transform.size) // 2
        x0, x1, y0, y1 = x0 + dx, x1 + dx, y0 + dy, y1 + dy
    x0, x1 = min(max(x0, 0), rw), min(max(x1, 0), rw)
    y0, y1 = min(max(y0, 0), rh), min(max(y1, 0), rh)
    sx, sy = rw / width, rh / height
    left, right = min(int(round(x0 / sx)), width - 1), min(int(round(x1 / sx)), width)
    top, bottom = min(int(round(y0 / sy)), height - 1), min(int(round(y1 / sy)), height)
    return left, top, max(right, left + 1), max(bottom, top + 1)


# --- 3. clustering -----------------------------------------------------------------------------------------------

def whiten(x: np.ndarray, mode: str | None) -> np.ndarray:
    """'std': divide each dimension by its standard deviation (scipy.cluster.vq.whiten; constant dimensions kept);
    'pca': centre, rotate onto the principal axes and scale each to unit variance (near-null axes dropped); None."""
    x = np.asarray(x, dtype=np.float64)
    if mode is None:
        return x
    if mode == "std":
        std = x.std(0)
        return x / np.where(std > 0, std, 1.0)
    if mode == "pca":
        xc = x - x.mean(0)
        _, s, vt = np.linalg.svd(xc, full_matrices=False)
        keep = s > max(s.max(), 1e-12) * 1e-6
        return xc @ vt[keep].T / (s[keep] / math.sqrt(len(x)))
    raise ProtocolError(f"maskdistill: whiten must be one of {WHITENING}, got {mode!r}")


def cluster_embeddings(emb: np.ndarray, k: int, seed: int, whiten_mode: str | None = "std",
                       batch_size: int = 1000, n_init: int = 3) -> np.ndarray:
    """(n, D) mask embeddings → (n,) cluster ids in 0..k−1: whiten, L2-normalise, MiniBatchKMeans."""
    minibatch_kmeans = require("sklearn.cluster", "protocol 'maskdistill'").MiniBatchKMeans
    x = whiten(emb, whiten_mode)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    km = minibatch_kmeans(n_clusters=k, random_state=seed, batch_size=batch_size, n_init=n_init)
    return km.fit_predict(x.astype(np.float32)).astype(np.int64)


# --- 4. matching -------------------------------------------------------------------------------------------------

def match_labels(conf: np.ndarray, matching: str, background_class: int | None) -> np.ndarray:
    """(C, K+1) confusion of pseudo labels (0 = outside the mask, 1.. = clusters) → label → class map (−1 unmatched).

    With a background class, label 0 is that class and only the object labels are matched: Hungarian on pixel counts
    against the other classes, or many-to-one (majority class, background allowed). Without, every label is matched."""
    conf = np.asarray(conf)
    c, n_labels = conf.shape
    if matching not in ("hungarian", "many-to-one"):
        raise ProtocolError(f"maskdistill: matching must be one of {MATCHINGS}, got {matching!r}")
    if background_class is None:
        if matching == "hungarian":
            return hungarian(conf, "pixels")
        mapping = conf.argmax(0).astype(np.int64)
        mapping[conf.sum(0) == 0] = -1
        return mapping
    mapping = np.full(n_labels, -1, dtype=np.int64)
    mapping[0] = background_class
    obj = conf[:, 1:]
    if matching == "hungarian":
        rows = np.array([r for r in range(c) if r != background_class])
        sub = hungarian(obj[rows], "pixels")
        mapping[1:] = np.where(sub >= 0, rows[np.maximum(sub, 0)], -1)
    else:
        mapping[1:] = obj.argmax(0)
        mapping[1:][obj.sum(0) == 0] = -1
    return mapping


# --- the protocol ------------------------------------------------------------------------------------------------

def _head(kind: str, dim: int, n_out: int, hidden: int) -> torch.nn.Module:
    if kind == "distill-linear":
        return torch.nn.Conv2d(dim, n_out, kernel_size=1)
    return torch.nn.Sequential(torch.nn.Conv2d(dim, hidden, kernel_size=3, padding=1), torch.nn.BatchNorm2d(hidden),
                               torch.nn.ReLU(inplace=True), torch.nn.Conv2d(hidden, n_out, kernel_size=1))


@dataclass(frozen=True)
class MaskDistillParams(SharedParams):
    """Parameters of MaskDistill (module docstring): the stage, object-mask discovery (step 1), the crops' embedding
    backbone and size (2), clustering (3), matching and upsampling (4), the distilled head's training (5) and the
    CRF's confidence in the hard pseudo labels (7)."""

    stage: Literal[STAGES] = "pseudo"
    cls_map: Literal["softmax", "raw-logits"] = "softmax"
    heads: int = 5
    mass: float = 0.5
    topk: float = 0.4
    proposals: Literal["topk", "topk-in-mass"] = "topk"
    connectivity: Literal[4, 8] = 4
    center_keys: bool = True
    embed_backbone: str | None = None
    crop_size: int | None = None
    fit_set: Literal["all", "eval"] = "all"
    whiten: Literal[WHITENING] = "std"
    k: int | None = None
    overcluster: int = 1
    kmeans_batch_size: int = 1000
    kmeans_n_init: int = 3
    background_class: int | None = 0
    matching: Literal[MATCHINGS] = "auto"
    upsample: Literal["auto", "nearest", "bilinear"] = "auto"
    epochs: int = 25
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int = 20
    batch_size: int = 60
    train_size: int = 100
    conv_hidden: int = 256
    mask_confidence: float = 0.7


@register_protocol
class MaskDistillProtocol(Protocol):
    name = "maskdistill"
    axes = {"matching": matching_axis}
    requires = ("sklearn",)
    version = "1"
    description = "MaskDistill object-mask pseudo labels (CLS attention + key affinity, crop-CLS k-means), or a " \
                  "light head distilled from them"
    default_seeds = 1
    Params = MaskDistillParams
    _original = {"resize": "pad", "size": 640, "center_keys": False, "cls_map": "raw-logits"}  # the released code
    presets = {
        "original": dict(_original),
        "distill-linear": {"stage": "distill-linear"},
        "distill-conv": {"stage": "distill-conv"},
        "original-distill-linear": {**_original, "stage": "distill-linear"},
        "original-distill-conv": {**_original, "stage": "distill-conv"},
    }

    def check(self) -> None:
        p = self.p
        if not 0 < p.topk <= 1 or not 0 < p.mass <= 1:
            raise ProtocolError("maskdistill: topk and mass are fractions in (0, 1]")
        self.positive("heads", "overcluster", "kmeans_batch_size", "kmeans_n_init", "epochs",
                      "lr", "lr_step", "batch_size", "train_size", "conv_hidden")
        self.positive("k", "crop_size", allow_none=True)
        self.fraction("mask_confidence")
        if p.background_class is not None and p.background_class < 0:
            raise ProtocolError(f"maskdistill: background_class must be a class index or null, got "
                                f"{p.background_class!r}")

    def backbone_facets(self) -> set[str]:
        return super().backbone_facets() | {"cls"}  # the CLS of every object crop

    def facets_needed(self) -> dict[str, tuple[str, ...]]:
        # tokens too in the pseudo stage: the distilled stages then find everything in the cache
        facets = (_CLS_FACET[self.p.cls_map], "keys", "tokens")
        return {"eval": facets, "train": facets} if self.train_split_wanted() else {"eval": facets}

    @classmethod
    def masks_subdir(cls, params: dict) -> str | None:
        return None if params["stage"] == "pseudo" else params["stage"]  # distilled heads' maps apart from the masks

    def train_split_wanted(self) -> list[str] | None:
        p = self.p
        return ["default"] if p.stage != "pseudo" or p.fit_set == "all" else None

    def evaluate(self, ctx: Context) -> ProtocolResult:
        p = self.p
        upsample = p.upsample if p.upsample != "auto" else "nearest" if p.stage == "pseudo" else "bilinear"
        ds = ctx.eval_set
        if ctx.transform is None:
            raise ProtocolError("maskdistill maps mask boxes back to the original images and needs the run's transform")
        c = ds.num_classes
        bg = p.background_class
        if bg is not None and not 0 <= bg < c:
            raise ProtocolError(f"maskdistill: background_class {bg} is not a class of '{ds.id}' (0..{c - 1}); use "
                                "None for datasets without a background class")
        distill = p.stage != "pseudo"
        info: dict = {"stage": p.stage, "upsample": upsample}
        train_set = ctx.train_set
        if distill:
            info.update(train_split_info(ctx)[1])
        use_train = train_set is not None and (distill or p.fit_set == "all")
        needed = self.facets_needed()
        splits = {"eval": (ds, ctx.get(ds, needed["eval"]))}
        if use_train:
            splits["train"] = (train_set, ctx.get(train_set, needed["train"]))

        entries = {name: self._entry(ctx, split_ds, fs, p) for name, (split_ds, fs) in splits.items()}
        info["pseudo_cache_hit"] = {name: e["cache_hit"] for name, e in entries.items()}
        info["n_masks"] = {name: len(e["boxes"]) for name, e in entries.items()}
        info["mask_area"] = {name: round(float(np.mean([m.mean() for m in e["masks"]])), 4)
                             for name, e in entries.items()}
        info["embed_backbone"] = entries["eval"]["embed_key"]
        info["pseudo_seconds"] = {name: e["seconds"] for name, e in entries.items()}

        fit_names = [n for n in ("train", "eval") if n in entries and (n == "eval" or p.fit_set == "all")]
        info["fit_set"] = "+".join(f"{splits[n][0].split}" for n in fit_names)
        fit = np.concatenate([entries[n]["embeddings"] for n in fit_names])
        k = p.k or (c - 1) * p.overcluster
        info["k"] = k
        if len(fit) < k:
            info["k_effective"] = len(fit)
            info["note"] = f"only {len(fit)} masks to cluster: K lowered from {k} to {len(fit)}"
            k = len(fit)
        matching = auto_matching(p.matching, k, c - 1, "hungarian")
        info["matching"] = matching + ("" if bg is None else f" (label 0 fixed to class {bg})")

        assignments = []  # per seed: {split name: (n_images,) cluster ids}
        for seed in ctx.seeds:
            ids = cluster_embeddings(fit, k, seed, p.whiten, p.kmeans_batch_size, p.kmeans_n_init)
            out, start = {}, 0
            for n in fit_names:
                out[n] = ids[start: start + len(entries[n]["boxes"])]
                start += len(entries[n]["boxes"])
            assignments.append(out)

        def grid(name: str, i: int, s: int) -> np.ndarray:
            return entries[name]["masks"][i].astype(np.int64) * (1 + int(assignments[s][name][i]))

        evalfs = splits["eval"][1]
        n_labels = k + 1
        saver = MaskSaver(ctx, self.masks_subdir(self.params))
        t0 = time.perf_counter()
        if not distill:
            maps = [np.stack([grid("eval", i, s) for s in range(len(ctx.seeds))], -1).astype(np.float32)
                    for i in range(len(ds))]
            confs, per_image = score_label_maps(ctx, maps, evalfs.labels, [n_labels] * len(ctx.seeds), upsample,
                                                p.eval_size, p.mask_confidence, saver, "scoring pseudo masks",
                                                "hard pseudo labels (mask_confidence)")
        else:
            tname = "train" if "train" in splits else "eval"
            tds, tfs = splits[tname]
            heads = []
            with progress_bar(len(ctx.seeds) * p.epochs, f"{p.stage} on {tds.id}/{tds.split}") as adv:
                for s, seed in enumerate(ctx.seeds):
                    label_of = _PseudoLabels(tds, tfs, ctx.transform, lambda i, s=s, n=tname: grid(n, i, s))
                    heads.append(train_head(lambda dim: _head(p.stage, dim, n_labels, p.conv_hidden),
                                            tfs["tokens"].data.shape[1], cached_steps(tfs["tokens"], label_of, p),
                                            PSEUDO_IGNORE, p, seed, ctx.device, adv))
            with progress_bar(len(ds), f"predicting {ds.id}/{ds.split}") as advance:
                stream = Predictions(evalfs["tokens"], evalfs.labels, [conv_head_scorer(h) for h in heads], n_labels,
                                     upsample, p.eval_size, ctx.scoring, score_type="distilled-head logits")
                confs, per_image = count_confusions(stream, c, ds.ignore_index, saver, advance)
        info["scoring_seconds"] = round(time.perf_counter() - t0, 3)
        per_seed, stats = score_seeds(confs, per_image, lambda j, conf: match_labels(conf, matching, bg), saver)
        if saver.written:
            info["saved_masks"] = saver.written
        return ProtocolResult(per_seed, info, confs, stats)

    # --- masks + embeddings of one split, cached --------------------------------------------------------------
    def _entry(self, ctx: Context, ds, fs, p: MaskDistillParams) -> dict:
        """Object masks (from cached features) and their crop embeddings (a backbone pass) of one split, each a cache
        entry of its own: locked, checkpointed, resumable."""
        embed_ref, load = _embedder(ctx, p)
        embed_key = _embed_identity(embed_ref, ctx.device)
        cls_facet = _CLS_FACET[p.cls_map]
        mask_key = {"kind": "maskdistill-masks", "version": CACHE_VERSION, "dataset": ds.id, "split": ds.split,
                    "cls_map": fs[cls_facet].meta.get("key"), "keys": fs["keys"].meta.get("key"),
                    "transform": ctx.transform.to_dict(),
                    "mask": {"cls_map": p.cls_map, "heads": p.heads, "mass": p.mass, "topk": p.topk,
                             "proposals": p.proposals, "connectivity": p.connectivity,
                             "center_keys": p.center_keys}}
        masks_entry = Entry.at(cache_dir(), "pseudo", "maskdistill-masks", ds.id, ds.split, mask_key)
        emb_key = {"kind": "maskdistill-embeddings", "version": CACHE_VERSION, "masks": json_digest(mask_key),
                   "embed": embed_key, "crop_size": p.crop_size}
        emb_entry = Entry.at(cache_dir(), "pseudo", "maskdistill-embeddings", ds.id, ds.split, emb_key)
        masks_done = ensure([masks_entry], lambda _: _compute_masks(masks_entry, ctx, ds, fs, p))
        mstore = masks_entry.open()
        boxes = mstore.array("boxes")
        emb_done = ensure([emb_entry], lambda _: _embed_crops(emb_entry, ds, boxes, load, embed_ref.spec, p,
                                                             ctx.device, ctx.batch_size))
        estore = emb_entry.open()
        ctx.record_pass("maskdistill crop embeddings", bool(emb_done), split=ds.split, crops=len(boxes),
                        embed_backbone=embed_key["backbone"], masks_computed=bool(masks_done))
        return {"masks": [mstore.image(i)[..., 0].astype(bool) for i in range(len(mstore))], "boxes": boxes,
                "embeddings": np.asarray(estore.data, dtype=np.float32), "cache_hit": not (masks_done or emb_done),
                "embed_key": embed_key,
                "seconds": {"masks": mstore.meta["mask_seconds"], "embed": estore.meta["seconds"]}}


def _embedder(ctx: Context, p: MaskDistillParams):
    """(the reference of the backbone that embeds the crops, a loader), without loading any weights."""
    if p.embed_backbone:
        ref = BackboneRef(p.embed_backbone)

        def load():
            return ref.load(ctx.device)
    else:
        ref = ctx.backbone_ref
        load = ctx.backbone
    if ref is None:
        raise ProtocolError("maskdistill embeds mask crops with a backbone, but the run gave none")
    return ref, load


def _embed_identity(ref, device) -> dict:
    """What of the embedding backbone goes into the embeddings' cache key (the patch size sets the crops' padding)."""
    return {**backbone_key(ref, compute_precision(device)), "patch_size": ref.spec.patch_size}


def _compute_masks(entry: Entry, ctx: Context, ds, fs, p: MaskDistillParams) -> None:
    """One object mask per image (module docstring, step 1) and its box in the original image."""
    t0 = time.perf_counter()
    n = len(ds)
    writer = entry.writer([tuple(g) for g in fs["keys"].index[:, 1:].tolist()], 1, np.uint8)
    boxes = []
    with filling([writer]), progress_bar(n, f"object masks {ds.id}/{ds.split}") as advance:
        for i in range(n):
            m = object_mask(np.asarray(fs[_CLS_FACET[p.cls_map]].image(i), dtype=np.float32),
                            np.asarray(fs["keys"].image(i), dtype=np.float32),
                            p.heads, p.mass, p.topk, p.proposals, p.connectivity, p.center_keys)
            writer.write(i, m.reshape(-1, 1).astype(np.uint8))
            boxes.append(box_to_original(patch_box(m), ctx.transform, *ds.image_size(i)))
            advance()
        writer.commit({"mask_seconds": round(time.perf_counter() - t0, 3)},
                      arrays={"boxes": np.asarray(boxes, dtype=np.int64).reshape(-1, 4)})


def _embed_crops(entry: Entry, ds, boxes: np.ndarray, load, spec, p: MaskDistillParams, device: str,
                 batch_size: int) -> None:
    """CLS token of each box's crop of the original image into `entry`, one row per image; crops of one padded shape
    are batched together (`batch_size`, the run's), in a fixed order (by shape, then image), so a checkpoint after any
    batch can be resumed."""
    from PIL import Image

    if spec.num_prefix_tokens == 0:
        raise ProtocolError(f"maskdistill embeds crops by their CLS token, but '{spec.id}' has none; name another "
                            "backbone with --param maskdistill.embed_backbone=ID")
    ps = spec.patch_size
    cs = p.crop_size

    def shape_of(box):
        if cs:
            return cs, cs
        w, h = box[2] - box[0], box[3] - box[1]
        return math.ceil(h / ps) * ps, math.ceil(w / ps) * ps

    def crop(i: int) -> torch.Tensor:
        im = ds.load_image(i).crop(tuple(int(v) for v in boxes[i]))
        if cs:
            im = im.resize((cs, cs), Image.BICUBIC)
        t = normalise(im, spec.mean, spec.std)
        hh, ww = shape_of(boxes[i])
        return torch.nn.functional.pad(t, (0, ww - t.shape[2], 0, hh - t.shape[1]))

    groups: dict[tuple, list[int]] = {}
    for i, b in enumerate(boxes):
        groups.setdefault(shape_of(b), []).append(i)
    batches = [idx[s: s + batch_size] for idx in groups.values() for s in range(0, len(idx), batch_size)]

    def name_of(i: int) -> str:
        return f"the mask crop of image '{ds.samples[i].name}' of {ds.id}/{ds.split}"

    def rows(start: int):
        """The batches after the first `start` crops (embedded before an interruption), through the backbone."""
        done, todo = 0, []
        for chunk in batches:
            if done >= start:
                todo.append(chunk)
            done += len(chunk)
        images = ((torch.stack([crop(i) for i in chunk]), chunk) for chunk in todo)
        for out, (_, chunk) in embed(load(), images, -1, ("cls",), device, name_of=name_of):
            yield chunk, out["cls"].numpy()

    fill_rows(entry, len(boxes), spec.embed_dim, rows, f"crop CLS embeddings ({spec.id}) {ds.id}/{ds.split}",
              {"device": str(device)})


class _PseudoLabels:
    """Image i's pseudo labels at label resolution (nearest from the patch grid), padding set to PSEUDO_IGNORE."""

    def __init__(self, ds, fs, transform, grid_of):
        self.ds, self.fs, self.transform, self.grid_of = ds, fs, transform, grid_of
        self._valid: dict[int, tuple[int, int]] = {}  # image → resized (width, height), read once per image

    def __call__(self, i: int) -> np.ndarray:
        g = self.grid_of(i)
        hh, ww = self.fs.labels.grid(i)
        rows = np.minimum(np.arange(hh) * g.shape[0] // hh, g.shape[0] - 1)
        cols = np.minimum(np.arange(ww) * g.shape[1] // ww, g.shape[1] - 1)
        lab = g[rows][:, cols].astype(np.int64)
        if self.transform is not None and self.transform.policy == "pad":
            if i not in self._valid:
                self._valid[i] = self.transform._resized(*self.ds.image_size(i))
            rw, rh = self._valid[i]
            lab[rh:, :] = PSEUDO_IGNORE
            lab[:, rw:] = PSEUDO_IGNORE
        return lab


