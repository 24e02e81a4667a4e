"""Cache entries: the one mechanism behind everything ssl-segbench keeps between runs (feature facets, labels, crop
embeddings, pseudo masks).

An entry is a directory `<root>/<kind>/<group>/<dataset>/<split>-<digest>`, the digest being `json_digest` of the
full key (everything that determines its contents; the key is stored in `meta.json`). It holds `data.npy` (rows ×
width, memory-mapped), `index.npy` ((N, 3) int64: row offset, h, w per item, so items of different sizes coexist),
optional extra arrays, and `meta.json`, whose presence marks the entry complete. An entry is filled in
`<entry>.partial/` and renamed into place when complete, so a crash never leaves a half-written entry that looks valid;
periodic checkpoints (`progress.json`: how many items, in order, are on disk) let a killed run resume where it
stopped; a lock per entry (`<entry>.lock`, flock) makes concurrent runs wait for each other and then find the entry
complete instead of computing it twice (`ensure`).

Before an entry is filled, its disk space is checked and reserved (posix_fallocate), so a full disk is an error naming
the size and the directory, never a SIGBUS from the memory map; a write error, and any expected failure
(`SegbenchError`), removes the partial entry; an interrupt or crash keeps it for the resume.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .digest import sha256_hex
from .errors import SegbenchError
from .paths import checkpoint_seconds, inside, safe_component

SPACE_MARGIN = 64 << 20  # bytes left free beyond an entry's size
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


def json_digest(obj, length: int = 24) -> str:
    """sha256 of an object's sorted-key JSON, first `length` hex digits: the one key digest of the project (cache
    entries, record keys, leaderboard column ids)."""
    return sha256_hex(json.dumps(obj, sort_keys=True, default=str), length)


class CacheError(SegbenchError):
    """The cache cannot hold an entry (disk full, write error); nothing half-written is left behind."""


def space_error(path: Path, needed: int | None, e: OSError | None = None) -> CacheError:
    """The error for an entry the disk cannot hold: what was needed (when known), what is free, where, and the fix."""
    free = shutil.disk_usage(path.parent).free
    spare = "" if e is not None else f" (plus {SPACE_MARGIN >> 20} MiB kept free)"
    need = f"needs {needed / 2**20:,.1f} MiB{spare} for" if needed else "could not write"
    cause = f" ({e.strerror or e})" if e is not None else ""
    return CacheError(f"the feature cache {need} {path.name}{cause}; {free / 2**20:,.1f} MiB are free under "
                      f"{path.parent}. Free space there, or point SSL_SEGBENCH_CACHE at a larger disk. The partial "
                      "entry was removed.")


@dataclass(frozen=True)
class Entry:
    """Where one entry lives and the key it is made of."""

    path: Path
    key: dict

    @classmethod
    def at(cls, root: Path, kind: str, group: str, dataset: str, split: str, key: dict) -> "Entry":
        rel = Path(kind, safe_component(group), safe_component(dataset), f"{safe_component(split)}-{json_digest(key)}")
        return cls(inside(root, rel), key)

    def complete(self) -> bool:
        return (self.path / "meta.json").is_file()

    def open(self) -> "ArrayStore":
        return ArrayStore(self.path)

    def writer(self, shapes: list[tuple[int, int]], width: int, dtype, per_item: bool = False, rank: int = 0,
               world: int = 1) -> "RowWriter":
        """A writer for items of `shapes` (h, w): h·w rows each, or one row each with `per_item`; with `world` > 1,
        rank `rank`'s writer of its shard."""
        return RowWriter(self.path, self.key, shapes, width, dtype, per_item, rank, world)


class ArrayStore:
    """One complete entry, opened read-only: rows of all items plus a per-item index, and any extra arrays."""

    def __init__(self, path: Path):
        self.path = path
        self.meta = json.loads((path / "meta.json").read_text())
        self.data = np.load(path / "data.npy", mmap_mode="r")
        self.index = np.load(path / "index.npy")

    def __len__(self) -> int:
        return len(self.index)

    def grid(self, i: int) -> tuple[int, int]:
        """Item i's (h, w) grid shape, without reading its rows."""
        return int(self.index[i, 1]), int(self.index[i, 2])

    def image(self, i: int) -> np.ndarray:
        """Item i's rows reshaped to (h, w, width) (or (width,) for per-item entries such as cls)."""
        off, h, w = (int(v) for v in self.index[i])
        rows = self.data[off: off + h * w]
        return rows[0] if self.meta["per_image"] else rows.reshape(h, w, -1)

    def labels(self, i: int) -> np.ndarray:
        """For a label entry: image i's (H, W) int64 labels."""
        return self.image(i)[..., 0].astype(np.int64)

    def array(self, name: str) -> np.ndarray:
        """An extra array saved with the entry (`RowWriter.commit(arrays=...)`)."""
        return np.load(self.path / f"{name}.npy")


def release_pages(a: np.ndarray) -> None:
    """Drop the pages of a memory-mapped array from this process's resident set (they stay in the page cache, so
    the next read costs no disk access): a scan over an entry larger than RAM then keeps one chunk resident, not
    every page it touched. Arrays that are not memory maps are left alone."""
    import mmap

    while a is not None and not isinstance(a, np.memmap):
        a = getattr(a, "base", None)
    m = getattr(a, "_mmap", None)
    if m is not None and hasattr(m, "madvise"):
        m.madvise(mmap.MADV_DONTNEED)


class RowWriter:
    """Fills one entry in `<entry>.partial/`. Checkpoints record how many items (in order) are safely on disk, so a
    killed run resumes from there (`done`); `commit` renames the directory into place atomically. The caller holds the
    entry's lock (`ensure`), so no two processes fill the same partial entry."""

    def __init__(self, final: Path, key: dict, shapes: list[tuple[int, int]], width: int, dtype, per_item: bool,
                 rank: int = 0, world: int = 1):
        final.parent.mkdir(parents=True, exist_ok=True)
        self.final, self.key, self.per_item = final, key, per_item
        self.partial = final.parent / (final.name + ".partial")
        # data-parallel filling: rank r writes items [first, last) of len(shapes); rank 0 makes (or keeps) the partial
        # entry, the others open it after a barrier; each checkpoints its own progress; rank 0 commits
        self.rank, self.world = rank, world
        self.first = len(shapes) * rank // world
        counts = np.array([1 if per_item else h * w for h, w in shapes], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else np.zeros(0, np.int64)
        self.index = np.column_stack([offsets, [s[0] for s in shapes], [s[1] for s in shapes]]).astype(np.int64) \
            if len(counts) else np.zeros((0, 3), np.int64)
        shape = (int(counts.sum()), width)
        self.done = self._resumable(shape, np.dtype(dtype))
        if rank > 0:  # rank 0 made the partial entry before the barrier that precedes this
            self.data = np.load(self.partial / "data.npy", mmap_mode="r+")
            self.done = self.done or self.first
        elif self.done:
            self.data = np.load(self.partial / "data.npy", mmap_mode="r+")
        else:
            shutil.rmtree(self.partial, ignore_errors=True)
            needed = shape[0] * shape[1] * np.dtype(dtype).itemsize + (1 << 16)
            if shutil.disk_usage(final.parent).free < needed + SPACE_MARGIN:
                raise space_error(self.final, needed)
            self.partial.mkdir()
            try:
                self.data = np.lib.format.open_memmap(self.partial / "data.npy", mode="w+", dtype=dtype, shape=shape)
                _reserve(self.partial / "data.npy")
            except OSError as e:
                self.discard()
                raise space_error(self.final, needed, e) from None
        self.resumed_from = self.done
        self._last_checkpoint = time.monotonic()

    @property
    def _progress(self) -> Path:
        return self.partial / ("progress.json" if self.world == 1 else f"progress.{self.rank}.json")

    def _resumable(self, shape, dtype) -> int:
        """Where an earlier, interrupted run of the same key (and the same number of ranks) left this writer's
        items: the first item not yet on disk (0 when nothing is)."""
        try:
            progress = json.loads(self._progress.read_text())
            data = np.load(self.partial / "data.npy", mmap_mode="r")
        except (OSError, ValueError):
            return 0
        if progress.get("key") != self.key or progress.get("world", 1) != self.world or data.shape != shape \
                or data.dtype != dtype:
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
        """Flush, then record that items [0, done) are on disk."""
        self.data.flush()
        tmp = self._progress.with_name(self._progress.name + ".tmp")
        tmp.write_text(json.dumps({"key": self.key, "done": done, "world": self.world}))
        os.replace(tmp, self._progress)
        self.done = done
        self._last_checkpoint = time.monotonic()

    def maybe_checkpoint(self, done: int) -> None:
        """Checkpoint when the last one is older than $SSL_SEGBENCH_CHECKPOINT_SECONDS (default 20)."""
        if time.monotonic() - self._last_checkpoint > checkpoint_seconds():
            self.checkpoint(done)

    def commit(self, extra: dict | None = None, arrays: dict[str, np.ndarray] | None = None) -> ArrayStore:
        """Write the index, extra arrays and meta.json, then rename the entry into place."""
        self.data.flush()
        del self.data
        np.save(self.partial / "index.npy", self.index)
        for name, a in (arrays or {}).items():
            np.save(self.partial / f"{name}.npy", a)
        meta = {"key": self.key, "per_image": self.per_item, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "resumed_from": self.resumed_from, **(extra or {})}
        (self.partial / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        for f in self.partial.glob("progress*.json"):
            f.unlink()
        os.rename(self.partial, self.final)
        return ArrayStore(self.final)


@contextlib.contextmanager
def filling(writers: list[RowWriter]):
    """Run the body that fills `writers` (a list the body may still append to); on an expected failure or a write
    error, remove their partial entries (a resume would only meet the same failure, and a fixed input has another
    key); an interrupt or crash keeps them for the resume."""
    try:
        yield
    except SegbenchError:
        for w in writers:
            w.discard()
        raise
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        for w in writers:
            w.discard()
        if not writers:
            raise
        raise space_error(writers[0].final, None, e) from None


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
def locked(entries: list[Entry]):
    """Exclusive locks on entries (`<entry>.lock`, taken in sorted order): concurrent runs wait, then find the entry
    complete instead of writing it twice."""
    handles = []
    try:
        for p in sorted({e.path for e in entries}):
            p.parent.mkdir(parents=True, exist_ok=True)
            fh = open(p.parent / (p.name + ".lock"), "w")
            handles.append(fh)
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        for fh in handles:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()


def ensure(entries: list[Entry], compute: Callable[[list[Entry]], None]) -> list[Entry]:
    """Make every entry complete: `compute(todo)` fills the ones still missing once their locks are held (another
    process may have finished some meanwhile). Returns the entries this call computed (empty: all from the cache)."""
    missing = [e for e in entries if not e.complete()]
    if not missing:
        return []
    with locked(missing):
        todo = [e for e in missing if not e.complete()]
        if todo:
            compute(todo)
    return todo
