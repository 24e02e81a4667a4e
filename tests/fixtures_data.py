"""Helpers for the dataset tests: write small images and label files in the encodings the real datasets use."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_data(name: str) -> Path:
    """A sample under ../shared/data, or skip the test when this checkout has none."""
    path = SHARED / "data" / name
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


def write_image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    """Random RGB image; JPEG or PNG by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_labels(path: Path, labels: np.ndarray, palette: np.ndarray | None = None) -> Path:
    """8-bit label PNG: grey ('L'), or palette mode ('P') when a (N, 3) palette is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(labels, dtype=np.uint8))
    if palette is not None:
        im = im.convert("P")
        im.putpalette(np.asarray(palette, dtype=np.uint8).ravel().tolist())
        assert im.mode == "P"
    im.save(path)
    return path


def write_rgb_mask(path: Path, rgb: np.ndarray) -> Path:
    """24-bit RGB mask (BMP or PNG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(path)
    return path


def grid(values, width: int | None = None) -> np.ndarray:
    """Lay a sequence of label values out in a 2-D array (rows of `width`), padding by repeating the last value."""
    values = list(values)
    width = width or len(values)
    height = -(-len(values) // width)
    return np.array(values + values[-1:] * (height * width - len(values))).reshape(height, width)
