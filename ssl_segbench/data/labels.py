"""Vectorised label decoding shared by the loaders: lookup tables for id mappings and palette tables for RGB masks.

A lookup table (LUT) has one entry per raw value 0..255: the class index, the ignore index, or ``INVALID`` for a value
the dataset does not define. Decoding is one fancy-indexing step; an invalid or out-of-table value is an error naming
the file. An RGB mask is decoded against a palette into `ColourLabels`: the dataset's ``off_palette`` option settles the
pixels whose colour is not in it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from .base import ColourLabels, DatasetError

INVALID = -1


def build_lut(groups: Mapping[int, Iterable[int]], ignore: Iterable[int] = (), ignore_index: int = 255,
              size: int = 256) -> np.ndarray:
    """LUT from ``{class index: raw values}``; raw values in `ignore` map to `ignore_index`, all others are INVALID."""
    lut = np.full(size, INVALID, dtype=np.int64)
    for raw in ignore:
        lut[raw] = ignore_index
    for cls, raws in groups.items():
        for raw in raws:
            if lut[raw] != INVALID:
                raise ValueError(f"raw value {raw} mapped twice")
            lut[raw] = cls
    return lut


def apply_lut(raw: np.ndarray, lut: np.ndarray, path: str | Path, what: str) -> np.ndarray:
    """Map integer labels through `lut`; values outside it or marked INVALID raise DatasetError naming `path`."""
    raw = np.asarray(raw).astype(np.int64)
    outside = (raw < 0) | (raw >= len(lut))
    out = lut[np.where(outside, 0, raw)]
    bad = outside | (out == INVALID)
    if bad.any():
        values = np.unique(raw[bad])
        raise DatasetError(f"mask {path} has label value(s) {values[:10].tolist()} that {what} does not define "
                           f"({int(bad.sum())} pixels). Check that the file belongs to this dataset and layout, "
                           "or pass --skip-bad to leave it out.")
    return out


def decode_colours(rgb: np.ndarray, colours: np.ndarray, values: np.ndarray) -> ColourLabels:
    """(H, W, 3) colours → `values[k]` of the palette colour `colours[k]` equal to the pixel or, for a pixel off the
    palette (marked in `off`), nearest to it (Euclidean in RGB; the first such colour on a tie)."""
    rgb = np.asarray(rgb)[..., :3].astype(np.int64)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    table = np.asarray(colours, dtype=np.int64)
    table_code = (table[:, 0] << 16) | (table[:, 1] << 8) | table[:, 2]
    order = np.argsort(table_code, kind="stable")
    sorted_code = table_code[order]
    pos = np.clip(np.searchsorted(sorted_code, code), 0, len(order) - 1)
    index = order[pos]
    off = sorted_code[pos] != code
    if off.any():
        unknown, inverse = np.unique(rgb[off].reshape(-1, 3), axis=0, return_inverse=True)
        dist = ((unknown[:, None, :] - table[None, :, :]) ** 2).sum(-1)
        index[off] = dist.argmin(1)[inverse.ravel()]
    return ColourLabels(np.asarray(values, dtype=np.int64)[index], off)
