"""`datus`: DatUS² pseudo-mask generation end to end (PROTOCOLS.md §5; official code SonalKumar95/DatUS:
`segment_discovery.py`, `save_crops.py`, `CLS_extractor.py`, `seg_pseudoLabeling.py`).

1. segment discovery per image, on the cached last-block keys (facet `keys`: heads concatenated, CLS and registers
   already dropped): A = K Kᵀ, adjacency A > 0 (self-loops included, as the released code), Louvain
   (`sknetwork.clustering.Louvain`, default resolution 1, seeded with `louvain_seed`); each Louvain group split into
   8-connected components on the patch grid (`scipy.ndimage.label`, 3×3 structure). `key_centering: image-mean` (our
   default; the `datus` preset turns it off, as the paper) subtracts each image's mean key first. Adding one vector
   to every key leaves attention unchanged (softmax is shift-invariant), but it decides the sign of K Kᵀ: some
   backbones (DINOv2) have keys sharing one dominant component, so every affinity is positive, the graph is complete
   and Louvain leaves every patch alone (every segment is noise; the run then stops with this explanation). Centering
   makes the protocol comparable across backbones; the record's `positive_affinity_fraction` shows how close a
   backbone is to that case.
2. segments of more than `tau` = 5 patches are valid; the others are "noise".
3. segment embedding: the segment's patch-grid bounding box mapped back to the ORIGINAL image through the run's
   transform geometry, cropped there, non-segment patches zeroed, torchvision Resize(256, bicubic) + CenterCrop(224),
   the backbone's mean/std normalisation, the CLS output of the backbone's last block (final norm), L2-normalised.
   Mapping: an original pixel (x, y) belongs to patch (⌊t_y / p⌋, ⌊t_x / p⌋), where t is its centre (x + ½, y + ½)
   scaled by the transform's resize factor per axis and shifted by the centre-crop offset ('shorter'); pixels the
   transform cropped away belong to no patch. The crop is the bounding box of the segment's pixels, so it is the
   union of the segment's patch footprints in the original image. All crops go through the backbone in one batched
   pass, computed once per run (seeds only change the clustering) and kept as a cache entry (locked, checkpointed:
   a run killed mid-way resumes), keyed by the keys entry, the backbone, the segment maps' hash and the crop
   settings.
4. segment clustering: optional IncrementalPCA to `pca_dim` dimensions (default None: no PCA; the released code's
   IncrementalPCA keeps every component, a rotation that leaves k-means unchanged), then k-means with k-means++
   initialisation (sklearn, `n_init` restarts, random_state = seed) into K clusters (default: the number of classes;
   K > C allowed).
5. pseudo mask: each valid segment's patches painted with its cluster id; noise patches get their own label K, which is
   never matched; the patch-grid mask is nearest-upsampled to the label resolution (or `eval_size`).
6. evaluation: Hungarian on pixel counts when K ≤ C, many-to-one (majority) when K > C (`matching: auto`); noise pixels
   count as WRONG in the main score. Each seed's entry also carries `noise_excluded` (the same mapping scored on the
   non-noise pixels only, closer to what DatUS²'s `evalV2.py` reports; unmatched clusters still count as wrong there).
   Pixel accuracy, mIoU and mean F1 (`mf1`) are reported.
7. `crf=True`: the shared dense CRF (ssl_segbench.crf) refines each seed's final pseudo mask before it is scored: the
   hard labels become probabilities (`mask_confidence` on the pixel's label, noise included, the rest spread evenly)
   at label resolution (or `eval_size`). Every seed's per-image confusions also go into the record (`image_stats`,
   for bootstrap intervals over images).
`--save-masks DIR` writes, for the first seed, one palette PNG per image (the sample's name) of the final pseudo mask
in class space after matching at label resolution (or `eval_size`); noise and unmatched clusters are the
ignore index.

Deliberate departures from the released code: features from the run's transform (the code square-resizes with
`ViTFeatureExtractor` and feeds OpenCV's BGR image to the model unconverted; preset `datus` gives its 224 square
geometry); crops from the original image rather than the 224×224 resized one; Louvain seeded; k-means++ with sklearn
`KMeans` (the paper's review response; the code uses MiniBatchKMeans with random init, 50 epochs); the released
`evalV2.py` (hard-coded cluster→class map, label maps resized with linear interpolation, noise pixels and unmatched
clusters dropped) is not ported.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from ..cache import Entry, ensure
from ..digest import sha256_hex
from ..extras import require
from ..features import backbone_key, compute_precision, embed, fill_rows
from ..metrics import match, remap, scores
from ..paths import cache_dir
from ..progress import progress_bar
from ..transforms import Transform, normalise
from .base import (
    Context,
    MaskSaver,
    Protocol,
    ProtocolError,
    ProtocolResult,
    SharedParams,
    auto_matching,
    matching_axis,
    register_protocol,
    score_label_maps,
    score_seeds,
)

SEGMENT_CACHE_VERSION = 2  # 2: the backbone's key fields are features.backbone_key's


@dataclass(frozen=True)
class DatUSParams(SharedParams):
    """Parameters of DatUS² (module docstring): K, key centring, segment discovery (tau, Louvain), the crops whose
    CLS embeds a segment, PCA and k-means restarts, matching, and the CRF's confidence in the hard pseudo labels."""

    k: int | None = None  # None: number of classes
    key_centering: Literal["none", "image-mean"] = "image-mean"
    tau: int = 5
    louvain_resolution: float = 1.0
    louvain_seed: int = 0
    crop_resize: int = 256
    crop_size: int = 224
    pca_dim: int | None = None
    n_init: int = 10
    matching: Literal["auto", "hungarian-pixels", "hungarian-iou", "many-to-one"] = "auto"
    mask_confidence: float = 0.7  # CRF: the hard pseudo labels as unaries, mask_confidence on the label


@register_protocol
class DatUSProtocol(Protocol):
    name = "datus"
    axes = {"matching": matching_axis}
    requires = ("sknetwork", "sklearn")
    version = "1"
    description = "DatUS² pseudo masks: key-affinity Louvain segments, CLS of segment crops, k-means, matching"
    default_seeds = 5
    Params = DatUSParams
    presets = {"datus": {"resize": "square", "size": 224, "key_centering": "none"}}  # the paper's settings

    def check(self) -> None:
        self.positive("k", "pca_dim", allow_none=True)
        self.positive("crop_resize", "crop_size", "n_init", "louvain_resolution")
        if self.p.tau < 0:
            raise ProtocolError(f"datus: tau must be >= 0, got {self.p.tau!r}")
        self.fraction("mask_confidence")

    def backbone_facets(self) -> set[str]:
        return super().backbone_facets() | {"cls"}  # the CLS of every segment's crop

    def facets_needed(self) -> dict[str, tuple[str, ...]]:
        return {"eval": ("keys",)}

    def evaluate(self, ctx: Context) -> ProtocolResult:
        p = self.p
        if ctx.transform is None:
            raise ProtocolError("datus: the run's transform is needed to map segments back to the original images")
        ds = ctx.eval_set
        k = p.k or ds.num_classes
        matching = auto_matching(p.matching, k, ds.num_classes)
        fs = ctx.get(ds, ("keys",))
        keys = fs["keys"]

        t0 = time.perf_counter()
        segs, positive = [], []
        with progress_bar(len(ds), f"DatUS² segment discovery on {ds.id}/{ds.split}") as advance:
            for i in range(len(ds)):
                seg, pos = discover_segments(keys.image(i), p.louvain_resolution, p.louvain_seed,
                                             p.key_centering == "image-mean")
                segs.append(seg)
                positive.append(pos)
                advance()
        valid = [np.flatnonzero(np.bincount(s.ravel()) > p.tau) for s in segs]
        discovery_s = time.perf_counter() - t0
        if not any(len(v) for v in valid):
            hint = ""
            if np.mean(positive) > 0.99 and p.key_centering == "none":
                hint = (f" {100 * np.mean(positive):.1f} % of the key affinities are positive: this backbone's keys "
                        "share one dominant component, the graph A > 0 is complete and Louvain leaves every patch "
                        "alone. Subtracting each image's mean key leaves attention unchanged and removes it: "
                        "--param datus.key_centering=image-mean")
            raise ProtocolError(f"datus: no segment of more than tau={p.tau} patches in {len(ds)} images.{hint}")
        emb, emb_info = self._embeddings(ctx, fs, segs, valid)
        n_valid = len(emb)
        if n_valid < k:
            raise ProtocolError(f"datus: k={k} clusters but only {n_valid} valid segments (> tau={p.tau} patches) "
                                f"in {len(ds)} images; lower datus.k or datus.tau")
        if p.mask_confidence * (k + 1) <= 1:
            raise ProtocolError(f"datus: mask_confidence {p.mask_confidence} does not exceed 1/{k + 1}: the pseudo "
                                "label would not be the most likely one")
        z = reduce_dims(emb, p.pca_dim)

        # per image: patch grid of global valid-segment indices, -1 = noise
        vmaps, start = [], 0
        for s, v in zip(segs, valid):
            lut = np.full(int(s.max()) + 1, -1, dtype=np.int64)
            lut[v] = np.arange(start, start + len(v))
            vmaps.append(lut[s])
            start += len(v)

        clusters = []
        with progress_bar(len(ctx.seeds), f"k-means K={k} on {n_valid} segments") as advance:
            for seed in ctx.seeds:
                clusters.append(cluster_segments(z, k, seed, p.n_init))
                advance()
        # per image: the patch-grid pseudo mask of every seed (noise = label k), scored as hard labels
        maps = [np.stack([np.where(vm >= 0, cl[np.maximum(vm, 0)], k) for cl in clusters], -1).astype(np.float32)
                for vm in vmaps]
        saver = MaskSaver(ctx)
        confs, per_image = score_label_maps(ctx, maps, fs.labels, [k + 1] * len(clusters), "nearest", p.eval_size,
                                            p.mask_confidence, saver, "scoring pseudo masks",
                                            "hard pseudo labels (mask_confidence)")
        per_seed, stats = score_seeds(confs, per_image, lambda j, conf: noise_mapping(conf, matching), saver,
                                      extra=lambda j, conf, m: {"cluster_to_class": m[:-1].tolist(),
                                                                "noise_excluded": noise_excluded(conf, m)})

        n_seg = int(sum(int(s.max()) + 1 for s in segs))
        noise_patches = int(sum((vm < 0).sum() for vm in vmaps))
        total_patches = int(sum(vm.size for vm in vmaps))
        conf0 = confs[0]
        info = {
            "k": k, "matching": matching, "segments": n_seg, "valid_segments": n_valid,
            "noise_segments": n_seg - n_valid, "noise_patch_fraction": round(noise_patches / total_patches, 6),
            "noise_pixel_fraction": round(float(conf0[:, k].sum() / max(conf0.sum(), 1)), 6),
            "positive_affinity_fraction": round(float(np.mean(positive)), 6),
            "feature_dim": int(z.shape[1]), "segment_discovery_seconds": round(discovery_s, 3),
            "segment_embeddings": emb_info,
            "noise_excluded": {m: {"mean": float(np.mean([s["noise_excluded"][m] for s in per_seed])),
                                   "std": float(np.std([s["noise_excluded"][m] for s in per_seed]))}
                               for m in ("miou", "pixel_acc", "mf1")},
        }
        if ctx.save_masks is not None:
            res = f"{p.eval_size}x{p.eval_size}" if p.eval_size else "label resolution"
            info["saved_masks"] = (f"{ctx.save_masks}: seed {ctx.seeds[0]}, class space after matching, {res}, "
                                   "noise and unmatched clusters = ignore index")
        return ProtocolResult(per_seed, info, confs, stats)

    def _embeddings(self, ctx: Context, fs, segs: list[np.ndarray], valid: list[np.ndarray]) -> tuple[np.ndarray, dict]:
        """(N, D) L2-normalised CLS embeddings of the valid segments, in image order: a cache entry (locked,
        checkpointed and resumable), computed in one batched backbone pass when missing. Without a backbone
        reference or a keyed `keys` entry (planted tests) they are computed in memory."""
        p = self.p
        ds = ctx.eval_set
        segments_sha256 = sha256_hex(np.ascontiguousarray(s, dtype=np.int64).tobytes() + b"|"
                                     + v.astype(np.int64).tobytes() + b"\n" for s, v in zip(segs, valid))
        entry_name = fs.keys.get("keys") if isinstance(fs.keys, dict) else None
        n = int(sum(len(v) for v in valid))

        def rows(start: int):
            return segment_cls(ctx, segs, valid, p.crop_resize, p.crop_size, start)

        if ctx.backbone_ref is None or not entry_name:
            t0 = time.perf_counter()
            emb = np.zeros((n, ctx.backbone().spec.embed_dim), dtype=np.float32)
            for ids, block in rows(0):
                emb[ids] = block
            ctx.record_pass("datus segment-crop embeddings", True, split=ds.split, crops=n)
            return emb, {"cache": "computed", "crops": n, "seconds": round(time.perf_counter() - t0, 3)}
        ref = ctx.backbone_ref
        key = {"kind": "datus-segment-cls", "version": SEGMENT_CACHE_VERSION, "keys_entry": entry_name,
               **backbone_key(ref, compute_precision(ctx.device)), "layer": -1,
               "segments_sha256": segments_sha256, "tau": p.tau, "key_centering": p.key_centering,
               "louvain_resolution": p.louvain_resolution,
               "louvain_seed": p.louvain_seed, "crop_resize": p.crop_resize, "crop_size": p.crop_size,
               "transform": ctx.transform.to_dict()}
        entry = Entry.at(cache_dir(), "datus", ref.spec.id, ds.id, ds.split, key)
        computed = bool(ensure([entry], lambda _todo: fill_rows(entry, n, ref.spec.embed_dim, rows,
                                                                f"DatUS² CLS of {n} segment crops",
                                                                {"device": str(ctx.device)})))
        store = entry.open()
        ctx.record_pass("datus segment-crop embeddings", computed, split=ds.split, crops=n)
        info = {"cache": "computed" if computed else "hit", "path": str(entry.path), "crops": n,
                "seconds": store.meta["seconds"]}
        return np.asarray(store.data, dtype=np.float32), info


def discover_segments(keys: np.ndarray, resolution: float = 1.0, seed: int = 0,
                      center: bool = False) -> tuple[np.ndarray, float]:
    """(h, w, D) keys → ((h, w) segment ids 0..S-1, fraction of positive affinities): Louvain groups of the graph
    A = K Kᵀ > 0, each split into 8-connected components (numbered by group, then in raster order of their first
    patch). `center` subtracts the image's mean key first."""
    import scipy.sparse as sp

    louvain = require("sknetwork.clustering", "protocol 'datus'").Louvain
    h, w, d = keys.shape
    x = np.asarray(keys, dtype=np.float32).reshape(-1, d)
    if center:
        x = x - x.mean(0)
    adj = x @ x.T > 0
    groups = louvain(resolution=resolution, random_state=seed).fit_predict(sp.csr_matrix(adj.astype(np.float64)))
    return split_components(np.asarray(groups).reshape(h, w)), float(adj.mean())


def split_components(groups: np.ndarray) -> np.ndarray:
    """(h, w) group labels → (h, w) ids of the groups' 8-connected components, 0..S-1."""
    from scipy import ndimage

    out = np.empty(groups.shape, dtype=np.int64)
    n = 0
    for g in np.unique(groups):
        comp, m = ndimage.label(groups == g, structure=np.ones((3, 3), dtype=int))
        inside = comp > 0
        out[inside] = comp[inside] - 1 + n
        n += m
    return out


def _axis_patches(n: int, resized: int, offset: int, patch: int, n_patches: int) -> np.ndarray:
    """Patch index along one axis of each of the `n` original pixels (−1 where the transform cropped it away)."""
    t = (np.arange(n) + 0.5) * (resized / n) - offset
    idx = np.floor(t / patch).astype(np.int64)
    idx[(idx < 0) | (idx >= n_patches)] = -1
    return idx


def pixel_patches(transform: Transform, width: int, height: int, grid: tuple[int, int]):
    """(patch row of each original pixel row, patch column of each original pixel column) under `transform`."""
    size = transform.size
    if transform.policy == "square":
        rw, rh, left, top = size, size, 0, 0
    else:
        rw, rh = transform._resized(width, height)
        left, top = ((rw - size) // 2, (rh - size) // 2) if transform.policy == "shorter" else (0, 0)
    oh, ow = transform.output_size(width, height)
    p = transform.patch_size
    if (oh // p, ow // p) != tuple(grid):
        raise ProtocolError(f"datus: a {width}x{height} image gives a {oh // p}x{ow // p} patch grid under "
                            f"{transform}, but its cached keys are {grid[0]}x{grid[1]}")
    return _axis_patches(height, rh, top, p, grid[0]), _axis_patches(width, rw, left, p, grid[1])


def segment_crop(image: Image.Image | np.ndarray, segment: np.ndarray, rows: np.ndarray, cols: np.ndarray
                 ) -> Image.Image:
    """The original image (or its (H, W, 3) RGB array, converted once for all its segments) cropped to the segment's
    bounding box, pixels outside the segment's patches set to 0. `segment` is an (h, w) bool patch mask, `rows` /
    `cols` the patch index of each original pixel row / column."""
    pr, pc = np.flatnonzero(segment.any(1)), np.flatnonzero(segment.any(0))
    ys = np.flatnonzero((rows >= pr[0]) & (rows <= pr[-1]))
    xs = np.flatnonzero((cols >= pc[0]) & (cols <= pc[-1]))
    if not len(ys) or not len(xs):  # patches smaller than a pixel of an upscaled image: take the nearest pixel
        ys = ys if len(ys) else np.array([int(np.argmin(np.abs(np.where(rows < 0, 1 << 30, rows) - pr[0])))])
        xs = xs if len(xs) else np.array([int(np.argmin(np.abs(np.where(cols < 0, 1 << 30, cols) - pc[0])))])
    y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
    mask = segment[np.ix_(np.clip(rows[y0:y1], 0, None), np.clip(cols[x0:x1], 0, None))]
    mask &= (rows[y0:y1, None] >= 0) & (cols[None, x0:x1] >= 0)
    rgb = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image
    arr = rgb[y0:y1, x0:x1] * mask[..., None]
    return Image.fromarray(arr.astype(np.uint8))


def segment_cls(ctx: Context, segs: list[np.ndarray], valid: list[np.ndarray], resize: int, size: int,
                start: int = 0):
    """(crop rows, L2-normalised float32 CLS embeddings) of every valid segment's crop from row `start` on, in
    batches of `ctx.batch_size` through the one backbone pass (`features.embed`)."""
    import torchvision.transforms as T

    ds = ctx.eval_set
    spec = ctx.backbone_ref.spec if ctx.backbone_ref is not None else ctx.backbone().spec
    if size % spec.patch_size:
        raise ProtocolError(f"datus: crop_size {size} is not a multiple of the patch size {spec.patch_size}")
    geometry = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    owners = [(i, j) for i, v in enumerate(valid) for j in v]  # row → (image, segment id)

    def name_of(row: int) -> str:
        i, j = owners[row]
        return f"the crop of segment {j} of image '{ds.samples[i].name}' of {ds.id}/{ds.split}"

    def crops():
        batch, ids, row = [], [], 0
        for i, (s, v) in enumerate(zip(segs, valid)):
            if not len(v) or row + len(v) <= start:
                row += len(v)
                continue
            img = ds.load_image(i)
            rows, cols = pixel_patches(ctx.transform, img.size[0], img.size[1], s.shape)
            rgb = np.asarray(img.convert("RGB"))
            for j in v:
                if row >= start:
                    batch.append(normalise(geometry(segment_crop(rgb, s == j, rows, cols)), spec.mean, spec.std))
                    ids.append(row)
                    if len(batch) == ctx.batch_size:  # batched like the main pass (--batch-size)
                        yield torch.stack(batch), ids
                        batch, ids = [], []
                row += 1
        if batch:
            yield torch.stack(batch), ids

    for out, (_, ids) in embed(ctx.backbone(), crops(), -1, ("cls",), ctx.device, name_of=name_of):
        yield ids, torch.nn.functional.normalize(out["cls"], dim=1).numpy()


def reduce_dims(x: np.ndarray, pca_dim: int | None) -> np.ndarray:
    """IncrementalPCA to `pca_dim` dimensions (batches of max(4096, 2·D) rows, as the released code), or x itself."""
    if not pca_dim:
        return np.ascontiguousarray(x, dtype=np.float64)
    if pca_dim > min(x.shape):
        raise ProtocolError(f"datus: pca_dim={pca_dim} needs at least that many segments and feature dimensions, "
                            f"got {x.shape[0]} segments of {x.shape[1]} dims")
    pca = require("sklearn.decomposition", "protocol 'datus'").IncrementalPCA
    return pca(n_components=pca_dim, batch_size=max(4096, 2 * x.shape[1])).fit_transform(
        x.astype(np.float64))


def cluster_segments(z: np.ndarray, k: int, seed: int, n_init: int) -> np.ndarray:
    """k-means++ (sklearn KMeans, `n_init` restarts, random_state = seed) cluster id of each segment."""
    kmeans = require("sklearn.cluster", "protocol 'datus'").KMeans
    return kmeans(n_clusters=k, init="k-means++", n_init=n_init, random_state=seed).fit_predict(z).astype(np.int64)


def noise_mapping(conf: np.ndarray, matching: str) -> np.ndarray:
    """Label → class map of a (C, K + 1) confusion whose last column is noise: the K clusters matched with `matching`,
    the noise label never matched (-1, so its pixels count as wrong)."""
    if matching == "identity":
        raise ProtocolError("datus: matching must be hungarian-pixels, hungarian-iou or many-to-one")
    return np.append(match(np.asarray(conf)[:, :-1], matching), -1)


def noise_excluded(conf: np.ndarray, mapping: np.ndarray) -> dict:
    """The same mapping scored on the non-noise pixels only (closer to what DatUS²'s evalV2.py reports)."""
    conf = np.asarray(conf)
    return scores(remap(conf[:, :-1], np.asarray(mapping)[:-1], conf.shape[0]))
