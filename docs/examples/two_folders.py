"""`two-folders`: images in `<root>/images/<split>/*.jpg`, masks in `<root>/masks/<split>/*.png` holding 0 (background),
1 (object) and 255 (ignore). The example dataset of docs/extending.md: saved as ssl_segbench/data/two_folders.py it is
registered, listed, checked (`datasets check`) and runnable with no other edit."""
from __future__ import annotations

import numpy as np
from PIL import Image

from .base import Sample, SegmentationDataset, register_dataset


@register_dataset
class TwoFolders(SegmentationDataset):
    id = "two-folders"
    class_names = ("background", "object")
    splits = ("train", "val")
    source = "your own images (docs/extending.md)"
    licence = "yours"
    layout = "  <root>/images/{train,val}/*.jpg   <root>/masks/{train,val}/*.png   (0, 1; 255 = ignore)"

    def available_splits(self) -> list[str]:
        return [s for s in self.splits if (self.root / "images" / s).is_dir()]

    def _find_samples(self) -> list[Sample]:
        mask_dir = self.root / "masks" / self.split
        images = {p.stem: p for p in (self.root / "images" / self.split).glob("*.jpg")}
        return self._pair(images, {p.stem: p for p in mask_dir.glob("*.png")}, mask_dir)

    def decode_mask(self, raw: Image.Image, sample: Sample) -> np.ndarray:
        mask = np.asarray(raw, dtype=np.int64)
        if not np.isin(mask, (0, 1, self.ignore_index)).all():
            raise ValueError(f"{sample.mask}: values other than 0, 1 and {self.ignore_index}")
        return mask
