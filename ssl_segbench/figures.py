"""`ssl-segbench show`: a PNG grid of images, ground truth and predictions in the dataset's palette: what people look
at before they trust a number. Predictions are the first seed's label maps in class space, as `--save-masks` writes
them; images and ground truth are drawn at the run's transform geometry."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .atomic import write_bytes_atomic
from .errors import SegbenchError
from .paths import inside, safe_component


def figure_path(root: Path, dataset: str, backbone: str, protocol: str) -> Path:
    """Where the leaderboard looks for a prediction grid: <root>/figures/<dataset>/<backbone>__<protocol>.png (names
    made safe path components, the path checked to stay under <root>)."""
    name = safe_component(f"{backbone}__{protocol.replace(':', '-')}")
    return inside(root, Path("figures", safe_component(dataset), f"{name}.png"))


def colourize(labels: np.ndarray, palette: np.ndarray, ignore_index: int) -> np.ndarray:
    """(H, W) labels → (H, W, 3) uint8; ignore (and anything outside the palette) is black."""
    lut = np.zeros((max(int(labels.max()) + 1, len(palette)), 3), dtype=np.uint8)
    lut[: len(palette)] = palette
    out = lut[np.clip(labels, 0, len(lut) - 1)]
    out[(labels == ignore_index) | (labels < 0)] = 0
    return out


def prediction_grid(dataset, transform, masks_dir: Path, out: Path, n: int, title: str) -> Path:
    """Draw the first `n` images of `dataset` that have a saved prediction: image | ground truth | prediction, one row
    each, at the geometry of `transform` (the run's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from .protocols.base import label_image, sample_name

    rows = [i for i in range(len(dataset)) if (masks_dir / f"{sample_name(dataset, i)}.png").is_file()][:n]
    if not rows:
        raise SegbenchError(f"no saved predictions in {masks_dir}: the run saved no label maps")
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, i in enumerate(rows):
        gt = transform.labels(dataset.load_mask(i), dataset.ignore_index)
        pred = np.asarray(Image.open(masks_dir / f"{sample_name(dataset, i)}.png"), dtype=np.int64)
        panels = (label_image(dataset, transform, i), colourize(gt, dataset.palette, dataset.ignore_index),
                  colourize(pred, dataset.palette, dataset.ignore_index))
        for c, (img, name) in enumerate(zip(panels, ("image", "ground truth", "prediction"))):
            axes[r, c].imshow(img, interpolation="nearest")
            axes[r, c].set_axis_off()
            axes[r, c].set_title(f"{sample_name(dataset, i)}: {name}" if c == 0 else name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    write_bytes_atomic(out, buf.getvalue())
    return out
