"""SUIM (Islam et al. 2020): underwater images with 24-bit RGB BMP masks in eight colour-coded classes."""
from __future__ import annotations

import numpy as np
from PIL import Image

from .base import ColourLabels, Sample, SegmentationDataset, register_dataset

SUIM_CLASSES = ("BW", "HD", "PF", "WR", "RO", "RI", "FV", "SR")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
# a channel in this band is more than 63 levels away from both 0 and 255: no compression noise moves a palette colour
# that far, so such a pixel's class is a guess, not absorbed noise: it is off the palette (see `off_palette`)
OFF_PALETTE_LOW, OFF_PALETTE_HIGH = 64, 191


def decode_suim_rgb(rgb: np.ndarray) -> ColourLabels:
    """(H, W, 3) colours → class index R·4 + G·2 + B, each channel read as one bit (value ≥ 128, the authors'
    threshold), which absorbs the compression noise in the released masks (DATASETS.md; the DatUS² decoder's
    exact-colour matching loses PF and SR). The bits are the nearest of the eight colours; a pixel with a channel in
    [OFF_PALETTE_LOW, OFF_PALETTE_HIGH] is near none of them and marked off the palette."""
    rgb = np.asarray(rgb)[..., :3]
    r, g, b = (rgb[..., c] >= 128 for c in range(3))
    band = (rgb >= OFF_PALETTE_LOW) & (rgb <= OFF_PALETTE_HIGH)
    off = band[..., 0] | band[..., 1] | band[..., 2]
    return ColourLabels(r.astype(np.int64) * 4 + g * 2 + b, off)


@register_dataset
class SUIM(SegmentationDataset):
    """SUIM in its distributed layout; a root that directly holds images/ and masks/ (the authors' data/test, or
    ../shared/data/suim_sample) is read as the single split 'test'."""

    id = "suim"
    class_names = SUIM_CLASSES
    ignore_index = 255
    splits = ("train", "test")
    eval_split = "test"
    train_split = "train"
    source = "http://irvlab.cs.umn.edu/resources/suim-dataset (linked from https://github.com/xahidbuffon/SUIM)"
    licence = "see http://irvlab.cs.umn.edu/resources/suim-dataset"
    layout = ("  <root>/train_val/images/*.jpg   <root>/train_val/masks/*.bmp   (split 'train')\n"
              "  <root>/TEST/images/*.jpg        <root>/TEST/masks/*.bmp        (split 'test')\n"
              "  or <root>/images + <root>/masks directly (read as split 'test')")
    _split_dirs = {"train": ("train_val", "train"), "test": ("TEST", "test", "data/test")}
    colour_masks = True
    off_palette_rule = (f"a channel within {OFF_PALETTE_LOW}..{OFF_PALETTE_HIGH}, more than 63 levels from both 0 and "
                        "255: read at 128 its class would be a guess")

    def _split_dir(self, split: str):
        if split == "test" and (self.root / "images").is_dir() and (self.root / "masks").is_dir():
            return self.root
        for name in self._split_dirs[split]:
            d = self.root / name
            if (d / "images").is_dir():
                return d
        return None

    def available_splits(self) -> list[str]:
        return [s for s in self.splits if self._split_dir(s) is not None]

    def _find_samples(self) -> list[Sample]:
        d = self._split_dir(self.split)
        masks = {p.stem: p for p in (d / "masks").iterdir() if p.suffix.lower() in _IMAGE_EXTS} \
            if (d / "masks").is_dir() else {}
        images = {p.stem: p for p in (d / "images").iterdir() if p.suffix.lower() in _IMAGE_EXTS}
        return self._pair(images, masks, d / "masks")

    @property
    def palette(self) -> np.ndarray:
        idx = np.arange(len(SUIM_CLASSES))
        return (np.stack([(idx >> 2) & 1, (idx >> 1) & 1, idx & 1], axis=1) * 255).astype(np.uint8)

    def decode_mask(self, raw: Image.Image, sample: Sample) -> ColourLabels:
        return decode_suim_rgb(np.asarray(raw.convert("RGB")))


# DatUS² coarse grouping: the five object classes of SUIM and everything else (waterbody, plants, sea-floor) together.
SUIM_COARSE_CLASSES = ("HD", "RO", "FV", "RI", "WR", "BW+PF+SR")
_COARSE_OF = {"BW": "BW+PF+SR", "HD": "HD", "PF": "BW+PF+SR", "WR": "WR", "RO": "RO", "RI": "RI", "FV": "FV",
              "SR": "BW+PF+SR"}
_FINE_TO_COARSE = np.array([SUIM_COARSE_CLASSES.index(_COARSE_OF[c]) for c in SUIM_CLASSES], dtype=np.int64)


@register_dataset
class SUIMCoarse(SUIM):
    """`suim-coarse`: SUIM in DatUS²'s 6 classes, HD, RO, FV, RI, WR and BW+PF+SR merged, indexed in that order (the
    order DATASETS.md lists them; the merged background is last). Same files, layout and splits as `suim`."""

    id = "suim-coarse"
    class_names = SUIM_COARSE_CLASSES

    @property
    def palette(self) -> np.ndarray:
        fine = super().palette
        return np.stack([fine[SUIM_CLASSES.index(c)] for c in SUIM_COARSE_CLASSES[:5]] + [fine[0]])

    def decode_mask(self, raw: Image.Image, sample: Sample) -> ColourLabels:
        fine = super().decode_mask(raw, sample)
        return fine._replace(labels=_FINE_TO_COARSE[fine.labels])
