"""Dense features, computed once and reused by every protocol.

Each facet (tokens, cls, attn, keys, queries) of a (backbone + resolved revision, dataset + split + file-list hash,
transform, layer) is one cache entry: a directory holding `data.npy` (rows × width, fp16, memory-mapped), `index.npy`
((N, 3) int64: row offset, h, w per image, so images of different sizes coexist) and `meta.json` (the full key).
Labels at the transformed geometry are an entry of their own, keyed without the backbone. Entries are filled in
`<entry>.partial/` and renamed into place when complete, so a crash never leaves a half-written entry that looks valid;
periodic checkpoints let a killed run resume where it stopped, and a lock per entry keeps concurrent runs from writing
the same entry twice. Extraction streams batches straight into the memory map, so RAM does not grow with the number of
images.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backbones import BackboneRef
from .data import SegmentationDataset
from .paths import cache_dir
from .progress import progress_bar
from .transforms import Transform

CACHE_VERSION = 1
CHECKPOINT_SECONDS = float(os.environ.get("SSL_SEGBENCH_CHECKPOINT_SECONDS", "20"))


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
            self.partial.mkdir()
            self.data = np.lib.format.open_memmap(self.partial / "data.npy", mode="w+", dtype=dtype, shape=shape)
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
    """What a protocol reads for one split: feature entries by facet, the labels, and whether all came from cache."""

    facets: dict[str, ArrayStore]
    labels: ArrayStore
    cache_hit: bool
    keys: dict[str, str]

    def __getitem__(self, facet: str) -> ArrayStore:
        return self.facets[facet]


def _dataset_key(dataset: SegmentationDataset) -> dict:
    return {"dataset": dataset.id, "split": dataset.split, "files_sha256": dataset.file_list_sha256(),
            "n_images": len(dataset)}


def label_key(dataset: SegmentationDataset, transform: Transform) -> dict:
    return {"kind": "labels", "version": CACHE_VERSION, **_dataset_key(dataset), "transform": transform.to_dict(),
            "ignore_index": dataset.ignore_index}


def feature_key(ref: BackboneRef, dataset: SegmentationDataset, transform: Transform, layer: int, facet: str) -> dict:
    return {"kind": "features", "version": CACHE_VERSION, "backbone": ref.spec.id, "source": ref.source,
            "revision": ref.revision, "mean": list(ref.spec.mean), "std": list(ref.spec.std),
            **_dataset_key(dataset), "transform": transform.to_dict(), "layer": layer, "facet": facet,
            "dtype": "float16"}


def _entry_path(root: Path, key: dict) -> Path:
    group = key.get("backbone", "labels")
    return root / key["kind"] / group / key["dataset"] / f"{key['split']}-{_digest(key)}"


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
        y = self.transform.labels(self.dataset.load_mask(i), self.dataset.ignore_index) if self.with_labels \
            else np.zeros((0, 0), dtype=np.int64)
        return x, torch.from_numpy(y), i


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
    keys = {f: feature_key(ref, dataset, transform, layer, f) for f in facets}
    paths = {f: _entry_path(root, k) for f, k in keys.items()}
    lkey = label_key(dataset, transform)
    lpath = _entry_path(root, lkey)
    missing = [f for f in facets if not _is_complete(paths[f])]
    need_labels = not _is_complete(lpath)
    if missing or need_labels:
        with _locked([paths[f] for f in missing] + ([lpath] if need_labels else [])):
            todo = [f for f in missing if not _is_complete(paths[f])]  # another process may have finished them
            if todo or not _is_complete(lpath):
                _compute(ref, dataset, transform, layer, todo, {f: (paths[f], keys[f]) for f in todo},
                         None if _is_complete(lpath) else (lpath, lkey), device, batch_size, num_workers, amp)
    return FeatureSet({f: ArrayStore(paths[f]) for f in facets}, ArrayStore(lpath), cache_hit=not missing,
                      keys={f: paths[f].name for f in facets})


def _compute(ref, dataset, transform, layer, facets, targets, label_target, device, batch_size, num_workers, amp):
    sizes = [dataset.image_size(i) for i in range(len(dataset))]
    shapes = [transform.output_size(w, h) for w, h in sizes]
    p = transform.patch_size
    grids = [(h // p, w // p) for h, w in shapes]
    writers: dict[str, _Writer] = {}
    t0 = time.perf_counter()
    if label_target is not None:
        writers["labels"] = _Writer(label_target[0], label_target[1], shapes, 1, _label_dtype(dataset), False)
    backbone = None
    if facets:
        backbone = ref.load(device)
        widths = dict.fromkeys(("tokens", "cls", "keys", "queries"), ref.spec.embed_dim)
        if "attn" in facets:  # the number of heads is read from a forward pass, not trusted from the registry
            with torch.inference_mode():
                widths["attn"] = backbone(torch.zeros(1, 3, p, p, device=device), layer, ("attn",))["attn"].shape[1]
        for f in facets:
            writers[f] = _Writer(targets[f][0], targets[f][1], grids, widths[f], np.float16, f == "cls")
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
    with progress_bar(len(dataset), what) as advance, torch.inference_mode():
        advance(start)
        for x, y, idx in (_prefetched(loader) if num_workers == 0 else loader):
            if backbone is not None:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    out = backbone(x.to(device, non_blocking=True), layer, tuple(facets))
                for f, v in out.items():
                    v = v.float()
                    if f == "attn":
                        v = v.permute(0, 2, 3, 1)
                    v = v.cpu().numpy().astype(np.float16)
                    for j, i in enumerate(idx.tolist()):
                        writers[f].write(i, v[j].reshape(-1, v.shape[-1]))
            if "labels" in writers:
                for j, i in enumerate(idx.tolist()):
                    writers["labels"].write(i, y[j].numpy().reshape(-1, 1))
            done += len(idx)
            advance(len(idx))
            if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                for w in writers.values():
                    w.checkpoint(done)
                last_checkpoint = time.monotonic()
    extra = {"extract_seconds": round(time.perf_counter() - t0, 3), "device": str(device)}
    for w in writers.values():
        w.commit(extra)
