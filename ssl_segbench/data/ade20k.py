"""ADE20K as released for the SceneParsing challenge (SceneParse150): 150 classes, annotation 0 = "other" ignored."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .base import Sample, SegmentationDataset, register_dataset
from .labels import apply_lut, build_lut

# First name of each class in objectInfo150.csv (CSAILVision/sceneparsing), classes 1..150 in order.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand",
    "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator",
    "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
ANNOTATION_TO_150 = build_lut({c: (c + 1,) for c in range(len(ADE20K_CLASSES))}, ignore=(0,))


@register_dataset
class ADE20K(SegmentationDataset):
    """`ade20k`: SceneParse150, 20,210 train / 2,000 val; annotation 0 ("other") → ignore, 1..150 → 0..149.
    The root may be ADEChallengeData2016 or the folder holding it."""

    id = "ade20k"
    class_names = ADE20K_CLASSES
    splits = ("train", "val")
    source = "http://sceneparsing.csail.mit.edu (ADEChallengeData2016.zip)"
    licence = "see http://sceneparsing.csail.mit.edu"
    layout = ("  <root>/ADEChallengeData2016/images/{training,validation}/*.jpg\n"
              "  <root>/ADEChallengeData2016/annotations/{training,validation}/*.png   (0 = other, 1..150 classes)")
    _split_dirs = {"train": "training", "val": "validation"}

    @property
    def data_dir(self) -> Path:
        nested = self.root / "ADEChallengeData2016"
        return nested if nested.is_dir() else self.root

    def available_splits(self) -> list[str]:
        return [s for s, d in self._split_dirs.items() if (self.data_dir / "images" / d).is_dir()]

    def _find_samples(self) -> list[Sample]:
        sub = self._split_dirs[self.split]
        mask_dir = self.data_dir / "annotations" / sub
        images = {p.stem: p for p in (self.data_dir / "images" / sub).glob("*.jpg")}
        masks = {p.stem: p for p in mask_dir.glob("*.png")}
        return self._pair(images, masks, mask_dir)

    def decode_mask(self, raw: Image.Image, sample: Sample) -> np.ndarray:
        return apply_lut(np.asarray(raw), ANNOTATION_TO_150, sample.mask, "ADE20K SceneParse150")
