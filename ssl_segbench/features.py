"""Dense features, computed once and reused by every protocol.

Each facet (tokens, cls, attn, attn_logits, keys, queries) of a (backbone + resolved revision, dataset + split + content
digest, transform, layer, compute precision) is one cache entry (`cache.py`): rows × width fp16, memory-mapped, with a
per-image index so images of different sizes coexist. Labels at the transformed geometry are an entry of their own,
keyed without the backbone. All missing facets of a split are computed in one backbone pass; entries are checkpointed,
locked and committed atomically by the cache, so a killed run resumes and concurrent runs extract once. Extraction
streams batches straight into the memory map, so RAM does not grow with the number of images.

Refusals, each before anything looks complete: a batch with a NaN or infinite value (or one beyond float16's range)
stops extraction with an error naming the backbone, layer, facet and first bad image, and the partial entries are
removed; so are they after a bad file or a write error (the cache checks and reserves disk space first). Keys hold the
dataset's content digest (not its file names) and the compute precision (bf16 autocast on CUDA, fp32 otherwise).

Every other backbone pass (crop embeddings, augmented views) goes through the same batched pass (`embed`: autocast,
the same refusal naming its first bad item), keys its cache entries with the same backbone fields (`backbone_key`)
and, for one-row-per-crop entries, fills them through `fill_rows` (checkpointed, resumable).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .backbones import BackboneError, BackboneRef
from .cache import ArrayStore, Entry, RowWriter, ensure, filling, locked
from .data import SegmentationDataset
from .distributed import SINGLE, World
from .paths import cache_dir
from .progress import progress_bar
from .transforms import Transform

CACHE_VERSION = 2  # 2: keys hold the dataset's content digest and the compute precision


@dataclass
class FeatureSet:
    """What a protocol reads for one split: feature entries by facet, the labels, and what this call computed itself
    (facets and/or 'labels'; empty when everything came from the cache, including entries another process finished
    while this one waited for the lock)."""

    facets: dict[str, ArrayStore]
    labels: ArrayStore
    keys: dict[str, str]
    computed: tuple[str, ...] = field(default=())

    @property
    def cache_hit(self) -> bool:
        """True when no backbone pass ran for these features (labels alone do not need the backbone)."""
        return not set(self.computed) - {"labels"}

    def __getitem__(self, facet: str) -> ArrayStore:
        return self.facets[facet]


def _dataset_key(dataset: SegmentationDataset) -> dict:
    return {"dataset": dataset.id, "split": dataset.split, "content_sha256": dataset.content_sha256(),
            "n_images": len(dataset)}


def compute_precision(device: str, amp: bool = True) -> str:
    """The arithmetic the backbone runs in: part of every feature key (bf16 and fp32 features differ)."""
    return "bf16-autocast" if amp and str(device).startswith("cuda") else "fp32"


def label_key(dataset: SegmentationDataset, transform: Transform) -> dict:
    return {"kind": "labels", "version": CACHE_VERSION, **_dataset_key(dataset), "transform": transform.to_dict(),
            "ignore_index": dataset.ignore_index}


def backbone_key(ref: BackboneRef, precision: str) -> dict:
    """The backbone's fields of every cache key holding its outputs (features, crop embeddings, augmented views):
    which weights (id, source, resolved revision), the input normalisation and the arithmetic (`compute_precision`)."""
    s = ref.spec
    return {"backbone": s.id, "source": ref.source, "revision": ref.revision, "mean": list(s.mean),
            "std": list(s.std), "precision": precision}


def feature_key(ref: BackboneRef, dataset: SegmentationDataset, transform: Transform, layer: int, facet: str,
                precision: str = "fp32") -> dict:
    return {"kind": "features", "version": CACHE_VERSION, **backbone_key(ref, precision), **_dataset_key(dataset),
            "transform": transform.to_dict(), "layer": layer, "facet": facet, "dtype": "float16"}


def _entry(root: Path, key: dict) -> Entry:
    return Entry.at(root, key["kind"], key.get("backbone", "labels"), key["dataset"], key["split"], key)


class _TorchView(torch.utils.data.Dataset):
    """Transformed (image, index, labels, mask resized?) items for a DataLoader (image and index first, as `embed`
    takes them); labels are decoded only when the label entry is missing."""

    def __init__(self, dataset, transform, mean, std, with_labels):
        self.dataset, self.transform, self.mean, self.std, self.with_labels = dataset, transform, mean, std, with_labels

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x = self.transform.image(self.dataset.load_image(i), self.mean, self.std)
        resized = False
        if self.with_labels:
            mask, resized = self.dataset.load_mask_checked(i)
            y = self.transform.labels(mask, self.dataset.ignore_index)
        else:
            y = np.zeros((0, 0), dtype=np.int64)
        return x, i, torch.from_numpy(y), resized


_PREFETCH = "ssl-segbench-prefetch"


def prefetched(iterable):
    """Yield from `iterable` while a background thread already fetches the next item: with in-process loading
    (num_workers=0, the CPU default) image decoding overlaps the forward pass instead of alternating with it (PIL and
    numpy release the GIL)."""
    it = iter(iterable)
    pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=_PREFETCH)
    try:
        pending = pool.submit(next, it, None)
        while (item := pending.result()) is not None:
            pending = pool.submit(next, it, None)
            yield item
    finally:
        # an abandoned generator (a refusal mid-pass) may be closed by the garbage collector on the prefetch thread
        # itself, which cannot wait for itself to end
        pool.shutdown(wait=not threading.current_thread().name.startswith(_PREFETCH), cancel_futures=True)


def loader_workers(device: str) -> int:
    """Default DataLoader workers: on a GPU the forward is far faster than one core decodes images, so decode on
    every usable core but the one feeding the GPU (at most 16); on the CPU 0, the forward already uses every core and a
    prefetch thread decodes the next batch meanwhile."""
    if not str(device).startswith("cuda"):
        return 0
    return max(1, min(16, len(os.sched_getaffinity(0)) - 1))


def label_dtype(dataset) -> np.dtype:
    """The smallest integer type that holds every class id and the ignore index of `dataset`."""
    return np.dtype(np.uint8) if max(dataset.num_classes - 1, dataset.ignore_index) <= 255 else np.dtype(np.int16)


def extract(ref: BackboneRef, dataset: SegmentationDataset, transform: Transform, layer: int = -1,
            facets=("tokens",), device: str = "cpu", batch_size: int = 16, num_workers: int = 0,
            amp: bool = True, root: Path | None = None, world: World = SINGLE) -> FeatureSet:
    """The features of `dataset` for each facet, from cache when present, else computed in one backbone pass; with
    a `world` of several ranks (torchrun), every rank computes its shard of the images into the same entries (rank 0
    holds the entries' locks and commits), and every rank returns the committed entries."""
    if transform.patch_size != ref.spec.patch_size:
        raise ValueError(f"transform patch size {transform.patch_size} != backbone patch size {ref.spec.patch_size}")
    root = root or cache_dir()
    precision = compute_precision(device, amp)
    entries = {f: _entry(root, feature_key(ref, dataset, transform, layer, f, precision)) for f in facets}
    entries["labels"] = _entry(root, label_key(dataset, transform))

    def compute(todo: list[Entry]) -> None:
        names = [name for name, e in entries.items() if e in todo]
        _compute(ref, dataset, transform, layer, {n: entries[n] for n in names}, device, batch_size, num_workers, amp,
                 world)

    if world.size == 1:
        done = ensure(list(entries.values()), compute)
    else:
        distributed.barrier()  # every rank sees the cache as it is now
        done = []
        with locked([e for e in entries.values() if not e.complete()]) if world.main else contextlib.nullcontext():
            names = distributed.broadcast([n for n, e in entries.items() if not e.complete()] if world.main else None)
            if names:
                done = [entries[n] for n in names]
                compute(done)
    computed = tuple(name for name, e in entries.items() if e in done)
    return FeatureSet({f: entries[f].open() for f in facets}, entries["labels"].open(),
                      keys={f: entries[f].path.name for f in facets}, computed=computed)


def _first_bad(v: torch.Tensor) -> int | None:
    """Index (along the batch axis) of the first sample holding a NaN or infinite value, or None."""
    bad = (~torch.isfinite(v)).reshape(v.shape[0], -1).any(1)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def embed(backbone, batches, layer: int | tuple[int, ...], facets, device: str, amp: bool = True, name_of=str,
          half: bool = False, on_device: bool = False):
    """The one batched backbone pass: for each batch, a tuple (images (B, 3, H, W), B item ids, anything else),
    yield (facet → CPU output, the batch); a tuple of layers gives their tokens concatenated along the channels, from
    one backbone call (`Backbone.forward`). Outputs are float32, or float16 with `half` (what the feature cache
    stores: converted on the device, so half the bytes cross to the host); with `on_device` they stay on `device`
    (a head trained there reads them without a round trip); bf16 autocast on CUDA with `amp`, as
    `compute_precision` says. A NaN or infinite output, or with `half` one beyond float16's range, raises
    BackboneError naming the backbone, layer, facet and first bad item (`name_of(id)`): the caller's partial cache
    entries are then removed (`cache.filling`)."""
    use_amp = amp and str(device).startswith("cuda")
    for batch in batches:
        images, ids = batch[0], batch[1]
        outputs = {}
        with torch.inference_mode():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                out = backbone(images.to(device, non_blocking=True), layer, tuple(facets))
            for f, v in out.items():
                v = v.float()
                kept = v.to(torch.float16) if half else v
                bad = _first_bad(kept)
                if bad is not None:
                    _refuse_non_finite(backbone, layer, f, name_of(int(ids[bad])),
                                       overflow=half and _first_bad(v) is None)
                outputs[f] = kept if on_device else kept.cpu()
        yield outputs, batch


def fill_rows(entry: Entry, n: int, width: int, rows, what: str, extra: dict) -> None:
    """Fill `entry` with one float32 row per item (crop embeddings): `rows(done)` yields (item ids, (B, width)
    array) pairs in a fixed order, from item `done` on (`fill_items`)."""
    fill_items(entry, [(1, 1)] * n, width, np.float32, rows, what, extra, per_item=True)


def fill_items(entry: Entry, shapes: list[tuple[int, int]], width: int, dtype, rows, what: str, extra: dict,
               per_item: bool = False) -> None:
    """Fill `entry` with item i's h·w rows of `width` (`shapes[i]` = (h, w); one row with `per_item`): `rows(done)`
    yields (item ids, (B, ...) array whose item j holds h·w·width values) pairs in a fixed order, from item `done` on
    (the earlier ones were written before an interruption). The entry is checkpointed between batches, so a killed
    run resumes; a refusal removes it (`cache.filling`); it is committed with `extra` and the seconds taken."""
    t0 = time.perf_counter()
    n = len(shapes)
    writer = entry.writer(shapes, width, dtype, per_item=per_item)
    with filling([writer]):
        if writer.done < n:
            done = writer.done
            with progress_bar(n, what + (f" (resuming at item {done})" if done else "")) as advance:
                advance(done)
                for ids, block in rows(done):
                    for j, i in enumerate(ids):
                        writer.write(int(i), np.asarray(block[j], dtype=dtype).reshape(-1, width))
                    done += len(ids)
                    advance(len(ids))
                    writer.maybe_checkpoint(done)
        writer.commit({**extra, "seconds": round(time.perf_counter() - t0, 3)})


def _refuse_non_finite(backbone, layer, facet: str, item: str, overflow: bool):
    why = ("values beyond float16's range (|x| > 65504), which the cache cannot store" if overflow
           else "NaN or infinite values")
    source = getattr(backbone, "source", "source unknown")  # a loaded Backbone always has one; test stand-ins not
    layers = f"layers {list(layer)}" if isinstance(layer, (list, tuple)) else f"layer {layer}"
    raise BackboneError(f"backbone '{backbone.spec.id}' ({source}) gave {why} for facet '{facet}' of {layers} "
                        f"on {item}: nothing was cached. The checkpoint's weights may be damaged (re-download it) or "
                        "the input broken; outputs like these would turn into a meaningless score.")


def _compute(ref, dataset, transform, layer, todo: dict[str, Entry], device, batch_size, num_workers, amp,
             world: World = SINGLE):
    """One pass over the split (this rank's shard of it) filling every entry of `todo` (facet name or 'labels' →
    entry)."""
    facets = [f for f in todo if f != "labels"]
    sizes = [dataset.image_size(i) for i in range(len(dataset))]
    shapes = [transform.output_size(w, h) for w, h in sizes]
    p = transform.patch_size
    grids = [(h // p, w // p) for h, w in shapes]
    writers: dict[str, RowWriter] = {}
    t0 = time.perf_counter()
    backbone = None
    widths = dict.fromkeys(("tokens", "cls", "keys", "queries"), ref.spec.embed_dim)
    if facets:  # before any entry exists: a checkpoint that cannot be loaded leaves nothing behind
        backbone = ref.load(device)
        for f in {"attn", "attn_logits"} & set(facets):  # heads are read from a forward pass, not the registry,
            with torch.inference_mode():  # at the run's input size (some models take no other)
                probe = torch.zeros(1, 3, *shapes[0], device=device) if shapes else torch.zeros(1, 3, p, p)
                widths[f] = backbone(probe, layer, (f,))[f].shape[1]
    made: list[RowWriter] = []  # what `filling` removes on a refusal or a write error
    shard = world.shard(len(dataset))
    with filling(made):
        for turn in ("first", "others") if world.size > 1 else ("first",):
            if (turn == "first") == world.main:  # rank 0 makes the partial entries, then the others open them
                if "labels" in todo:
                    writers["labels"] = todo["labels"].writer(shapes, 1, label_dtype(dataset), rank=world.rank,
                                                              world=world.size)
                    made.append(writers["labels"])
                for f in facets:
                    writers[f] = todo[f].writer(grids, widths[f], np.float16, per_item=f == "cls", rank=world.rank,
                                                world=world.size)
                    made.append(writers[f])
            if world.size > 1:
                distributed.barrier()
        start = min(w.done for w in writers.values())
        view = _TorchView(dataset, transform, ref.spec.mean, ref.spec.std, "labels" in writers)
        on_gpu = str(device).startswith("cuda")
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(view, range(start, shard.stop)),
            batch_size=batch_size if len(set(shapes)) == 1 else 1, num_workers=num_workers, shuffle=False,
            pin_memory=on_gpu, prefetch_factor=4 if num_workers else None)
        what = f"features {ref.spec.id} on {dataset.id}/{dataset.split}" if facets else f"labels {dataset.id}"
        if world.size > 1:
            what += f" (rank {world.rank}/{world.size}: images {shard.start}-{shard.stop - 1})"
        if start > shard.start:
            what += f" (resuming at image {start})"
        done = start
        resized: list[str] = []

        def name_of(i: int) -> str:
            s = dataset.samples[i]
            return f"image '{s.name}' ({s.image}) of {dataset.id}/{dataset.split}"

        with progress_bar(len(shard), what) as advance, torch.inference_mode():
            advance(start - shard.start)
            batches = prefetched(loader) if num_workers == 0 else loader
            if backbone is not None:
                batches = embed(backbone, batches, layer, facets, device, amp, name_of, half=True)
            else:
                batches = (({}, batch) for batch in batches)
            for out, (_x, idx, y, was_resized) in batches:
                for f, v in out.items():
                    if f in ("attn", "attn_logits"):
                        v = v.permute(0, 2, 3, 1)
                    v16 = v.numpy()
                    for j, i in enumerate(idx.tolist()):
                        writers[f].write(i, v16[j].reshape(-1, v16.shape[-1]))
                if "labels" in writers:
                    for j, i in enumerate(idx.tolist()):
                        writers["labels"].write(i, y[j].numpy().reshape(-1, 1))
                    resized += [dataset.samples[i].name for i, r in zip(idx.tolist(), was_resized.tolist()) if r]
                done += len(idx)
                advance(len(idx))
                for w in writers.values():
                    w.maybe_checkpoint(done)
        extra = {"extract_seconds": round(time.perf_counter() - t0, 3), "device": str(device)}
        if world.size > 1:  # every shard on disk before rank 0 commits; every rank reads the committed entries
            for w in writers.values():
                w.data.flush()
            resized = distributed.gather_lists(resized)
            extra["world_size"] = world.size
            distributed.barrier()
        if world.main:
            for name, w in writers.items():
                w.commit({**extra, **({"resized_masks": sorted(resized)} if name == "labels" else {})})
        distributed.barrier()

