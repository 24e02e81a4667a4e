"""A deterministic synthetic dataset in SUIM's layout, so the whole pipeline runs offline with known answers.

Each image is a background (class 0) with a few ellipses and rectangles of other classes. Every class has its own
mean colour and its own stripe orientation and frequency, plus per-image jitter and noise: raw pixels separate the
classes only partly, local texture separates them well. Images are JPEGs and masks 24-bit BMPs, exactly as in SUIM.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import write_guard
from ..paths import cache_dir
from .base import register_dataset
from .suim import SUIM

GENERATOR_VERSION = 1
_CLASS_COLOURS = np.array([[40, 90, 130], [200, 170, 140], [60, 150, 70], [120, 110, 90],
                           [230, 200, 40], [200, 90, 120], [240, 140, 30], [180, 170, 120]], dtype=np.float32)
_STRIPES = [(0.0, 0.0), (0.0, 0.25), (0.8, 0.12), (1.6, 0.3), (2.4, 0.18), (0.4, 0.4), (2.0, 0.08), (1.2, 0.5)]


def _render(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 HxWx3, label HxW) pair."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    label = np.zeros((height, width), dtype=np.int64)
    for _ in range(rng.integers(2, 5)):
        c = int(rng.integers(1, 8))
        cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
        rx, ry = rng.uniform(0.12, 0.3) * width, rng.uniform(0.12, 0.3) * height
        if rng.random() < 0.5:
            inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
        else:
            inside = (np.abs(xx - cx) <= rx) & (np.abs(yy - cy) <= ry)
        label[inside] = c
    image = np.empty((height, width, 3), dtype=np.float32)
    for c in np.unique(label):
        angle, freq = _STRIPES[c]
        colour = _CLASS_COLOURS[c] + rng.normal(0, 12, size=3)
        phase = np.cos(angle) * xx + np.sin(angle) * yy
        stripes = 35.0 * np.sin(2 * np.pi * freq * phase) if freq > 0 else 0.0
        m = label == c
        image[m] = colour + (stripes[m, None] if freq > 0 else 0.0)
    image += rng.normal(0, 10, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def generate_synthetic(root: str | Path, n_train: int = 120, n_test: int = 60, size: tuple[int, int] = (256, 192),
                       seed: int = 0) -> Path:
    """Write the dataset under `root` (train_val/ and TEST/, SUIM layout); a complete root is left as is.

    It is generated into a temporary folder beside `root` and renamed into place with its `.complete` marker, under a
    lock (`<root>.lock`), so a root without the marker is never left; the lock holder first removes what a killed
    generator left (temporary folders, an incomplete root). A write that fails (full disk, unwritable cache) is a
    one-line `WriteError` naming the folder, with the temporary folder removed."""
    root = Path(root)
    if (root / ".complete").exists():
        return root
    with write_guard(root, "synthetic dataset folder (in the cache; SSL_SEGBENCH_CACHE moves it)"):
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(root.parent / f"{root.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a killed holder dies
            if (root / ".complete").exists():  # another process generated it meanwhile
                return root
            for stale in [*root.parent.glob(f"{root.name}.tmp-*"), root]:
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
            try:
                _write_synthetic(tmp, n_train, n_test, size, seed)
                os.rename(tmp, root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return root


def _write_synthetic(folder: Path, n_train: int, n_test: int, size: tuple[int, int], seed: int) -> None:
    """Every image and mask of the dataset into `folder`, then its `.complete` marker."""
    rng = np.random.default_rng(seed)
    for split_dir, n in (("train_val", n_train), ("TEST", n_test)):
        (folder / split_dir / "images").mkdir(parents=True)
        (folder / split_dir / "masks").mkdir(parents=True)
        for i in range(n):
            image, label = _render(rng, *size)
            name = f"syn_{split_dir.lower()}_{i:05d}"
            Image.fromarray(image).save(folder / split_dir / "images" / f"{name}.jpg", quality=92)
            bits = np.stack([(label >> 2) & 1, (label >> 1) & 1, label & 1], axis=-1).astype(np.uint8) * 255
            Image.fromarray(bits).save(folder / split_dir / "masks" / f"{name}.bmp")
    (folder / ".complete").write_text(f"generator v{GENERATOR_VERSION} seed {seed}\n")


@register_dataset
class Synthetic(SUIM):
    """`synthetic`: SUIM's classes and layout on generated images (120 train / 60 test at 256×192)."""

    id = "synthetic"
    source = "generated by ssl-segbench, nothing to download (leave --data-root out)"
    licence = "none needed (generated data)"
    layout = SUIM.layout + "\n  (generated automatically under the cache directory when --data-root is not given)"

    @staticmethod
    def default_root() -> Path:
        return generate_synthetic(cache_dir() / "data" / f"synthetic-v{GENERATOR_VERSION}")
