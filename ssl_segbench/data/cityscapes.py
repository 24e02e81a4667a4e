"""Cityscapes in its own layout: the 27-class view of unsupervised work (STEGO, PiCIE) and the official 19 trainIds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .base import Sample, SegmentationDataset, register_dataset
from .labels import apply_lut, build_lut

# (labelId, name, trainId, colour) as in cityscapesScripts' labels.py; license plate (-1, trainId -1) is not drawn into
# labelIds PNGs, and an 8-bit -1 would read as 255, which every view below ignores.
LABELS = (
    (0, "unlabeled", 255, (0, 0, 0)), (1, "ego vehicle", 255, (0, 0, 0)),
    (2, "rectification border", 255, (0, 0, 0)), (3, "out of roi", 255, (0, 0, 0)), (4, "static", 255, (0, 0, 0)),
    (5, "dynamic", 255, (111, 74, 0)), (6, "ground", 255, (81, 0, 81)), (7, "road", 0, (128, 64, 128)),
    (8, "sidewalk", 1, (244, 35, 232)), (9, "parking", 255, (250, 170, 160)),
    (10, "rail track", 255, (230, 150, 140)), (11, "building", 2, (70, 70, 70)), (12, "wall", 3, (102, 102, 156)),
    (13, "fence", 4, (190, 153, 153)), (14, "guard rail", 255, (180, 165, 180)),
    (15, "bridge", 255, (150, 100, 100)), (16, "tunnel", 255, (150, 120, 90)), (17, "pole", 5, (153, 153, 153)),
    (18, "polegroup", 255, (153, 153, 153)), (19, "traffic light", 6, (250, 170, 30)),
    (20, "traffic sign", 7, (220, 220, 0)), (21, "vegetation", 8, (107, 142, 35)),
    (22, "terrain", 9, (152, 251, 152)), (23, "sky", 10, (70, 130, 180)), (24, "person", 11, (220, 20, 60)),
    (25, "rider", 12, (255, 0, 0)), (26, "car", 13, (0, 0, 142)), (27, "truck", 14, (0, 0, 70)),
    (28, "bus", 15, (0, 60, 100)), (29, "caravan", 255, (0, 0, 90)), (30, "trailer", 255, (0, 0, 110)),
    (31, "train", 16, (0, 80, 100)), (32, "motorcycle", 17, (0, 0, 230)), (33, "bicycle", 18, (119, 11, 32)),
)
FIRST_27 = 7  # labelIds 7..33 are the 27 classes
CITYSCAPES27_CLASSES = tuple(name for i, name, _, _ in LABELS if i >= FIRST_27)
CITYSCAPES19_CLASSES = tuple(name for _, name, t, _ in sorted(LABELS, key=lambda r: r[2]) if t != 255)
LABELID_TO_27 = build_lut({i - FIRST_27: (i,) for i, *_ in LABELS if i >= FIRST_27},
                          ignore=[i for i, *_ in LABELS if i < FIRST_27] + [255])
LABELID_TO_19 = build_lut({t: [i for i, _, t2, _ in LABELS if t2 == t] for t in range(len(CITYSCAPES19_CLASSES))},
                          ignore=[i for i, _, t, _ in LABELS if t == 255] + [255])
TRAINID_TO_19 = build_lut({t: (t,) for t in range(len(CITYSCAPES19_CLASSES))}, ignore=(255,))


def labelids_to_27(ids: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
    """labelIds (-1..33) → Cityscapes-27 (labelId − 7 for 7..33, everything else 255)."""
    ids = np.asarray(ids)
    return apply_lut(np.where(ids == -1, 255, ids), LABELID_TO_27, path, "Cityscapes labelIds")


def labelids_to_19(ids: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
    """labelIds (-1..33) → the official trainIds 0..18, 255 for ids without one."""
    ids = np.asarray(ids)
    return apply_lut(np.where(ids == -1, 255, ids), LABELID_TO_19, path, "Cityscapes labelIds")


class _Cityscapes(SegmentationDataset):
    """Shared layout: leftImg8bit/{split}/<city>/<frame>_leftImg8bit.png and gtFine/{split}/<city>/<frame>_gtFine_*."""

    splits = ("train", "val", "test")
    source = "https://www.cityscapes-dataset.com (registration; leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip)"
    licence = "Cityscapes terms of use; see https://www.cityscapes-dataset.com"
    layout = ("  <root>/leftImg8bit/{train,val,test}/<city>/<frame>_leftImg8bit.png\n"
              "  <root>/gtFine/{train,val,test}/<city>/<frame>_gtFine_labelIds.png  (and _labelTrainIds.png if made)")

    def available_splits(self) -> list[str]:
        return [s for s in self.splits if (self.root / "leftImg8bit" / s).is_dir()]

    def _mask_candidates(self, gt_dir: Path, frame: str) -> list[Path]:
        return [gt_dir / f"{frame}_gtFine_labelIds.png"]

    def _find_samples(self) -> list[Sample]:
        image_dir, gt_root = self.root / "leftImg8bit" / self.split, self.root / "gtFine" / self.split
        images, masks = {}, {}
        for p in image_dir.glob("*/*_leftImg8bit.png"):
            frame = p.name[: -len("_leftImg8bit.png")]
            images[frame] = p
            found = [m for m in self._mask_candidates(gt_root / p.parent.name, frame) if m.is_file()]
            if found:
                masks[frame] = found[0]
        return self._pair(images, masks, gt_root)


@register_dataset
class Cityscapes27(_Cityscapes):
    """`cityscapes27`: labelId − 7 for labelIds 7–33, all else ignored; keeps parking, rail track, guard rail, bridge,
    tunnel, polegroup, caravan and trailer (STEGO / PiCIE)."""

    id = "cityscapes27"
    class_names = CITYSCAPES27_CLASSES

    @property
    def palette(self) -> np.ndarray:
        return np.array([c for i, _, _, c in LABELS if i >= FIRST_27], dtype=np.uint8)

    def decode_mask(self, raw: Image.Image, sample: Sample) -> np.ndarray:
        return labelids_to_27(np.asarray(raw), sample.mask)


@register_dataset
class Cityscapes19(_Cityscapes):
    """`cityscapes19`: the official trainIds, read from `*_gtFine_labelTrainIds.png` where it exists, else mapped from
    `*_gtFine_labelIds.png` with the official id → trainId table; 255 ignore."""

    id = "cityscapes19"
    class_names = CITYSCAPES19_CLASSES

    def __init__(self, root, split=None, *, skip_bad: bool = False, resize_masks: bool = False):
        super().__init__(root, split, skip_bad=skip_bad, resize_masks=resize_masks)
        n_train_ids = sum(s.mask.name.endswith("_labelTrainIds.png") for s in self.samples)
        self.notes.append(f"labels: {n_train_ids} of {len(self.samples)} from *_labelTrainIds.png, the others from "
                          "*_labelIds.png through the official id → trainId table")

    @property
    def palette(self) -> np.ndarray:
        return np.array([c for _, _, t, c in sorted(LABELS, key=lambda r: r[2]) if t != 255], dtype=np.uint8)

    def _mask_candidates(self, gt_dir: Path, frame: str) -> list[Path]:
        return [gt_dir / f"{frame}_gtFine_labelTrainIds.png", gt_dir / f"{frame}_gtFine_labelIds.png"]

    def decode_mask(self, raw: Image.Image, sample: Sample) -> np.ndarray:
        if sample.mask.name.endswith("_labelTrainIds.png"):
            return apply_lut(np.asarray(raw), TRAINID_TO_19, sample.mask, "Cityscapes labelTrainIds")
        return labelids_to_19(np.asarray(raw), sample.mask)
