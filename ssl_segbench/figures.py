"""`ssl-segbench show`: a PNG grid of images, ground truth and predictions in the dataset's palette: what people look
at before they trust a number. Predictions are the first seed's label maps in class space, as `--save-masks` writes
them; images and ground truth are drawn at the run's transform geometry, with PIL only, so the bytes are the same on
every machine."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .atomic import write_bytes_atomic
from .errors import SegbenchError
from .paths import inside, safe_component


def figure_path(root: Path, dataset: str, backbone: str, protocol: str) -> Path:
    """Where the leaderboard looks for a prediction grid: <root>/figures/<dataset>/<backbone>__<protocol>.png (names
    made portable safe path components, without colons as the leaderboard's pages, the path checked to stay under
    <root>)."""
    name = safe_component(f"{backbone}__{protocol.replace(':', '-')}", portable=True)
    return inside(root, Path("figures", safe_component(dataset, portable=True), f"{name}.png"))


def colourize(labels: np.ndarray, palette: np.ndarray, ignore_index: int) -> np.ndarray:
    """(H, W) labels → (H, W, 3) uint8; ignore (and anything outside the palette) is black."""
    lut = np.zeros((max(int(labels.max()) + 1, len(palette)), 3), dtype=np.uint8)
    lut[: len(palette)] = palette
    out = lut[np.clip(labels, 0, len(lut) - 1)]
    out[(labels == ignore_index) | (labels < 0)] = 0
    return out


def prediction_grid(dataset, transform, masks_dir: Path, out: Path, n: int, title: str) -> Path:
    """Draw the first `n` images of `dataset` that have a saved prediction: image | ground truth | prediction, one row
    each, at the geometry of `transform` (the run's). Drawn with PIL and its built-in bitmap font, not matplotlib:
    the same inputs give the same PNG bytes on every machine (no system fonts, no font cache)."""
    from PIL import Image, ImageDraw, ImageFont

    # lazy: start-up time (torch): the leaderboard and site import figures
    from .protocols.base import label_image, sample_name

    rows = [i for i in range(len(dataset)) if (masks_dir / f"{sample_name(dataset, i)}.png").is_file()][:n]
    if not rows:
        raise SegbenchError(f"no saved predictions in {masks_dir}: the run saved no label maps")
    font = ImageFont.load_default_imagefont()
    pad, caption = 8, 14
    panels = []
    for i in rows:
        gt = transform.labels(dataset.load_mask(i), dataset.ignore_index)
        pred = np.asarray(Image.open(masks_dir / f"{sample_name(dataset, i)}.png"), dtype=np.int64)
        panels.append((sample_name(dataset, i), (label_image(dataset, transform, i),
                                                 colourize(gt, dataset.palette, dataset.ignore_index),
                                                 colourize(pred, dataset.palette, dataset.ignore_index))))
    h = max(p.shape[0] for _, row in panels for p in row)
    w = max(p.shape[1] for _, row in panels for p in row)
    grid = Image.new("RGB", (3 * w + 4 * pad, 2 * pad + caption + len(panels) * (h + caption + pad)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((pad, pad), title, fill="black", font=font)
    for r, (name, row) in enumerate(panels):
        top = 2 * pad + caption + r * (h + caption + pad)
        for c, (img, what) in enumerate(zip(row, ("image", "ground truth", "prediction"))):
            left = pad + c * (w + pad)
            draw.text((left, top), f"{name}: {what}" if c == 0 else what, fill="black", font=font)
            grid.paste(Image.fromarray(img), (left, top + caption))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    write_bytes_atomic(out, buf.getvalue())
    return out
