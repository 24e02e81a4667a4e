"""COCO-Stuff: the curated 27-class set of IIC / PiCIE / STEGO, its stuff-15 and things-12 views, and Leopart's
COCO-Stuff-15 (15 stuff supercategories over every val2017 image), which is a different benchmark with its own id."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..digest import sha256_hex
from .base import DatasetError, Sample, SegmentationDataset, register_dataset
from .labels import apply_lut, build_lut

COCOSTUFF27_CLASSES = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal", "outdoor", "person",
    "sports", "vehicle",  # 0-11 things
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall", "window", "building",
    "ground", "plant", "sky", "solid", "structural", "water",  # 12-26 stuff
)
N_THINGS = 12

# coarse index → fine ids of the stuffthingmaps (COCO category id − 1, 0..181), as in PiCIE's table (DATASETS.md).
FINE_IDS_27 = {
    0: range(71, 77), 1: range(77, 83), 2: range(51, 61), 3: range(61, 71), 4: range(83, 91), 5: range(43, 51),
    6: range(25, 33), 7: range(15, 25), 8: range(9, 15), 9: (0,), 10: range(33, 43), 11: range(1, 9),
    12: (101, 102), 13: (100, 113, 114, 115, 116, 117), 14: (120, 121, 152, 169),
    15: (97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164), 16: (99, 131, 138, 142),
    17: (91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167), 18: range(170, 177), 19: (179, 180),
    20: (94, 95, 127, 150, 157, 165), 21: (110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158),
    22: (93, 96, 118, 123, 128, 133, 141, 162, 168), 23: (105, 156), 24: (126, 134, 149, 159, 161, 181),
    25: (98, 112, 137, 145, 163), 26: (119, 147, 154, 177, 178),
}
FINE_TO_27 = build_lut(FINE_IDS_27, ignore=(255,))
CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"


def _view(lut27: np.ndarray, keep: range) -> np.ndarray:
    """LUT of a sub-view: coarse classes in `keep` renumbered from 0, the others ignored (invalid stays invalid)."""
    out = lut27.copy()
    valid = lut27 >= 0
    inside = valid & (lut27 >= keep.start) & (lut27 < keep.stop)
    out[valid & ~inside] = 255
    out[inside] -= keep.start
    return out


@register_dataset
class CocoStuff27(SegmentationDataset):
    """`cocostuff27`: curated COCO-Stuff-27 (2175 val / 49,629 train images), fine stuffthingmaps ids → 27 coarse
    classes (0-11 things, 12-26 stuff), 255 unlabelled → ignore.

    The image list is PiCIE's `curated/{split}2017/Coco164kFull_Stuff_Coarse_7.txt` under the root, or the file given as
    ``curated_list``; the list used and its sha256 go into ``notes``. A listed image without its file is an error.
    """

    id = "cocostuff27"
    class_names = COCOSTUFF27_CLASSES
    splits = ("train", "val")
    source = ("https://github.com/nightrome/cocostuff (COCO 2017 images, stuffthingmaps_trainval2017.zip); "
              "curated lists: https://github.com/janghyuncho/PiCIE (curated/)")
    licence = ("COCO images: Flickr terms of use; COCO-Stuff annotations: CC BY 4.0; see "
               "https://github.com/nightrome/cocostuff")
    layout = ("  <root>/images/{train2017,val2017}/*.jpg\n"
              "  <root>/annotations/{train2017,val2017}/*.png   (stuffthingmaps: fine ids 0-181, 255 unlabelled)\n"
              f"  <root>/curated/{{train2017,val2017}}/{CURATED_LIST}   (PiCIE's lists; or pass curated_list=PATH)")
    _lut = FINE_TO_27

    def __init__(self, root, split=None, *, skip_bad: bool = False, resize_masks: bool = False,
                 curated_list: str | Path | None = None):
        self.curated_list = None if curated_list is None else Path(curated_list).expanduser()
        super().__init__(root, split, skip_bad=skip_bad, resize_masks=resize_masks)

    def available_splits(self) -> list[str]:
        return [s for s in self.splits if (self.root / "images" / f"{s}2017").is_dir()]

    def _list_path(self) -> Path:
        path = self.curated_list or self.root / "curated" / f"{self.split}2017" / CURATED_LIST
        if not path.is_file():
            raise DatasetError(f"curated image list {path} not found. Download curated/{self.split}2017/{CURATED_LIST} "
                               "from the PiCIE repository into the root, or pass curated_list=PATH.\n"
                               f"Expected layout for '{self.id}':\n{self.layout}\n{self.where_to_get()}")
        return path

    def _find_samples(self) -> list[Sample]:
        path = self._list_path()
        text = path.read_bytes()
        lines = [Path(line.strip()).stem for line in text.decode().splitlines() if line.strip()]
        ids = list(dict.fromkeys(lines))
        self.notes.append(f"image list: {path} ({len(ids)} ids, sha256 {sha256_hex(text)})")
        if len(ids) != len(lines):
            self.notes.append(f"image list has {len(lines) - len(ids)} duplicate id(s), each used once")
        return self._pair_listed(ids, self.root / "images" / f"{self.split}2017",
                                 self.root / "annotations" / f"{self.split}2017")

    def decode_mask(self, raw: Image.Image, sample: Sample) -> np.ndarray:
        return apply_lut(np.asarray(raw), self._lut, sample.mask, f"COCO-Stuff ('{self.id}')")


@register_dataset
class CocoStuff27Stuff15(CocoStuff27):
    """`cocostuff27-stuff15`: the stuff half of curated COCO-Stuff-27, coarse − 12 on stuff pixels, things ignored."""

    id = "cocostuff27-stuff15"
    class_names = COCOSTUFF27_CLASSES[N_THINGS:]
    _lut = _view(FINE_TO_27, range(N_THINGS, len(COCOSTUFF27_CLASSES)))


@register_dataset
class CocoStuff27Things12(CocoStuff27):
    """`cocostuff27-things12`: the thing half of curated COCO-Stuff-27, coarse 0-11 on thing pixels, stuff ignored."""

    id = "cocostuff27-things12"
    class_names = COCOSTUFF27_CLASSES[:N_THINGS]
    _lut = _view(FINE_TO_27, range(0, N_THINGS))


# Leopart's classes: the stuff supercategories of stuff_{split}2017.json sorted by name ("other" removed); the same
# groups as the stuff half of COCO-Stuff-27, under the JSON's names and in alphabetical order.
LEOPART_STUFF15_CLASSES = ("building", "ceiling", "floor", "food-stuff", "furniture-stuff", "ground", "plant",
                           "raw-material", "sky", "solid", "structural", "textile", "wall", "water", "window")
_LEOPART_NAME = {"rawmaterial": "raw-material"}
# pixelmaps hold COCO category ids: 92-182 stuff, 183 "other" (things), 0 unlabelled.
PIXELMAP_TO_LEOPART15 = build_lut(
    {LEOPART_STUFF15_CLASSES.index(_LEOPART_NAME.get(name, name)): [f + 1 for f in FINE_IDS_27[c]]
     for c, name in enumerate(COCOSTUFF27_CLASSES) if c >= N_THINGS},
    ignore=(0, 183))


@register_dataset
class CocoStuff15Leopart(SegmentationDataset):
    """`cocostuff15-leopart`: Leopart's COCO-Stuff-15, every image of the split (val2017: 5000) with the stuff
    pixelmaps of the COCO-Stuff annotations; stuff ids 92-182 → their 15 supercategories, 0 and 183 ("other") → ignore.

    Assumption (from Leopart's data module): class index = rank of the supercategory name among the sorted stuff
    supercategories of stuff_{split}2017.json, which are the stuff groups of COCO-Stuff-27 (DATASETS.md).
    """

    id = "cocostuff15-leopart"
    class_names = LEOPART_STUFF15_CLASSES
    splits = ("train", "val")
    source = "https://cocodataset.org/#download (2017 train/val images, stuff_annotations_trainval2017.zip)"
    licence = "COCO images: Flickr terms of use; COCO annotations: CC BY 4.0; see https://cocodataset.org/#termsofuse"
    layout = ("  <root>/images/{train2017,val2017}/*.jpg   (or <root>/{train2017,val2017}/*.jpg)\n"
              "  <root>/annotations/stuff_{train2017,val2017}_pixelmaps/*.png\n"
              "      (or <root>/stuff_{train2017,val2017}_pixelmaps)")

    def _dirs(self, split: str) -> tuple[Path | None, Path | None]:
        images = next((d for d in (self.root / "images" / f"{split}2017", self.root / f"{split}2017") if d.is_dir()),
                      None)
        name = f"stuff_{split}2017_pixelmaps"
        masks = next((d for d in (self.root / "annotations" / name, self.root / name) if d.is_dir()), None)
        return images, masks

    def available_splits(self) -> list[str]:
        return [s for s in self.splits if self._dirs(s)[0] is not None]

    def _find_samples(self) -> list[Sample]:
        image_dir, mask_dir = self._dirs(self.split)
        if mask_dir is None:
            raise DatasetError(f"no stuff_{self.split}2017_pixelmaps folder under {self.root}: unzip "
                               f"stuff_{self.split}2017_pixelmaps.zip from stuff_annotations_trainval2017.zip into "
                               f"{self.root / 'annotations'}.\nExpected layout for '{self.id}':\n{self.layout}\n"
                               f"{self.where_to_get()}")
        images = {p.stem: p for p in image_dir.glob("*.jpg")}
        masks = {p.stem: p for p in mask_dir.glob("*.png")}
        return self._pair(images, masks, mask_dir)

    def decode_mask(self, raw: Image.Image, sample: Sample) -> np.ndarray:
        return apply_lut(np.asarray(raw), PIXELMAP_TO_LEOPART15, sample.mask, "COCO-Stuff pixelmaps (Leopart)")
