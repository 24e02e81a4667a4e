"""`retrieval`: dense in-context retrieval (Hummingbird; open-hummingbird-eval; PROTOCOLS.md §8). No training: every
patch of an evaluation image takes the labels of its nearest train patches.

1. Memory bank: the train split's patch tokens, L2-normalised, each with its class distribution (the fraction of its
   labelled pixels in each class; ignore pixels are dropped, and a patch with none is not stored). The tokens come
   from the cached train features of the run's transform (`augment: 0`, cache only), or from `augment` epochs of
   augmented crops computed through the backbone once and cached per (aug_seed, epoch): paired
   RandomResizedCrop(size, scale `aug_scale`) of image and mask, then colour jitter (brightness, contrast,
   saturation, hue, each ± `aug_jitter` with probability `aug_jitter_p`), drawn from a generator seeded by
   (aug_seed, epoch, image), so crops never depend on batching.
2. Bounded memory (`memory_size`; None keeps every labelled patch): each (epoch, image) gives memory_size // (images ×
   epochs) patches, chosen by the reference's rare-class rule: score = Σ over the classes in the patch of how many of
   the image's patches contain that class, times U(0, 1) noise; the lowest scores are kept. The noise comes from a
   generator seeded by (seed, epoch, image): the selection depends on the seed alone, never on batching.
3. Queries: the evaluation split's cached tokens, L2-normalised; the `k` nearest bank rows by cosine (exact by default,
   reading the memory-mapped bank in chunks: `knn.exact_search`; `index: ivf | hnsw` for banks too large to scan);
   label = Σ softmax(similarity / temperature) · neighbour distributions; that soft label grid bilinearly upsampled to
   label resolution, argmax. A `k` above the bank's rows is refused, never clamped (`check_data` before extraction
   where the image count and patch grid already rule it out, `check_bank` once the bank is built).
   With `slide_crop` / `slide_stride` (both or neither; for images too large to embed whole, as Cityscapes at
   1024×2048) the queries come from sliding windows instead: each evaluation image at the run's transform goes through
   the backbone window by window, each window's soft label grid is resized to the window and averaged over overlaps
   (`base.eval_predictions`); the memory bank is unchanged.
4. Scoring: predictions are in class space, so the confusion is scored directly (`matching: none`). The reference
   also applies Hungarian matching (`matching: hungarian-iou`) and counts ignore pixels as background when it builds
   the memory (`ignore: background`): both are offered as named variants, used by the `hummingbird-*` presets so that
   the published numbers stand beside exactly the columns measured that way.

Departures from the reference, deliberate: a bounded memory holds exactly the selected patches (the reference's
pre-allocated memory keeps zero rows when images give fewer patches than their quota); patches without a labelled
pixel are never stored; the sampling noise is seeded per image; search is exact unless an approximate index is asked
for (the reference's README numbers used ScaNN).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..cache import ArrayStore, Entry, ensure, filling, release_pages
from ..features import backbone_key, compute_precision, label_dtype
from ..knn import INDEXES, ApproximateIndex, approximate_search, exact_search, gpu_backend
from ..metrics import match
from ..paths import cache_dir, checkpoint_seconds
from ..progress import progress_bar
from ..transforms import RandomResizedCropFlip, sample_jitter
from .base import (
    Context,
    MaskSaver,
    Protocol,
    ProtocolError,
    ProtocolResult,
    SharedParams,
    added_param,
    backbone_tokens,
    check_sliding,
    count_confusions,
    eval_predictions,
    matching_axis,
    register_protocol,
    score_seeds,
    sliding_axis,
)
from .training import check_crop_ranges, check_train_split, split_candidates, train_split_info

MEMORY_VERSION = "1"  # bump when the memory bank's contents could change
AUGMENT_VERSION = "2"  # bump when the augmented crops could change; 2: backbone fields of features.backbone_key
MEMORY_MULTIPLES = (100, 1000, 10000)  # the reference's memory sizes, in units of 1024 patches


def memory_axis(params: dict) -> str:
    """The memory bank's size ('all': unbounded) and the augmentation epochs that filled it."""
    return f"memory {params['memory_size'] or 'all'}" + (f" ({params['augment']} aug)" if params.get("augment") else "")


@dataclass(frozen=True)
class RetrievalParams(SharedParams):
    """Parameters of dense retrieval (module docstring): neighbours and softmax temperature, the memory bank (size,
    ignore handling, augmentation epochs and their crops and colour jitter), the search index, the train split, the
    upsampling, how the input size fits the patch size, and sliding-window evaluation (added after records existed:
    unset, they leave the record key as it was)."""

    k: int = 30
    temperature: float = 0.02
    memory_size: int | None = None
    ignore: Literal["drop", "background"] = "drop"
    matching: Literal["none", "hungarian-iou"] = "none"
    augment: int = 0
    aug_seed: int = 0
    aug_scale: list = field(default_factory=lambda: [0.5, 2.0])
    aug_ratio: list = field(default_factory=lambda: [0.75, 4 / 3])
    aug_jitter: float = 0.1
    aug_jitter_p: float = 0.5
    index: Literal[INDEXES] = "exact"
    ivf_lists: int = 1024
    ivf_probe: int = 32
    hnsw_m: int = 32
    hnsw_ef: int = 128
    train_split: str | list = "default"
    upsample: Literal["bilinear", "nearest"] = "bilinear"
    size_fit: Literal["exact", "floor"] = "exact"
    crf_temperature: float = 0.1
    slide_crop: int | None = added_param(None)
    slide_stride: int | None = added_param(None)


@register_protocol
class RetrievalProtocol(Protocol):
    name = "retrieval"
    axes = {"matching": matching_axis, "memory": memory_axis, "sliding": sliding_axis}
    version = "1"
    description = "dense k-NN retrieval of train patch labels (Hummingbird), scored directly (no matching)"
    default_seeds = 1
    Params = RetrievalParams
    presets = {f"hummingbird-{m}": {"resize": "square", "size": 512, "size_fit": "floor", "augment": 2,
                                    "memory_size": m * 1024, "ignore": "background", "matching": "hungarian-iou",
                                    "train_split": ["trainaug", "default"]}
               for m in MEMORY_MULTIPLES}
    preset_groups = {"hummingbird": tuple(f"hummingbird-{m}" for m in MEMORY_MULTIPLES)}

    def check(self) -> None:
        p = self.p
        self.positive("k", "temperature", "ivf_lists", "ivf_probe", "hnsw_m", "hnsw_ef")
        self.positive("memory_size", allow_none=True)
        if not p.augment >= 0:
            raise ProtocolError(f"retrieval: augment is a number of epochs (>= 0), got {p.augment!r}")
        check_train_split(self.name, p.train_split)
        check_crop_ranges(self.name, aug_scale=p.aug_scale, aug_ratio=p.aug_ratio)
        if not (0 <= p.aug_jitter < 1 and 0 <= p.aug_jitter_p <= 1):
            raise ProtocolError("retrieval: aug_jitter must be in [0, 1) and aug_jitter_p a probability")
        # faiss probes at most every list, and an HNSW search of breadth ef finds at most ef neighbours: beyond those
        # bounds two values would give one result under two columns
        if p.index == "ivf" and p.ivf_probe > p.ivf_lists:
            raise ProtocolError(f"retrieval: ivf_probe={p.ivf_probe} exceeds ivf_lists={p.ivf_lists} (faiss "
                                "would probe every list, an exact search); set ivf_probe <= ivf_lists")
        if p.index == "hnsw" and p.k > p.hnsw_ef:
            raise ProtocolError(f"retrieval: k={p.k} exceeds hnsw_ef={p.hnsw_ef} (an HNSW search of breadth "
                                "ef finds at most ef neighbours); set hnsw_ef >= k")
        check_sliding(self.name, p.slide_crop, p.slide_stride)

    def check_data(self, eval_set, train_set, transform) -> None:
        """Before any extraction: a train split other than the evaluation images must exist, a bounded memory must
        give every train view at least one patch, and `k` must not exceed the most rows the bank can hold
        (`bank_bound`); `run` checks k against the bank's actual rows (which drop the patches without a labelled
        pixel) once it is built."""
        p = self.p
        if train_set is None:
            wanted = ", ".join(self.train_split_wanted())
            raise ProtocolError(f"retrieval: the memory bank needs labelled train images other than the evaluation "
                                f"images, and {eval_set.id} has no train split here (looked for: {wanted}); point "
                                "--data-root at a root with one, or set --param retrieval.train_split=NAME")
        if train_set.content_sha256() == eval_set.content_sha256():
            raise ProtocolError(f"retrieval: train split '{train_set.split}' has the same content as the evaluation "
                                f"split '{eval_set.split}': every query would find itself; point train_split at "
                                "other images")
        n_views = len(train_set) * max(p.augment, 1)
        if p.memory_size is not None and p.memory_size < n_views:
            raise ProtocolError(f"retrieval: memory_size={p.memory_size} gives each of the {n_views} train views "
                                f"no patch; set memory_size >= {n_views} or leave it unbounded (null)")
        if transform is None:  # a context without one (a direct `run`): only the built bank is checked
            return
        check_sliding(self.name, p.slide_crop, p.slide_stride, transform.patch_size)
        least = (transform.size // transform.patch_size) ** 2  # patches of the smallest view
        quota = least if p.memory_size is None else min(least, p.memory_size // n_views)
        if p.k > n_views * quota:  # else k fits whatever the grids, and no image header is read
            bound, how = bank_bound(train_set, transform, p)
            if p.k > bound:
                raise ProtocolError(f"retrieval: k={p.k} neighbours, but the memory bank of {train_set.id}/"
                                    f"{train_set.split} can hold at most {bound} rows ({how}); set --param "
                                    f"retrieval.k=N with N <= {bound}")

    def input_size(self, patch_size: int) -> int | None:
        """`size_fit: floor` rounds the size down to a multiple of the patch size (the reference's 512 for /16, 504
        for /14); the resolved size is the recorded one."""
        size = self.p.size
        if size and self.p.size_fit == "floor":
            return size // patch_size * patch_size
        return size

    def facets_needed(self) -> dict[str, tuple[str, ...]]:
        evaluation = () if self.p.slide_crop else ("tokens",)  # sliding windows embed the images themselves
        if self.p.augment:  # the memory comes from augmented crops (a pass of its own, cached)
            return {"eval": evaluation}
        return {"eval": evaluation, "train": ("tokens",)}

    def backbone_facets(self) -> set[str]:
        return {"tokens"}

    def train_split_wanted(self) -> list[str]:
        return split_candidates(self.p.train_split)

    def evaluate(self, ctx: Context) -> ProtocolResult:
        p = self.p
        ds = ctx.eval_set  # a train split exists and differs from it (`check_data`, run first)
        train, info = train_split_info(ctx)
        views = augmented_views(ctx, train, p) if p.augment else [cached_view(ctx.get(train, ("tokens",)))]
        banks = {}
        for seed in ctx.seeds:
            bank_seed = seed if p.memory_size is not None else None  # an unbounded memory has nothing to draw
            if bank_seed not in banks:
                banks[bank_seed] = memory_bank(ctx, views, ds.num_classes, ds.ignore_index, p, bank_seed)
        check_bank(min(b.rows for b in banks.values()), train, p)
        scorers = [Scorer(banks[seed if p.memory_size is not None else None], p, ctx.device)
                   for seed in ctx.seeds]
        matching = "identity" if p.matching == "none" else p.matching
        saver = MaskSaver(ctx)
        with progress_bar(len(ds), f"retrieving labels for {ds.id}/{ds.split}") as advance:
            stream = eval_predictions(ctx, scorers, ds.num_classes, p.upsample, p.eval_size,
                                      "retrieved label distributions",
                                      (p.slide_crop, p.slide_stride) if p.slide_crop else None)
            confs, per_image = count_confusions(stream, ds.num_classes, ds.ignore_index, saver, advance)
        per_seed, stats = score_seeds(confs, per_image, lambda j, conf: match(conf, matching), saver,
                                      record_mapping=matching != "identity")
        for s, sc in zip(per_seed, scorers):
            s["memory_rows"] = sc.bank.rows
        info.update({"matching": matching, "memory": [b.describe() for b in banks.values()],
                     "views": [v.describe() for v in views], "search": scorers[0].search})
        return ProtocolResult(per_seed, info, confs, stats)


@dataclass
class View:
    """One pass over the train images the memory draws from: (h, w, D) tokens and (H, W) labels per image."""

    tokens: ArrayStore
    labels: ArrayStore
    name: str
    computed: bool = False

    def identity(self) -> dict:
        """What determines this view's content: its cache entries (their paths carry their key digests)."""
        return {"tokens": str(self.tokens.path), "labels": str(self.labels.path)}

    def describe(self) -> dict:
        return {"view": self.name, "images": len(self.tokens), "cache": "computed" if self.computed else "hit"}


def cached_view(fs) -> View:
    return View(fs["tokens"], fs.labels, "cached train features")


def augmented_views(ctx: Context, ds, p: RetrievalParams) -> list[View]:
    """`augment` epochs of augmented crops of the train split through the backbone, each a cache entry pair (tokens,
    labels) keyed by everything that determines it (backbone, layer, data content, size, augmentation, aug_seed,
    epoch, precision); computed once, in batches of `ctx.batch_size`, checkpointed and resumable."""
    if ctx.transform is None or ctx.backbone_ref is None:
        raise ProtocolError("retrieval: augment > 0 computes crops through the backbone, but the run gave no "
                            "backbone or transform")
    ref = ctx.backbone_ref
    size, patch = ctx.transform.size, ref.spec.patch_size
    aug = RandomResizedCropFlip(size, tuple(p.aug_scale), tuple(p.aug_ratio), flip=0.0)
    views = []
    for epoch in range(p.augment):
        key = {"kind": "retrieval-augmented", "version": AUGMENT_VERSION,
               **backbone_key(ref, compute_precision(str(ctx.device))), "layer": ctx.layer, "dataset": ds.id,
               "split": ds.split, "content_sha256": ds.content_sha256(), "size": size,
               "aug_scale": p.aug_scale, "aug_ratio": p.aug_ratio, "aug_jitter": p.aug_jitter,
               "aug_jitter_p": p.aug_jitter_p, "aug_seed": p.aug_seed, "epoch": epoch}
        tok = Entry.at(cache_dir(), "retrieval", ref.spec.id, ds.id, ds.split, {**key, "facet": "tokens"})
        lab = Entry.at(cache_dir(), "retrieval", ref.spec.id, ds.id, ds.split, {**key, "facet": "labels"})

        def compute(_todo, tok=tok, lab=lab, epoch=epoch):
            g = size // patch
            tw = tok.writer([(g, g)] * len(ds), ref.spec.embed_dim, np.float16)
            dtype = label_dtype(ds)  # uint8 unless class ids or the ignore index exceed 255
            lw = lab.writer([(size, size)] * len(ds), 1, dtype)
            with filling([tw, lw]), progress_bar(len(ds), f"augmented memory crops, epoch {epoch + 1}") as adv:
                start = min(tw.done, lw.done)
                adv(start)
                last = time.monotonic()
                for b in range(start, len(ds), ctx.batch_size):
                    idx = range(b, min(b + ctx.batch_size, len(ds)))
                    xs, ys = [], []
                    for i in idx:
                        img, mask = ds.load_image(i), ds.load_mask(i)
                        rng = np.random.default_rng([p.aug_seed, epoch, i])
                        box, flipped = aug.sample(rng, *img.size)
                        jitter = sample_jitter(rng, p.aug_jitter, p.aug_jitter_p)
                        x, y = aug.apply(img, mask, box, flipped, ref.spec.mean, ref.spec.std, jitter)
                        xs.append(x)
                        ys.append(y)
                    t = backbone_tokens(ctx, xs, lambda j, idx=idx, epoch=epoch: (
                        f"the augmented crop of image '{ds.samples[idx[j]].name}' of {ds.id}/{ds.split} (retrieval, "
                        f"epoch {epoch})"))
                    for j, i in enumerate(idx):
                        tw.write(i, t[j].reshape(g * g, -1).numpy().astype(np.float16))
                        lw.write(i, ys[j].reshape(-1, 1).astype(dtype))
                    adv(len(idx))
                    if time.monotonic() - last > checkpoint_seconds():  # both entries: a resume starts from both
                        tw.checkpoint(idx[-1] + 1)
                        lw.checkpoint(idx[-1] + 1)
                        last = time.monotonic()
                tw.commit({"device": str(ctx.device)})
                lw.commit({})

        computed = bool(ensure([tok, lab], compute))
        ctx.record_pass("retrieval augmented memory crops", computed, split=ds.split, epoch=epoch, images=len(ds))
        views.append(View(tok.open(), lab.open(), f"augmented epoch {epoch}", computed))
    return views


def check_bank(rows: int, train, p: RetrievalParams) -> None:
    """Refuse a `k` (or IVF list count) beyond the built bank's rows: search would silently use fewer neighbours
    (lists) than the record states."""
    for key, value, what in (("k", p.k, "neighbours"), ("ivf_lists", p.ivf_lists, "IVF lists")):
        if value > rows and (key == "k" or p.index == "ivf"):
            kept = "" if p.memory_size is None else f" chosen by memory_size={p.memory_size}"
            raise ProtocolError(f"retrieval: {key}={value} {what}, but the memory bank of {train.id}/{train.split} "
                                f"holds {rows} rows (its train patches with a labelled pixel{kept}); set --param "
                                f"retrieval.{key}=N with N <= {rows}")


def bank_bound(train, transform, p: RetrievalParams) -> tuple[int, str]:
    """The most rows a memory bank of `train` can hold, known before extraction, and how it arises: every patch of
    every view (augmented crops are size × size; cached features have the transform's grid, under `pad` each image's
    own, read from its header), at most the per-view quota of a bounded memory. Patches without a labelled pixel are
    dropped as well, but their number is known only after extraction."""
    n, epochs, ps = len(train), max(p.augment, 1), transform.patch_size
    if p.augment or transform.policy != "pad":
        grids = [(transform.size // ps) ** 2] * n
    else:
        grids = [(h // ps) * (w // ps) for h, w in (transform.output_size(*train.image_size(i)) for i in range(n))]
    quota = None if p.memory_size is None else p.memory_size // (n * epochs)
    bound = epochs * sum(x if quota is None else min(quota, x) for x in grids)
    how = f"{n} train images" + (f" × {epochs} augmented epochs" if p.augment else "")
    how += f": {epochs * sum(grids)} patches" + ("" if quota is None else f", at most {quota} per view by memory_size")
    return bound, how


def patch_distributions(labels: np.ndarray, grid: tuple[int, int], num_classes: int, ignore_index: int,
                        ignore: str = "drop") -> tuple[np.ndarray, np.ndarray]:
    """(H, W) labels of an h × w patch grid → ((h·w, C) float32 fraction of each patch's labelled pixels in each
    class, (h·w,) whether the patch has any labelled pixel). `ignore: background` counts ignore pixels as class 0
    (the reference's quirk) instead of dropping them."""
    (hh, ww), (h, w) = labels.shape, grid
    if hh % h or ww % w or hh // h != ww // w:
        raise ProtocolError(f"retrieval: labels of {hh}×{ww} pixels are not whole square patches of the {h}×{w} "
                            "token grid")
    ps = hh // h
    lab = np.asarray(labels, dtype=np.int64)
    if ignore == "background":
        lab = np.where(lab == ignore_index, 0, lab)
    valid = lab != ignore_index
    if bool((valid & ((lab < 0) | (lab >= num_classes))).any()):
        raise ProtocolError(f"retrieval: labels outside 0..{num_classes - 1} (ignore {ignore_index})")
    patch = (np.arange(hh)[:, None] // ps) * w + np.arange(ww)[None, :] // ps
    counts = np.bincount((patch * num_classes + lab)[valid], minlength=h * w * num_classes).reshape(h * w,
                                                                                                     num_classes)
    n = counts.sum(1)
    return (counts / np.maximum(n, 1)[:, None]).astype(np.float32), n > 0


def select_patches(presence: np.ndarray, labelled: np.ndarray, quota: int, noise: np.ndarray) -> np.ndarray:
    """The reference's rare-class-favouring choice of `quota` patches of one image: score = Σ over the classes
    present in a patch of the number of the image's patches containing that class, times `noise` (U(0, 1) per
    patch); the lowest scores win (ties by patch order); patches without labelled pixels never. Sorted rows."""
    freq = presence[labelled].sum(0)
    score = np.where(labelled, (presence * freq).sum(1) * noise, np.inf)
    take = min(quota, int(labelled.sum()))
    return np.sort(np.argsort(score, kind="stable")[:take])


@dataclass
class Bank:
    """A memory bank: (M, D) float16 unit-norm tokens and (M, C) float32 class distributions, memory-mapped."""

    tokens: ArrayStore
    labels: ArrayStore
    quota: int | None
    computed: bool

    @property
    def rows(self) -> int:
        return int(self.tokens.data.shape[0])

    def describe(self) -> dict:
        return {"rows": self.rows, "per_image_quota": self.quota, "seed": self.tokens.meta["key"]["seed"],
                "cache": "computed" if self.computed else "hit"}


def memory_bank(ctx: Context, views: list[View], num_classes: int, ignore_index: int, p: RetrievalParams,
                seed: int | None) -> Bank:
    """The bank of steps 1-2 of the module docstring, a cache entry pair keyed by its views, class count, ignore
    handling, memory size and seed."""
    n_items = sum(len(v.tokens) for v in views)
    quota = None if p.memory_size is None else p.memory_size // n_items  # >= 1: RetrievalProtocol.check_data
    key = {"kind": "retrieval-memory", "version": MEMORY_VERSION, "views": [v.identity() for v in views],
           "num_classes": num_classes, "ignore_index": ignore_index, "ignore": p.ignore,
           "memory_size": p.memory_size, "seed": seed}
    group = ctx.backbone_ref.spec.id if ctx.backbone_ref is not None else "local"
    ds = ctx.train_set
    tok = Entry.at(cache_dir(), "retrieval", group, ds.id, ds.split, {**key, "facet": "memory-tokens"})
    lab = Entry.at(cache_dir(), "retrieval", group, ds.id, ds.split, {**key, "facet": "memory-labels"})

    def distributions(view: View, i: int):
        return patch_distributions(view.labels.labels(i), view.tokens.grid(i), num_classes, ignore_index,
                                   p.ignore)

    def compute(_todo):
        chosen = []
        for e, view in enumerate(views):
            for i in range(len(view.tokens)):
                dist, labelled = distributions(view, i)
                if quota is None:
                    chosen.append(np.flatnonzero(labelled))
                else:
                    noise = np.random.default_rng([seed, e, i]).random(len(labelled))
                    chosen.append(select_patches(dist > 0, labelled, quota, noise))
        if not sum(len(c) for c in chosen):
            raise ProtocolError(f"retrieval: no train patch of {ds.id}/{ds.split} has a labelled pixel")
        dim = views[0].tokens.data.shape[1]
        tw = tok.writer([(len(c), 1) for c in chosen], dim, np.float16)
        lw = lab.writer([(len(c), 1) for c in chosen], num_classes, np.float32)
        with filling([tw, lw]), progress_bar(n_items, f"memory bank of {ds.id}/{ds.split}") as adv:
            item = 0
            for view in views:
                for i in range(len(view.tokens)):
                    rows = chosen[item]
                    x = np.asarray(view.tokens.image(i), dtype=np.float32).reshape(-1, dim)[rows]
                    tw.write(item, (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
                             .astype(np.float16))
                    lw.write(item, distributions(view, i)[0][rows])
                    item += 1
                    adv()
            tw.commit({})
            lw.commit({})

    computed = bool(ensure([tok, lab], compute))
    return Bank(tok.open(), lab.open(), quota, computed)


class Scorer:
    """Scoring function for Predictions: (B, h, w, D) query tokens → (B, C, h, w) retrieved label
    distributions (step 3 of the module docstring). On a GPU the bank is searched there: with faiss-gpu when it is
    installed, else by torch (the bank held in GPU memory as float16 when it fits in half of what is free, else
    streamed in chunks); on the CPU with faiss."""

    def __init__(self, bank: Bank, p: RetrievalParams, device: str):
        self.bank, self.k, self.temperature = bank, p.k, p.temperature
        self.device = str(device)
        self.index = None
        if p.index != "exact":
            self.index = ApproximateIndex(p.index, p.ivf_lists, p.ivf_probe, p.hnsw_m,
                                          p.hnsw_ef).build(bank.tokens.data)
            self.search = f"faiss {p.index} (approximate)"
            self.rows = bank.tokens.data
        elif gpu_backend(self.device) == "faiss-gpu":
            self.rows = bank.tokens.data
            self.search = "faiss-gpu exact (bank streamed from the memory map)"
        elif self.device.startswith("cuda"):
            size = bank.tokens.data.nbytes
            fits = size < torch.cuda.mem_get_info(torch.device(self.device))[0] // 2
            self.rows = torch.from_numpy(np.asarray(bank.tokens.data)).to(self.device) if fits else \
                bank.tokens.data
            self.search = "torch exact (GPU" + (", bank in GPU memory)" if fits else ", bank streamed)")
        else:
            self.rows = bank.tokens.data
            self.search = "faiss exact (CPU, bank streamed from the memory map)"

    def neighbours(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.index is not None:
            return approximate_search(self.index, q, self.k)
        return exact_search(q, self.rows, self.k, self.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, d = x.shape
        q = F.normalize(x.float(), dim=-1).reshape(-1, d).cpu().numpy()
        sims, idx = self.neighbours(q)
        found = idx >= 0
        logits = torch.from_numpy(np.where(found, sims / self.temperature, -np.inf)).double()
        weights = torch.softmax(logits, dim=1).float()
        labels = torch.from_numpy(np.asarray(self.bank.labels.data[np.where(found, idx, 0).ravel()],
                                             dtype=np.float32)).reshape(*idx.shape, -1)
        release_pages(self.bank.labels.data)
        out = (weights[..., None] * labels).sum(1)
        return out.reshape(b, h, w, -1).permute(0, 3, 1, 2).to(x.device)
