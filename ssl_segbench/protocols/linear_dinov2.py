"""`linear-dinov2`: the linear segmentation protocol of DINOv2 and DINOv3 (PROTOCOLS.md §10; docs/linear_dinov2.md),
the dense number backbone papers report: a BatchNorm + 1×1 convolution head on frozen patch tokens, trained on
augmented 512 crops and evaluated with sliding windows at the reference's image scale.

Training (each iteration): `batch_size` train images, drawn in a per-epoch random order seeded by (seed, epoch), each
augmented from a generator seeded by (seed, iteration, slot), so the crops do not depend on how the loop is cut (mmseg's
pipeline, ours in `_Augment`): keep-ratio resize to `img_scale` × U(`ratio_range`) (bilinear without antialiasing and
labels nearest, as mmcv's OpenCV rescale; computed for the crop window alone), a random `crop_size` crop re-drawn up to
10 times while one class covers ≥ `cat_max_ratio` of its labelled pixels, a horizontal flip with probability `flip`,
photometric distortion (`photometric`), normalisation, padding to the crop (image 0, labels 255). The whole batch goes
through the frozen backbone (eval mode) in one call for all its layers (`features.embed`: bf16 autocast on CUDA), each
input centre-padded to a multiple of the patch (DINOv2's CenterPadding; a no-op for patch 16 at 512); tokens of the last
`layers` blocks (final norm, no CLS) are concatenated; the head's logits are resized bilinearly to the crop and trained
with cross-entropy (ignore 255) averaged over `loss_average` pixels, by AdamW with a linear warm-up from `warmup_ratio`
over `warmup_iters`, then `schedule` (poly to `min_lr`, or cosine to 0) over `iterations`. The head is trained on the
CPU or GPU in float32.

Resumable: the head, the optimiser, the iteration reached and torch's RNG state are checkpointed every
$SSL_SEGBENCH_CHECKPOINT_SECONDS into a partial cache entry keyed by everything that determines the head; a run
killed at any point resumes there to the same head (the data of iteration i is a function of (seed, i) alone), and a
finished head is a complete cache entry that later runs reuse. BatchNorm normalises each batch with its own
statistics, so the result depends on `batch_size` (the reference's SyncBN over 8 GPUs × 2 sees the same 16 images
per step; the record says so).

Evaluation: each image resized (keep ratio) to `img_scale` × each of `tta_ratios`, optionally flipped (`tta_flip`),
sliding windows of `slide_crop` / `slide_stride` (`sliding.slide_logits`; logits resized to each window and averaged
over overlaps), the map resized bilinearly to the label, softmax, averaged over the test-time views, argmax. Scored at
the dataset's full label resolution with its own labels: ADE20K's reduce_zero_label (0 → ignore, 1..150 → 0..149)
is what the `ade20k` dataset already decodes, so it is not applied again. No CRF (refused).

Presets (UNVERIFIED choices are named in the parameter docs below):
- `dinov2` (default): last layer, BN + 1×1 conv, AdamW lr 1e-3 wd 1e-4, poly (power 1) after 1,500 warm-up
  iterations from 1e-6, 40k iterations at batch 16, img_scale ADE (∞, 512), VOC (2048, 512), ratio U[0.5, 2],
  crop 512, cat_max_ratio 0.75, flip 0.5, mmseg PhotoMetricDistortion, slide 512 / 341;
- `dinov2-ms`: the last four layers concatenated, img_scale (∞, 640), ratio U[1, 3], crop 640; test-time
  ratios [1.0, 1.32, 1.73, 2.28, 3.0] with flip and slide 640 / 320 (UNVERIFIED: no verbatim config seen);
- `dinov3`: Dropout2d 0.1 before the BN, wd 1e-3, cosine after the warm-up, DINOv3's photometric transform (hue
  U(−0.5, 0.5)), short side 512;
- `dinov2-cached` / `dinov3-cached` (variant `cached`, its own column): the same head and optimiser trained on the
  feature cache's tokens of the un-augmented train images at the run's --size/--resize (one layer; a fixed grid),
  for CPU and quick looks; evaluation as above.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..atomic import write_guard
from ..cache import Entry, ensure
from ..errors import SegbenchError
from ..features import backbone_key, compute_precision, embed, loader_workers, prefetched
from ..metrics import ConfusionAccumulator, match
from ..paths import cache_dir, checkpoint_seconds
from ..progress import progress_bar
from ..registry import is_int, is_number
from ..sliding import slide_logits
from ..transforms import POLICIES, normalise
from .base import (
    Context,
    MaskSaver,
    Protocol,
    ProtocolError,
    ProtocolResult,
    SharedParams,
    register_protocol,
    score_seeds,
)
from .training import check_train_split, split_candidates, train_split_info

HEAD_VERSION = 2  # bump when a head trained under the same key could differ
NO_LIMIT = 99999999  # mmseg's "no limit" long side of img_scale
EVAL_ONLY = ("slide_crop", "slide_stride", "tta_ratios", "tta_flip", "resize", "eval_size", "crf", "crf_temperature")
PHOTOMETRIC = ("mmseg", "dinov3", "none")


@dataclass(frozen=True)
class LinearDinov2Params(SharedParams):
    """The protocol's parameters (module docstring). UNVERIFIED: `img_scale` for cityscapes19 ((2048, 1024), mmseg's
    Cityscapes default: no DINOv2 config was released), everything of `dinov2-ms` past its paper sentence (schedule,
    iterations, img_scale of datasets other than ADE20K, `tta_ratios`, `tta_flip`, `slide_crop`/`slide_stride`), the
    order and probabilities of DINOv3's photometric steps (`photometric: dinov3`: mmseg's structure with DINOv3's
    ranges) and weight decay on the BN parameters (applied to all head parameters, as AdamW without paramwise rules)."""

    # the augmented variant reads no cached features, so the run's transform does not matter: it is fixed here (pad,
    # at crop_size) so that --size/--resize never split its column; the cached presets take the run's (resize None)
    resize: Literal[(None, *POLICIES)] = "pad"
    variant: Literal["augmented", "cached"] = "augmented"
    train_split: str | list = field(default_factory=lambda: ["trainaug", "default"])
    layers: int = 1  # the last `layers` blocks (ending at --layer), concatenated
    head_dropout: float = 0.0  # Dropout2d before the BN (DINOv3: 0.1)
    head_init_std: float = 0.01  # conv weights ~ N(0, std), bias 0 (mmseg BaseDecodeHead; DINOv3 LinearHead)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["poly", "cosine"] = "poly"
    poly_power: float = 1.0
    min_lr: float = 0.0
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    iterations: int = 40000
    batch_size: int = 16
    loss_average: Literal["all-pixels", "valid-pixels"] = "all-pixels"  # mmseg 0.27 / DINOv3: mean over all pixels
    img_scale: dict = field(default_factory=lambda: {"ade20k": [NO_LIMIT, 512], "voc": [2048, 512],
                                                     "cityscapes19": [2048, 1024], "*": [NO_LIMIT, 512]})
    ratio_range: list = field(default_factory=lambda: [0.5, 2.0])
    crop_size: int = 512
    cat_max_ratio: float = 0.75
    flip: float = 0.5
    photometric: Literal[PHOTOMETRIC] = "mmseg"
    slide_crop: int = 512
    slide_stride: int = 341
    tta_ratios: list = field(default_factory=lambda: [1.0])
    tta_flip: bool = False


_MS = {"layers": 4, "img_scale": {"ade20k": [NO_LIMIT, 640], "*": [NO_LIMIT, 640]}, "ratio_range": [1.0, 3.0],
       "crop_size": 640, "slide_crop": 640, "slide_stride": 320, "tta_ratios": [1.0, 1.32, 1.73, 2.28, 3.0],
       "tta_flip": True}
_V3 = {"head_dropout": 0.1, "weight_decay": 1e-3, "schedule": "cosine", "photometric": "dinov3",
       "img_scale": {"*": [NO_LIMIT, 512]}}

_CACHED = {"variant": "cached", "resize": None}


def _variant_axis(params: dict) -> str | None:
    return "head on cached features" if params["variant"] == "cached" else None


def _iterations_axis(params: dict) -> str:
    return f"{params['iterations']:,} iterations"


@register_protocol
class LinearDinov2Protocol(Protocol):
    name = "linear-dinov2"
    version = "1"
    description = "DINOv2/DINOv3 linear segmentation: BN + 1×1 head on augmented crops, sliding-window evaluation"
    default_seeds = 1
    Params = LinearDinov2Params
    presets = {"dinov2": {}, "dinov2-ms": _MS, "dinov3": _V3, "dinov2-cached": _CACHED,
               "dinov3-cached": {**_V3, **_CACHED}}
    axes = {"training": _variant_axis, "iterations": _iterations_axis}

    def check(self) -> None:
        p = self.p
        self.positive("layers", "lr", "iterations", "batch_size", "crop_size", "slide_crop", "slide_stride",
                      "head_init_std")
        for key in ("weight_decay", "min_lr", "poly_power", "warmup_iters", "warmup_ratio"):
            if getattr(p, key) < 0:
                raise ProtocolError(f"{self.name}: {key} must be >= 0, got {getattr(p, key)!r}")
        if p.min_lr >= p.lr:
            raise ProtocolError(f"{self.name}: min_lr must be below lr ({p.lr}), got {p.min_lr!r}")
        for key in ("head_dropout", "flip"):
            if not 0 <= getattr(p, key) <= 1:
                raise ProtocolError(f"{self.name}: {key} must be a probability in [0, 1], got {getattr(p, key)!r}")
        if not 0 < p.cat_max_ratio <= 1:
            raise ProtocolError(f"{self.name}: cat_max_ratio must be in (0, 1] (1: no re-draws), got "
                                f"{p.cat_max_ratio!r}")
        if not (len(p.betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in p.betas)):
            raise ProtocolError(f"{self.name}: betas must be [beta1, beta2], each in [0, 1), got {p.betas!r}")
        if not (len(p.ratio_range) == 2 and all(is_number(r) for r in p.ratio_range)
                and 0 < p.ratio_range[0] <= p.ratio_range[1]):
            raise ProtocolError(f"{self.name}: ratio_range must be [low, high] with 0 < low <= high, got "
                                f"{p.ratio_range!r}")
        if not (p.tta_ratios and all(is_number(r) and r > 0 for r in p.tta_ratios)):
            raise ProtocolError(f"{self.name}: tta_ratios must be a non-empty list of positive numbers, got "
                                f"{p.tta_ratios!r}")
        if "*" not in p.img_scale or not all(
                isinstance(k, str) and isinstance(v, list) and len(v) == 2 and all(is_int(s) and s > 0 for s in v)
                for k, v in p.img_scale.items()):
            raise ProtocolError(f"{self.name}: img_scale maps dataset ids (and '*' for any other) to [long, short] "
                                f"positive integers (mmseg's img_scale), got {p.img_scale!r}")
        check_train_split(self.name, p.train_split)
        if p.variant == "cached" and p.layers != 1:
            raise ProtocolError(f"{self.name}: variant=cached trains on the cache's tokens of one layer; set "
                                "layers=1 or variant=augmented")
        if p.crf:
            raise ProtocolError(f"{self.name}: crf is not offered (the reference evaluates without one); leave "
                                "--crf out")
        if p.eval_size is not None:
            raise ProtocolError(f"{self.name}: scores at the labels' own resolution, as the reference does; leave "
                                "eval_size unset")

    def input_size(self, patch_size: int) -> int | None:
        return self.p.size or (self.p.crop_size if self.p.variant == "augmented" else None)

    def check_data(self, eval_set, train_set, transform) -> None:
        if self.p.variant == "cached" and transform is not None and transform.policy == "pad":
            raise ProtocolError(f"{self.name}: variant=cached batches cached token grids of one size; resize 'pad' "
                                "gives each image its own grid: use a preset dinov2-cached / dinov3-cached with "
                                "--resize shorter or square, or --param linear-dinov2.resize=shorter")

    def facets_needed(self) -> dict[str, tuple[str, ...]]:
        # the augmented variant embeds its crops and windows itself; the cached one reads the train split's tokens
        return {"train": ("tokens",)} if self.p.variant == "cached" else {}

    def backbone_facets(self) -> set[str]:
        return {"tokens"}

    def train_split_wanted(self) -> list[str]:
        return split_candidates(self.p.train_split)

    def evaluate(self, ctx: Context) -> ProtocolResult:
        p, ds = self.p, ctx.eval_set
        train_set, info = train_split_info(ctx)
        backbone = ctx.backbone()
        layers = [ctx.layer - k for k in reversed(range(p.layers))]
        for layer in layers:
            backbone.layer_index(layer)  # out of range: refused before any training
        heads, trained = [], []
        for seed in ctx.seeds:
            head, facts = trained_head(ctx, train_set, p, layers, seed)
            heads.append(head)
            trained.append(facts)
        info.update({
            "iterations": p.iterations, "training": trained, "layers": layers,
            "img_scale": {"train": scale_for(p, train_set.id), "eval": scale_for(p, ds.id)},
            "batch_dependence": f"the head's BatchNorm normalises each batch of {p.batch_size} crops with its own "
                                "statistics, so the result depends on batch_size (the reference: SyncBN over 8 GPUs "
                                "× 2 crops, the same 16 per step)"})
        saver = MaskSaver(ctx)
        accs = [ConfusionAccumulator(ds.num_classes, ds.num_classes, ds.ignore_index, per_image=True) for _ in heads]
        t0 = time.perf_counter()
        with progress_bar(len(ds), f"linear-dinov2 sliding-window evaluation on {ds.id}/{ds.split}") as advance:
            for i in range(len(ds)):
                img, gt = ds.load_image(i), torch.from_numpy(ds.load_mask(i))[None]
                for j, pred in enumerate(predict(ctx, backbone, heads, img, tuple(gt.shape[1:]), p, layers, ds.id)):
                    accs[j].update(gt, pred[None])
                    saver(i, j, pred.numpy())
                advance()
        ctx.record_pass("linear-dinov2 sliding-window evaluation", True, split=ds.split, images=len(ds),
                        views_per_image=len(p.tta_ratios) * (2 if p.tta_flip else 1),
                        seconds=round(time.perf_counter() - t0, 3))
        confs = [a.compute() for a in accs]
        per_seed, stats = score_seeds(confs, [a.images for a in accs], lambda j, conf: match(conf, "identity"), saver,
                                      record_mapping=False)
        return ProtocolResult(per_seed, info, confs, stats)


def scale_for(p: LinearDinov2Params, dataset_id: str) -> list[int]:
    """The [long, short] img_scale of `dataset_id` (its own entry, else '*')."""
    return list(p.img_scale.get(dataset_id, p.img_scale["*"]))


def rescaled_size(width: int, height: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: (width, height) times min(long / long edge, short / short edge), rounded."""
    long, short = max(scale), min(scale)
    factor = min(long / max(width, height), short / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def linear_taps(n_in: int, n_out: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples start .. start+count-1 of a bilinear resize of n_in samples to n_out without antialiasing (OpenCV's
    INTER_LINEAR, which mmcv's rescale uses; torch's align_corners=False): each one's two source indices and the
    weight of the second, from the source position (i + 0.5) · n_in / n_out − 0.5 clamped to the edges."""
    src = np.clip((np.arange(start, start + count, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    return lo, np.minimum(lo + 1, n_in - 1), (src - lo).astype(np.float32)


def nearest_taps(n_in: int, n_out: int, start: int, count: int) -> np.ndarray:
    """Samples start .. start+count-1 of a nearest resize of n_in samples to n_out (OpenCV's INTER_NEAREST, mmcv's for
    labels): source index floor(i · n_in / n_out), in integers."""
    return np.minimum(np.arange(start, start + count, dtype=np.int64) * n_in // n_out, n_in - 1)


def rgb(img: Image.Image) -> np.ndarray:
    """The image as an (H, W, 3) uint8 array (datasets decode to RGB already; anything else is converted)."""
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def rescale_window(im: np.ndarray, size: tuple[int, int], top: int, left: int, h: int, w: int) -> np.ndarray:
    """The (h, w) window at (top, left) of the (H, W, C) uint8 image `im` resized bilinearly to `size` (width,
    height), computed for the window's pixels alone: the values of resizing the whole image, then cropping, with
    float weights rounded to the nearest integer (OpenCV: 11-bit fixed-point weights, so a pixel may differ by 1). A
    512 crop of an image rescaled to twice 512 costs a crop, not the whole rescaled image."""
    ylo, yhi, wy = linear_taps(im.shape[0], size[1], top, h)
    xlo, xhi, wx = linear_taps(im.shape[1], size[0], left, w)
    first = int(xlo[0]) if len(xlo) else 0  # only the source columns the window reads
    im, xlo, xhi = im[:, first: int(xhi.max(initial=first)) + 1], xlo - first, xhi - first
    wy, wx = wy[:, None, None], wx[None, :, None]
    rows = im[ylo].astype(np.float32) * (1 - wy) + im[yhi].astype(np.float32) * wy
    out = rows[:, xlo] * (1 - wx) + rows[:, xhi] * wx
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def lr_at(it: int, p: LinearDinov2Params) -> float:
    """The learning rate of iteration `it` (0-based). poly (mmcv's PolyLrUpdaterHook): (lr − min_lr)·(1 − it /
    iterations)^power + min_lr, and during the warm-up that value × (1 − (1 − it / warmup_iters)·(1 − warmup_ratio))
    (mmcv's linear warm-up scales the regular rate). cosine (DINOv3's WarmupOneCycleLR): a linear ramp from
    lr·warmup_ratio to lr over the warm-up, then lr·(1 + cos(π·(it − warmup) / (iterations − warmup))) / 2."""
    warm = it < p.warmup_iters
    if p.schedule == "poly":
        regular = (p.lr - p.min_lr) * (1 - it / p.iterations) ** p.poly_power + p.min_lr
        return regular * (1 - (1 - it / p.warmup_iters) * (1 - p.warmup_ratio)) if warm else regular
    if warm:
        return p.lr * (p.warmup_ratio + (1 - p.warmup_ratio) * it / p.warmup_iters)
    span = max(p.iterations - p.warmup_iters, 1)
    return p.lr * (1 + math.cos(math.pi * (it - p.warmup_iters) / span)) / 2


def centre_pad(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) → zero-padded to multiples of `patch`, the padding split evenly (the extra pixel after): DINOv2's
    CenterPadding."""
    h, w = x.shape[-2:]
    ph, pw = -h % patch, -w % patch
    if not ph and not pw:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class Head(torch.nn.Module):
    """DINOv2's BNHead / DINOv3's LinearHead: [Dropout2d] → BatchNorm2d → 1×1 conv, weights ~ N(0, init_std)."""

    def __init__(self, dim: int, num_classes: int, dropout: float, init_std: float):
        super().__init__()
        self.dropout = torch.nn.Dropout2d(dropout) if dropout else torch.nn.Identity()
        self.bn = torch.nn.BatchNorm2d(dim)
        self.conv = torch.nn.Conv2d(dim, num_classes, kernel_size=1)
        torch.nn.init.normal_(self.conv.weight, 0.0, init_std)
        torch.nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(self.dropout(x)))


def backbone_features(ctx: Context, backbone, images: torch.Tensor, layers: list[int], what: str) -> torch.Tensor:
    """(B, 3, H, W) normalised images → (B, D·len(layers), h, w) float32 tokens on the run's device: centre-padded to
    the patch, one `embed` call for all layers (one backbone forward; bf16 autocast on CUDA), the layers concatenated
    along the channels in the listed order."""
    x = centre_pad(images, backbone.spec.patch_size)
    outputs, _ = next(embed(backbone, [(x, range(len(x)))], tuple(layers), ("tokens",), ctx.device,
                            name_of=lambda j: f"{what} {j}", on_device=True))
    return outputs["tokens"].permute(0, 3, 1, 2).clone()  # a normal tensor (embed's are inference tensors)


def predict(ctx: Context, backbone, heads: list[Head], img: Image.Image, label_size: tuple[int, int],
            p: LinearDinov2Params, layers: list[int], dataset_id: str) -> list[torch.Tensor]:
    """Each head's (H, W) predicted labels of one image (module docstring: test-time views, sliding windows, softmax
    averaged); every window goes through the backbone once for all heads (seeds)."""
    long, short = scale_for(p, dataset_id)
    spec = backbone.spec
    heads = [h.to(ctx.device).eval() for h in heads]

    def logits_of(windows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = backbone_features(ctx, backbone, windows, layers, "a sliding window of the evaluation")
            logits = torch.cat([h(feats) for h in heads], 1)
        return F.interpolate(logits, size=windows.shape[-2:], mode="bilinear", align_corners=False)

    prob = None
    for ratio in p.tta_ratios:
        size = rescaled_size(*img.size, (int(long * ratio), int(short * ratio)))
        x = normalise(rescale_window(rgb(img), size, 0, 0, size[1], size[0]), spec.mean,
                      spec.std).to(ctx.device)
        for flipped in (False, True) if p.tta_flip else (False,):
            logits = slide_logits(x.flip(-1) if flipped else x, logits_of, p.slide_crop, p.slide_stride,
                                  ctx.batch_size)
            logits = logits.flip(-1) if flipped else logits
            logits = F.interpolate(logits[None], size=label_size, mode="bilinear", align_corners=False)
            sm = torch.cat([part.softmax(1) for part in logits.split(logits.shape[1] // len(heads), 1)])
            prob = sm if prob is None else prob + sm
    if not bool(torch.isfinite(prob).all()):
        raise ProtocolError("linear-dinov2: the head's scores contain NaN or infinite values (a diverged head or "
                            "broken features); refusing to turn them into labels")
    return list(prob.argmax(1).cpu())


class _Augment:
    """The training pipeline of one image (module docstring), drawn from a numpy generator."""

    def __init__(self, p: LinearDinov2Params, scale: list[int], ignore_index: int, mean, std):
        self.p, self.scale, self.ignore, self.mean, self.std = p, scale, ignore_index, mean, std

    def __call__(self, img: Image.Image, mask: np.ndarray, rng: np.random.Generator):
        p = self.p
        ratio = rng.uniform(*p.ratio_range)
        size = rescaled_size(*img.size, (self.scale[0] * ratio, self.scale[1] * ratio))
        c = p.crop_size
        top, left = self.crop_box(mask, size, rng)
        h, w = min(c, size[1] - top), min(c, size[0] - left)
        im = rescale_window(rgb(img), size, top, left, h, w)
        lab = self.labels(mask, size, top, left)
        if rng.random() < p.flip:
            im, lab = im[:, ::-1], lab[:, ::-1]
        im = photometric(np.ascontiguousarray(im), rng, p.photometric)
        x = normalise(im, self.mean, self.std).numpy()
        x = np.pad(x, ((0, 0), (0, c - x.shape[1]), (0, c - x.shape[2])))
        y = np.pad(lab, ((0, c - lab.shape[0]), (0, c - lab.shape[1])), constant_values=self.ignore)
        return x, y

    def labels(self, mask: np.ndarray, size: tuple[int, int], top: int, left: int) -> np.ndarray:
        """The crop window at (top, left) of `mask` resized by nearest neighbour to `size` (width, height), int64."""
        c = self.p.crop_size
        rows = nearest_taps(mask.shape[0], size[1], top, min(c, size[1] - top))
        cols = nearest_taps(mask.shape[1], size[0], left, min(c, size[0] - left))
        return np.asarray(mask)[np.ix_(rows, cols)].astype(np.int64)

    def crop_box(self, mask: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
        """(top, left) of mmseg's RandomCrop in the image rescaled to `size`: a uniform box, re-drawn up to 10 times
        while fewer than two classes are in it or one class holds ≥ cat_max_ratio of its labelled pixels (the last
        draw is kept)."""
        c = self.p.crop_size
        mh, mw = max(size[1] - c, 0), max(size[0] - c, 0)

        def draw():
            return int(rng.integers(0, mh + 1)), int(rng.integers(0, mw + 1))

        box = draw()
        if self.p.cat_max_ratio < 1:
            for _ in range(10):
                seg = self.labels(mask, size, *box)
                cnt = np.bincount(seg[seg != self.ignore])
                cnt = cnt[cnt > 0]
                if len(cnt) > 1 and cnt.max() / cnt.sum() < self.p.cat_max_ratio:
                    break
                box = draw()
        return box


def photometric(im: np.ndarray, rng: np.random.Generator, kind: str) -> np.ndarray:
    """mmseg's PhotoMetricDistortion (defaults) on an (H, W, 3) uint8 RGB crop: brightness + U(−32, 32), contrast ×
    U(0.5, 1.5) before or after (one coin) saturation × U(0.5, 1.5) and a hue shift of an integer in [−18, 18) of
    180 steps, each applied with probability 0.5, clipped to 0..255 after each step. `dinov3`: the same with the hue
    shifted by U(−0.5, 0.5) of the circle. HSV is PIL's (8-bit hue), not OpenCV's: hue steps round differently."""
    if kind == "none":
        return im

    def convert(a, alpha=1.0, beta=0.0):  # a table over the 256 values, in the reference's float32 arithmetic
        return np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8)[a]

    if rng.integers(2):
        im = convert(im, beta=rng.uniform(-32, 32))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        im = convert(im, alpha=rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv = np.array(Image.fromarray(im).convert("HSV"))
        hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        im = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    if rng.integers(2):
        turn = rng.integers(-18, 18) / 180 if kind == "mmseg" else rng.uniform(-0.5, 0.5)
        hsv = np.array(Image.fromarray(im).convert("HSV"))
        hsv[..., 0] = ((np.arange(256) + int(round(turn * 256))) % 256).astype(np.uint8)[hsv[..., 0]]
        im = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    if not contrast_first and rng.integers(2):
        im = convert(im, alpha=rng.uniform(0.5, 1.5))
    return im


def image_order(seed: int, n: int, position: int) -> int:
    """The image at global sample `position` (iteration × batch_size + slot): a fresh permutation of the n images
    per epoch, seeded by (seed, epoch), so the order does not depend on the batch size."""
    epoch, k = divmod(position, n)
    return int(np.random.default_rng([seed, epoch, n]).permutation(n)[k])


class _TrainCrops(torch.utils.data.Dataset):
    """Item k: the batch of iteration start + k, (images (B, 3, crop, crop), labels (B, crop, crop)), a function of
    (seed, iteration) alone, so DataLoader workers (or a prefetch thread) build batches ahead of the backbone without
    changing them."""

    def __init__(self, ds, p: LinearDinov2Params, seed: int, start: int, mean, std):
        self.ds, self.p, self.seed, self.start = ds, p, seed, start
        self.aug = _Augment(p, scale_for(p, ds.id), ds.ignore_index, mean, std)

    def __len__(self) -> int:
        return self.p.iterations - self.start

    def __getitem__(self, k: int):
        it, n, b = self.start + k, len(self.ds), self.p.batch_size
        xs, ys = [], []
        for slot in range(b):
            i = image_order(self.seed, n, it * b + slot)
            x, y = self.aug(self.ds.load_image(i), self.ds.load_mask(i), np.random.default_rng([self.seed, it, slot]))
            xs.append(x)
            ys.append(y)
        # numpy only: a torch kernel here would start a second OpenMP team beside the forward's on a CPU run
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def augmented_batches(ctx: Context, ds, p: LinearDinov2Params, layers: list[int], seed: int, start: int):
    """(tokens (B, D·L, h, w), labels (B, crop, crop)) on the device for iterations start, start + 1, ...: crops built
    ahead (`loader_workers` DataLoader workers on a GPU, a prefetch thread on the CPU), each batch embedded in one
    backbone call for all its layers."""
    backbone = ctx.backbone()
    crops = _TrainCrops(ds, p, seed, start, backbone.spec.mean, backbone.spec.std)
    workers = loader_workers(ctx.device)
    loader = torch.utils.data.DataLoader(crops, batch_size=None, shuffle=False, num_workers=workers,
                                         pin_memory=str(ctx.device).startswith("cuda"),
                                         prefetch_factor=4 if workers else None)
    for it, (x, y) in enumerate(loader if workers else prefetched(loader), start):
        what = f"an augmented crop (linear-dinov2, iteration {it}) of {ds.id}/{ds.split}, batch slot"
        yield backbone_features(ctx, backbone, x, layers, what), y.to(ctx.device, non_blocking=True)


def cached_batches(fs, p: LinearDinov2Params, seed: int, start: int, device: str):
    """(tokens, labels) for iterations start, start + 1, ... from the feature cache (the run's transform, no
    augmentation), the images drawn in the same order as the augmented variant's."""
    tokens, labels = fs["tokens"], fs.labels
    for it in range(start, p.iterations):
        idx = [image_order(seed, len(tokens), it * p.batch_size + slot) for slot in range(p.batch_size)]
        x = torch.from_numpy(np.stack([np.asarray(tokens.image(i), dtype=np.float32) for i in idx]))
        y = torch.from_numpy(np.stack([labels.labels(i) for i in idx]))
        yield x.permute(0, 3, 1, 2).to(device), y.to(device)


def head_key(ctx: Context, ds, p: LinearDinov2Params, layers: list[int], seed: int) -> dict:
    """Everything that determines a trained head: backbone fields, layers, the train data, the training parameters
    (all but the evaluation's), the seed and, for the cached variant, the transform of its features."""
    ref = ctx.backbone_ref
    params = {k: v for k, v in asdict(p).items() if k not in EVAL_ONLY}
    return {"kind": "linear-dinov2-head", "version": HEAD_VERSION, **backbone_key(ref, compute_precision(ctx.device)),
            "layers": layers, "dataset": ds.id, "split": ds.split, "content_sha256": ds.content_sha256(),
            "n_images": len(ds), "num_classes": ds.num_classes, "ignore_index": ds.ignore_index, "params": params,
            "seed": seed, "transform": ctx.transform.to_dict() if p.variant == "cached" and ctx.transform else None}


def trained_head(ctx: Context, ds, p: LinearDinov2Params, layers: list[int], seed: int) -> tuple[Head, dict]:
    """The head of `seed`, from its complete cache entry or trained now (resuming a checkpoint), and facts for the
    record."""
    entry = Entry.at(cache_dir(), "linear-dinov2", ctx.backbone_ref.spec.id, ds.id, ds.split,
                     head_key(ctx, ds, p, layers, seed))
    facts = {"seed": seed}
    computed = bool(ensure([entry], lambda _todo: facts.update(_train(ctx, ds, p, layers, seed, entry))))
    saved = torch.load(entry.path / "head.pt", map_location="cpu", weights_only=True)
    head = Head(saved["dim"], ds.num_classes, p.head_dropout, p.head_init_std)
    head.load_state_dict(saved["head"])
    ctx.record_pass(f"linear-dinov2 head training ({p.variant})", computed, split=ds.split, seed=seed,
                    iterations=p.iterations, crops=p.iterations * p.batch_size)
    facts.update({"head": "trained in this run" if computed else "from the cache", "cache_entry": entry.path.name})
    return head.eval(), facts


def _save(path, obj, what: str) -> None:
    """torch.save to `path` atomically (a temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    with write_guard(path, what):
        torch.save(obj, tmp)
        os.replace(tmp, path)


def _rng_state(device: str) -> dict:
    """torch's RNG states that the training draws from (Dropout2d): the CPU one, and the GPU's on CUDA."""
    out = {"cpu": torch.get_rng_state()}
    if str(device).startswith("cuda"):
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def head_step(head: Head, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, ignore_index: int,
              loss_average: str) -> None:
    """One optimiser step: the head's logits of tokens `x` resized bilinearly to the (B, crop, crop) labels `y`,
    cross-entropy summed over the labelled pixels and divided by all pixels or by the labelled ones (`loss_average`)."""
    logits = F.interpolate(head(x), size=y.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
    denom = y.numel() if loss_average == "all-pixels" else max(int((y != ignore_index).sum()), 1)
    opt.zero_grad(set_to_none=True)
    (loss / denom).backward()
    opt.step()


def _train(ctx: Context, ds, p: LinearDinov2Params, layers: list[int], seed: int, entry: Entry) -> dict:
    """Train one head into `entry` (module docstring), resuming `<entry>.partial/state.pt` when its key matches."""
    partial = entry.path.with_name(entry.path.name + ".partial")
    state_path = partial / "state.pt"
    cached = ctx.get(ds, ("tokens",)) if p.variant == "cached" else None
    if cached is not None:
        dim = cached["tokens"].data.shape[1]
    else:
        dim = ctx.backbone().spec.embed_dim * len(layers)
    torch.manual_seed(seed)
    head = Head(dim, ds.num_classes, p.head_dropout, p.head_init_std).to(ctx.device)
    opt = torch.optim.AdamW(head.parameters(), lr=p.lr, betas=tuple(p.betas), weight_decay=p.weight_decay)
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("key") == entry.key:
            head.load_state_dict(state["head"])
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["cpu"])
            if "cuda" in state["rng"]:
                torch.cuda.set_rng_state(state["rng"]["cuda"])
            start = state["iteration"]
    with write_guard(partial, "linear-dinov2 training checkpoint folder"):
        partial.mkdir(parents=True, exist_ok=True)
    head.train()
    last = time.monotonic()
    try:
        with progress_bar(p.iterations, f"linear-dinov2 head ({p.variant}), seed {seed}" +
                          (f" (resuming at iteration {start})" if start else "")) as advance:
            advance(start)
            batches = augmented_batches(ctx, ds, p, layers, seed, start) if cached is None else \
                cached_batches(cached, p, seed, start, ctx.device)
            for it, (x, y) in enumerate(batches, start):
                for group in opt.param_groups:
                    group["lr"] = lr_at(it, p)
                head_step(head, opt, x, y, ds.ignore_index, p.loss_average)
                advance()
                if time.monotonic() - last > checkpoint_seconds() and it + 1 < p.iterations:
                    _save(state_path, {"key": entry.key, "iteration": it + 1, "head": head.state_dict(),
                                       "optimizer": opt.state_dict(), "rng": _rng_state(ctx.device)},
                          "linear-dinov2 training checkpoint")
                    last = time.monotonic()
        _save(partial / "head.pt", {"dim": dim, "head": {k: v.cpu() for k, v in head.state_dict().items()}},
              "linear-dinov2 head")
        with write_guard(partial, "linear-dinov2 head entry"):
            (partial / "meta.json").write_text(json.dumps({"key": entry.key, "resumed_from": start}))
            state_path.unlink(missing_ok=True)
            shutil.rmtree(entry.path, ignore_errors=True)
            os.rename(partial, entry.path)
    except SegbenchError:  # a refusal (non-finite tokens, a write error): a resume would meet it again
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"resumed_from_iteration": start, "iterations_run_here": p.iterations - start}
