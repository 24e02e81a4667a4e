"""Content identity of files: a sha256 over what every file holds, not over its name (datasets, local checkpoints).

Two runs share cached features, labels and records only when the files behind them have the same bytes. Hashing every
byte of a 100k-image dataset on every run would cost minutes, so each file's digest is remembered in a small manifest
per root directory (`<cache>/manifests/<root digest>.json`), keyed by the file's absolute path and trusted only while
the file's (size, mtime, ctime, inode) are unchanged: a file replaced, edited or touched under the same name is read
again, an untouched one never is. The manifest is merged under a lock and written atomically, so concurrent runs only
add to it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from .atomic import write_json_atomic
from .digest import sha256_hex
from .paths import cache_dir, inside
from .progress import progress_bar

MANIFEST_VERSION = 1
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes (read in 1 MiB chunks)."""
    with open(path, "rb") as f:
        return sha256_hex(iter(lambda: f.read(_CHUNK), b""))


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class Manifest:
    """Remembered digests of the files under one dataset root (any file may be added, e.g. a list file elsewhere)."""

    def __init__(self, root: Path):
        key = sha256_hex(str(Path(root).resolve()), 24)
        self.path = inside(cache_dir(), Path("manifests") / f"{key}.json")
        self.root = str(Path(root).resolve())
        self.entries: dict[str, list] = self._read()
        self.added: dict[str, list] = {}

    def _read(self) -> dict:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION:
            return {}
        return doc.get("files", {}) if isinstance(doc.get("files"), dict) else {}

    def known(self, path: Path) -> str | None:
        """The remembered digest of `path` when the file is unchanged since it was hashed, else None."""
        entry = self.entries.get(str(Path(path).resolve()))
        if not entry or len(entry) != 5:
            return None
        return entry[4] if entry[:4] == _signature(os.stat(path)) else None

    def digest(self, path: Path) -> str:
        """sha256 of `path`, from memory when the file is unchanged, else read (and remembered)."""
        known = self.known(path)
        if known is not None:
            return known
        before = _signature(os.stat(path))
        digest = sha256_file(path)
        if _signature(os.stat(path)) != before:  # written to while being read: its digest means nothing
            raise OSError(f"{path} changed while it was being read; rerun when nothing writes to the dataset")
        entry = before + [digest]
        self.entries[str(Path(path).resolve())] = entry
        self.added[str(Path(path).resolve())] = entry
        return digest

    def save(self) -> None:
        """Merge what this process hashed into the manifest on disk (locked, atomic)."""
        if not self.added:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            files = self._read()
            files.update(self.added)
            with contextlib.suppress(OSError):  # a read-only cache only loses the shortcut, never correctness
                write_json_atomic(self.path, {"version": MANIFEST_VERSION, "root": self.root, "files": files})
        self.added = {}


def content_sha256(header: dict, files: list[tuple[str, Path | None]], root: Path, what: str) -> str:
    """sha256 over `header` (JSON) and, for each (name, path) in order, the name and the file's content digest
    ('-' for None). Digests come from the root's manifest; unknown or changed files are hashed (with a progress bar)."""
    manifest = Manifest(root)
    todo = [p for _, p in files if p is not None and manifest.known(p) is None]
    try:
        if todo:
            with progress_bar(len(todo), f"hashing {len(todo)} file(s) of {what} (once; remembered in the cache)") \
                    as advance:
                for p in todo:
                    manifest.digest(p)
                    advance()
        lines = [name.encode() + b"\0" + (manifest.digest(p) if p is not None else "-").encode() + b"\n"
                 for name, p in files]
    finally:
        manifest.save()
    return sha256_hex([json.dumps(header, sort_keys=True).encode() + b"\n", *lines])
