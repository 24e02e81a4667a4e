"""PASCAL VOC 2012 segmentation: the devkit layout (`voc`, palette PNGs) and flat RGB-rendered pairs (`voc-rgb`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .base import ColourLabels, DatasetError, Sample, SegmentationDataset, is_rgb_file, register_dataset, voc_palette
from .labels import apply_lut, build_lut, decode_colours

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
BOUNDARY_COLOUR = (224, 224, 192)  # palette entry 255: object boundary, ignored
VOC_LUT = build_lut({c: (c,) for c in range(len(VOC_CLASSES))}, ignore=(255,))
_COLOURS = np.vstack([voc_palette(len(VOC_CLASSES)), [BOUNDARY_COLOUR]])
_COLOUR_VALUES = np.array(list(range(len(VOC_CLASSES))) + [255])


def decode_voc(raw: Image.Image, path: str | Path) -> np.ndarray | ColourLabels:
    """A VOC target → class indices: palette/grey PNGs carry the index itself, RGB renderings are read by colour in the
    VOC palette with (224, 224, 192) = boundary = 255 (`ColourLabels`: the dataset's off_palette settles the rest)."""
    if raw.mode in ("P", "L"):
        return apply_lut(np.asarray(raw), VOC_LUT, path, "PASCAL VOC")
    if raw.mode in ("RGB", "RGBA"):
        return decode_colours(np.asarray(raw.convert("RGB")), _COLOURS, _COLOUR_VALUES)
    raise DatasetError(f"mask {path} has mode {raw.mode}: expected a palette PNG (VOC) or an RGB rendering of one")


@register_dataset
class VOC(SegmentationDataset):
    """`voc`: VOC 2012 segmentation. Splits train / val / trainval read ImageSets/Segmentation/{split}.txt with
    SegmentationClass; trainaug reads SegmentationClassAug with its list (ImageSets/Segmentation/trainaug.txt or
    train_aug.txt; without one, every SegmentationClassAug mask not in val.txt — the 10,582-image set — and a note says
    so). The root may be the folder holding VOCdevkit, VOCdevkit itself, or VOC2012."""

    id = "voc"
    class_names = VOC_CLASSES
    splits = ("train", "val", "trainval", "trainaug")
    source = ("http://host.robots.ox.ac.uk/pascal/VOC/voc2012/; SegmentationClassAug (trainaug) is converted from SBD, "
              "http://home.bharathh.info/pubs/codes/SBD/download.html")
    licence = "images: Flickr terms of use; see http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
    layout = ("  <root>/VOCdevkit/VOC2012/JPEGImages/*.jpg\n"
              "  <root>/VOCdevkit/VOC2012/SegmentationClass/*.png          (palette PNGs, 255 = boundary)\n"
              "  <root>/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt\n"
              "  <root>/VOCdevkit/VOC2012/SegmentationClassAug/*.png       (for trainaug; list trainaug.txt optional)")
    _aug_lists = ("trainaug.txt", "train_aug.txt")
    colour_masks = True  # RGB renderings; palette PNGs (the devkit's) hold indices and are never off the palette

    @property
    def voc_dir(self) -> Path:
        for d in (self.root / "VOCdevkit" / "VOC2012", self.root / "VOC2012", self.root):
            if (d / "JPEGImages").is_dir():
                return d
        raise DatasetError(f"no JPEGImages folder under {self.root}.\nExpected layout for '{self.id}':\n{self.layout}\n"
                           f"{self.where_to_get()}")

    def available_splits(self) -> list[str]:
        sets = self.voc_dir / "ImageSets" / "Segmentation"
        out = [s for s in ("train", "val", "trainval") if (sets / f"{s}.txt").is_file()]
        return out + (["trainaug"] if (self.voc_dir / "SegmentationClassAug").is_dir() else [])

    def _read_list(self, path: Path) -> list[str]:
        return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]

    def _ids(self) -> tuple[list[str], Path]:
        sets = self.voc_dir / "ImageSets" / "Segmentation"
        if self.split != "trainaug":
            return self._read_list(sets / f"{self.split}.txt"), self.voc_dir / "SegmentationClass"
        aug = self.voc_dir / "SegmentationClassAug"
        for name in self._aug_lists:
            for path in (sets / name, aug.parent / name):
                if path.is_file():
                    self.notes.append(f"trainaug list: {path}")
                    return [Path(i).stem for i in self._read_list(path)], aug
        if not (sets / "val.txt").is_file():
            raise DatasetError(f"trainaug needs a list (trainaug.txt) or {sets / 'val.txt'} to exclude val images")
        val = set(self._read_list(sets / "val.txt"))
        self.notes.append("trainaug list: every SegmentationClassAug mask whose id is not in val.txt")
        return [p.stem for p in aug.glob("*.png") if p.stem not in val], aug

    def _find_samples(self) -> list[Sample]:
        ids, mask_dir = self._ids()
        return self._pair_listed(ids, self.voc_dir / "JPEGImages", mask_dir)

    def decode_mask(self, raw: Image.Image, sample: Sample) -> np.ndarray | ColourLabels:
        return decode_voc(raw, sample.mask)

    def _may_hold_colours(self, sample: Sample) -> bool:
        return is_rgb_file(sample.mask)  # the devkit's palette PNGs are not decoded to learn they hold indices


@register_dataset
class VOCRGB(VOC):
    """`voc-rgb`: VOC targets rendered as RGB images in the VOC palette, as flat pairs `<root>/<name>_image.<ext>` and
    `<root>/<name>_target.png` (the layout of ../shared/data/voc_sample), read as the single split 'all'. Colours are
    matched exactly; (224, 224, 192) is the boundary (ignore); any other colour is off the palette (``off_palette``)."""

    id = "voc-rgb"
    splits = ("all",)
    eval_split = "all"
    train_split = None
    source = ("RGB renderings of VOC 2012 pairs, e.g. the samples of https://github.com/VainF/DeepLabV3Plus-Pytorch; "
              "originals: http://host.robots.ox.ac.uk/pascal/VOC/voc2012/")
    layout = "  <root>/<name>_image.png|jpg   <root>/<name>_target.png   (RGB, VOC palette; split 'all')"

    def available_splits(self) -> list[str]:
        return ["all"] if any(self.root.glob("*_image.*")) else []

    def _find_samples(self) -> list[Sample]:
        images = {p.name[: -len("_image" + p.suffix)]: p for p in self.root.glob("*_image.*")
                  if p.suffix.lower() in (".png", ".jpg", ".jpeg")}
        masks = {p.name[: -len("_target.png")]: p for p in self.root.glob("*_target.png")}
        return self._pair(images, masks, self.root)
