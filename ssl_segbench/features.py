"""Dense features, computed once and reused by every protocol.

Each facet (tokens, cls, attn, keys, queries) of a (backbone + resolved revision, dataset + split + file-list hash,
transform, layer) is one cache entry: a directory holding `data.npy` (rows × width, fp16, memory-mapped), `index.npy`
((N, 3) int64: row offset, h, w per image, so images of different sizes coexist) and `meta.json` (the full key).
Labels at the transformed geometry are an entry of their own, keyed without the backbone. Entries are filled in
`<entry>.partial/` and renamed into place when complete, so a crash never leaves a half-written entry that looks valid;
periodic checkpoints let a killed run resume where it stopped, and a lock per entry keeps concurrent runs from writing
the same entry twice. Extraction streams batches straight into the memory map, so RAM does not grow with the number of
images.

Refusals, each before anything looks complete: a batch with a NaN or infinite value (or one beyond float16's range)
stops extraction with an error naming the backbone, layer, facet and first bad image, and the partial entry is
removed; the disk space an entry needs is checked and reserved (fallocate) before it is filled, so a full disk is an
error naming the size and the cache directory instead of a SIGBUS from the memory map, and a write error removes the
partial entry. Keys hold the dataset's content digest (not its file names) and the compute precision (bf16 autocast on
CUDA, fp32 otherwise).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backbones import BackboneError, BackboneRef
from .data import SegmentationDataset
from .errors import SegbenchError
from .paths import cache_dir, inside, safe_component
from .progress import progress_bar
from .transforms import Transform

CACHE_VERSION = 2  # 2: keys hold the dataset's content digest and the compute precision
CHECKPOINT_SECONDS = float(os.environ.get("SSL_SEGBENCH_CHECKPOINT_SECONDS", "20"))
SPACE_MARGIN = 64 << 20  # bytes left free beyond an entry's size
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


class CacheError(SegbenchError):
    """The cache cannot hold an entry (disk full, write error); nothing half-written is left behind."""


def _space_error(path: Path, needed: int | None, e: OSError | None = None) -> CacheError:
    """The error for an entry the disk cannot hold: what was needed (when known), what is free, where, and the fix."""
    free = shutil.disk_usage(path.parent).free
    spare = "" if e is not None else f" (plus {SPACE_MARGIN >> 20} MiB kept free)"
    need = f"needs {needed / 2**20:,.1f} MiB{spare} for" if needed else "could not write"
    cause = f" ({e.strerror or e})" if e is not None else ""
    return CacheError(f"the feature cache {need} {path.name}{cause}; {free / 2**20:,.1f} MiB are free under "
                      f"{path.parent}. Free space there, or point SSL_SEGBENCH_CACHE at a larger disk. The partial "
                      "entry was removed.")


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


class ArrayStore:
    """One complete cache entry, opened read-only: rows of all images plus a per-image index."""

    def __init__(self, path: Path):
        self.path = path
        self.meta = json.loads((path / "meta.json").read_text())
        self.data = np.load(path / "data.npy", mmap_mode="r")
        self.index = np.load(path / "index.npy")

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int) -> np.ndarray:
        """Image i's rows reshaped to (h, w, width) (or (width,) for per-image facets such as cls)."""
        off, h, w = (int(v) for v in self.index[i])
        rows = self.data[off: off + h * w]
        return rows[0] if self.meta["per_image"] else rows.reshape(h, w, -1)

    def labels(self, i: int) -> np.ndarray:
        """For a label entry: image i's (H, W) int64 labels."""
        return self.image(i)[..., 0].astype(np.int64)


class _Writer:
    """Fills one entry in `<entry>.partial/`. Checkpoints record how many images (in order) are safely on disk, so a
    killed run resumes from there; `commit` renames the directory into place atomically. The caller holds the entry's
    lock, so no two processes fill the same partial entry."""

    def __init__(self, final: Path, key: dict, shapes: list[tuple[int, int]], width: int, dtype, per_image: bool):
        final.parent.mkdir(parents=True, exist_ok=True)
        self.final, self.key, self.per_image = final, key, per_image
        self.partial = final.parent / (final.name + ".partial")
        counts = np.array([1 if per_image else h * w for h, w in shapes], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.index = np.column_stack([offsets, [s[0] for s in shapes], [s[1] for s in shapes]]).astype(np.int64)
        shape = (int(counts.sum()), width)
        self.done = self._resumable(shape, np.dtype(dtype))
        if self.done:
            self.data = np.load(self.partial / "data.npy", mmap_mode="r+")
        else:
            shutil.rmtree(self.partial, ignore_errors=True)
            needed = shape[0] * shape[1] * np.dtype(dtype).itemsize + (1 << 16)
            if shutil.disk_usage(final.parent).free < needed + SPACE_MARGIN:
                raise _space_error(self.final, needed)
            self.partial.mkdir()
            try:
                self.data = np.lib.format.open_memmap(self.partial / "data.npy", mode="w+", dtype=dtype, shape=shape)
                _reserve(self.partial / "data.npy")
            except OSError as e:
                self.discard()
                raise _space_error(self.final, needed, e) from None
        self.resumed_from = self.done

    def _resumable(self, shape, dtype) -> int:
        """Images already checkpointed by an earlier, interrupted run of the same key (0 when none)."""
        try:
            progress = json.loads((self.partial / "progress.json").read_text())
            data = np.load(self.partial / "data.npy", mmap_mode="r")
        except (OSError, ValueError):
            return 0
        if progress.get("key") != self.key or data.shape != shape or data.dtype != dtype:
            return 0
        return int(progress["done"])

    def write(self, i: int, rows: np.ndarray) -> None:
        off = self.index[i, 0]
        self.data[off: off + len(rows)] = rows

    def discard(self) -> None:
        """Remove the partial entry (after an error that a resume would only repeat)."""
        self.__dict__.pop("data", None)
        shutil.rmtree(self.partial, ignore_errors=True)

    def checkpoint(self, done: int) -> None:
        """Flush, then record that images [0, done) are on disk."""
        self.data.flush()
        tmp = self.partial / "progress.json.tmp"
        tmp.write_text(json.dumps({"key": self.key, "done": done}))
        os.replace(tmp, self.partial / "progress.json")
        self.done = done

    def commit(self, extra: dict) -> ArrayStore:
        self.data.flush()
        del self.data
        np.save(self.partial / "index.npy", self.index)
        meta = {"key": self.key, "per_image": self.per_image, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "resumed_from": self.resumed_from, **extra}
        (self.partial / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        (self.partial / "progress.json").unlink(missing_ok=True)
        os.rename(self.partial, self.final)
        return ArrayStore(self.final)


def _reserve(path: Path) -> None:
    """Allocate the file's blocks now (posix_fallocate), so writes through the memory map cannot fail later with a
    SIGBUS on a full disk; file systems without fallocate keep the free-space check alone."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(paths: list[Path]):
    """Exclusive locks on entries (`<entry>.lock`, taken in sorted order): concurrent runs wait, then find the entry
    complete instead of writing it twice."""
    handles = []
    try:
        for p in sorted(set(paths)):
            p.parent.mkdir(parents=True, exist_ok=True)
            fh = open(p.parent / (p.name + ".lock"), "w")
            handles.append(fh)
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        for fh in handles:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()


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


def feature_key(ref: BackboneRef, dataset: SegmentationDataset, transform: Transform, layer: int, facet: str,
                precision: str = "fp32") -> dict:
    return {"kind": "features", "version": CACHE_VERSION, "backbone": ref.spec.id, "source": ref.source,
            "revision": ref.revision, "mean": list(ref.spec.mean), "std": list(ref.spec.std),
            **_dataset_key(dataset), "transform": transform.to_dict(), "layer": layer, "facet": facet,
            "dtype": "float16", "precision": precision}


def _entry_path(root: Path, key: dict) -> Path:
    group = key.get("backbone", "labels")
    rel = Path(key["kind"], safe_component(group), safe_component(key["dataset"]),
               f"{safe_component(key['split'])}-{_digest(key)}")
    return inside(root, rel)


def _is_complete(path: Path) -> bool:
    return (path / "meta.json").is_file()


class _TorchView(torch.utils.data.Dataset):
    """Transformed (image, labels) pairs for a DataLoader; labels are decoded only when the label entry is missing."""

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
        return x, torch.from_numpy(y), i, resized


def _prefetched(iterable):
    """Yield from `iterable` while a background thread already fetches the next item: with in-process loading
    (num_workers=0, the CPU default) image decoding overlaps the forward pass instead of alternating with it (PIL and
    numpy release the GIL)."""
    it = iter(iterable)
    with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssl-segbench-prefetch") as pool:
        pending = pool.submit(next, it, None)
        while (item := pending.result()) is not None:
            pending = pool.submit(next, it, None)
            yield item


def _label_dtype(dataset) -> np.dtype:
    return np.dtype(np.uint8) if max(dataset.num_classes - 1, dataset.ignore_index) <= 255 else np.dtype(np.int16)


def extract(ref: BackboneRef, dataset: SegmentationDataset, transform: Transform, layer: int = -1,
            facets=("tokens",), device: str = "cpu", batch_size: int = 16, num_workers: int = 0,
            amp: bool = True, root: Path | None = None) -> FeatureSet:
    """The features of `dataset` for each facet, from cache when present, else computed in one backbone pass."""
    if transform.patch_size != ref.spec.patch_size:
        raise ValueError(f"transform patch size {transform.patch_size} != backbone patch size {ref.spec.patch_size}")
    root = root or cache_dir()
    precision = compute_precision(device, amp)
    keys = {f: feature_key(ref, dataset, transform, layer, f, precision) for f in facets}
    paths = {f: _entry_path(root, k) for f, k in keys.items()}
    lkey = label_key(dataset, transform)
    lpath = _entry_path(root, lkey)
    missing = [f for f in facets if not _is_complete(paths[f])]
    need_labels = not _is_complete(lpath)
    computed: list[str] = []
    if missing or need_labels:
        with _locked([paths[f] for f in missing] + ([lpath] if need_labels else [])):
            todo = [f for f in missing if not _is_complete(paths[f])]  # another process may have finished them
            labels_todo = not _is_complete(lpath)
            if todo or labels_todo:
                _compute(ref, dataset, transform, layer, todo, {f: (paths[f], keys[f]) for f in todo},
                         (lpath, lkey) if labels_todo else None, device, batch_size, num_workers, amp)
                computed = todo + (["labels"] if labels_todo else [])
    return FeatureSet({f: ArrayStore(paths[f]) for f in facets}, ArrayStore(lpath),
                      keys={f: paths[f].name for f in facets}, computed=tuple(computed))


def _first_bad(v: torch.Tensor | np.ndarray) -> int | None:
    """Index (along the batch axis) of the first sample holding a NaN or infinite value, or None."""
    finite = torch.isfinite(v) if isinstance(v, torch.Tensor) else torch.from_numpy(np.isfinite(v))
    bad = (~finite).reshape(finite.shape[0], -1).any(1)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def _compute(ref, dataset, transform, layer, facets, targets, label_target, device, batch_size, num_workers, amp):
    sizes = [dataset.image_size(i) for i in range(len(dataset))]
    shapes = [transform.output_size(w, h) for w, h in sizes]
    p = transform.patch_size
    grids = [(h // p, w // p) for h, w in shapes]
    writers: dict[str, _Writer] = {}
    t0 = time.perf_counter()
    backbone = None
    widths = dict.fromkeys(("tokens", "cls", "keys", "queries"), ref.spec.embed_dim)
    if facets:  # before any entry exists: a checkpoint that cannot be loaded leaves nothing behind
        backbone = ref.load(device)
        for f in {"attn", "attn_logits"} & set(facets):  # heads are read from a forward pass, not the registry
            with torch.inference_mode():
                widths[f] = backbone(torch.zeros(1, 3, p, p, device=device), layer, (f,))[f].shape[1]
    try:
        if label_target is not None:
            writers["labels"] = _Writer(label_target[0], label_target[1], shapes, 1, _label_dtype(dataset), False)
        for f in facets:
            writers[f] = _Writer(targets[f][0], targets[f][1], grids, widths[f], np.float16, f == "cls")
    except CacheError:
        for w in writers.values():
            w.discard()
        raise
    start = min(w.done for w in writers.values())
    view = _TorchView(dataset, transform, ref.spec.mean, ref.spec.std, "labels" in writers)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(view, range(start, len(dataset))),
        batch_size=batch_size if len(set(shapes)) == 1 else 1, num_workers=num_workers, shuffle=False)
    use_amp = amp and str(device).startswith("cuda")
    what = f"features {ref.spec.id} on {dataset.id}/{dataset.split}" if facets else f"labels {dataset.id}"
    if start:
        what += f" (resuming at image {start})"
    done, last_checkpoint = start, time.monotonic()
    resized: list[str] = []
    try:
        with progress_bar(len(dataset), what) as advance, torch.inference_mode():
            advance(start)
            for x, y, idx, was_resized in (_prefetched(loader) if num_workers == 0 else loader):
                if backbone is not None:
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                        out = backbone(x.to(device, non_blocking=True), layer, tuple(facets))
                    for f, v in out.items():
                        v = v.float()
                        if f in ("attn", "attn_logits"):
                            v = v.permute(0, 2, 3, 1)
                        v16 = v.cpu().numpy().astype(np.float16)
                        bad = _first_bad(v16)
                        if bad is not None:
                            _refuse_non_finite(ref, dataset, layer, f, int(idx[bad]), overflow=_first_bad(v) is None)
                        for j, i in enumerate(idx.tolist()):
                            writers[f].write(i, v16[j].reshape(-1, v16.shape[-1]))
                if "labels" in writers:
                    for j, i in enumerate(idx.tolist()):
                        writers["labels"].write(i, y[j].numpy().reshape(-1, 1))
                    resized += [dataset.samples[i].name for i, r in zip(idx.tolist(), was_resized.tolist()) if r]
                done += len(idx)
                advance(len(idx))
                if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                    for w in writers.values():
                        w.checkpoint(done)
                    last_checkpoint = time.monotonic()
        extra = {"extract_seconds": round(time.perf_counter() - t0, 3), "device": str(device)}
        for name, w in writers.items():
            w.commit({**extra, **({"resized_masks": sorted(resized)} if name == "labels" else {})})
    except SegbenchError:  # non-finite features, a bad file: resuming would only meet them again (and a fixed file
        for w in writers.values():  # changes the content digest, so this partial entry could never be resumed)
            w.discard()
        raise
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        for w in writers.values():
            w.discard()
        raise _space_error(next(iter(writers.values())).final, None, e) from None


def _refuse_non_finite(ref, dataset, layer: int, facet: str, i: int, overflow: bool):
    s = dataset.samples[i]
    why = ("values beyond float16's range (|x| > 65504), which the cache cannot store" if overflow
           else "NaN or infinite values")
    raise BackboneError(f"backbone '{ref.spec.id}' ({ref.source}) gave {why} for facet '{facet}' of layer {layer} "
                        f"on image '{s.name}' ({s.image}) of {dataset.id}/{dataset.split}: nothing was cached. The "
                        "checkpoint's weights may be damaged (re-download it) or the input broken; features like "
                        "these would turn into a meaningless score.")
