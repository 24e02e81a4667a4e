"""ISPRS Potsdam-3 (IIC / STEGO): 6 ISPRS classes merged into roads & cars, buildings & clutter, trees & vegetation.

Two layouts are read:
- STEGO's: `imgs/<id>.mat` (key `img`, RGB + infrared; the first 3 channels are used), `gt/<id>.mat` (key `gt`) and the
  split lists. Its 6-class order is IIC's: 0 impervious surfaces, 1 building, 2 low vegetation, 3 tree, 4 car,
  5 clutter (IIC's potsdam preparation script), 255 ignore; coarse {0,4} → 0, {1,5} → 1, {2,3} → 2 (STEGO).
- mmsegmentation's (`img_dir/`, `ann_dir/` PNGs from its potsdam converter): 0 = boundary / no label, then 1 impervious
  surfaces, 2 building, 3 low vegetation, 4 tree, 5 car, 6 clutter — the same 6-class order shifted by one, which
  mmsegmentation undoes with reduce_zero_label. ../shared/data/potsdam_sample is in this encoding: its 0 pixels are
  thin outlines around objects, 1 covers the street, 2 the roofs, 5 the cars. Converters that write 0-5 with 255 for
  the boundary exist too: read those with ``reduce_zero_label=False``.
RGB mask PNGs in ISPRS's own colour code (its `5_Labels_all` images: impervious surfaces white, building blue, low
vegetation cyan, tree green, car yellow, clutter red; black = the eroded labels' boundary, ignored) are read by colour;
a colour off that palette is settled by ``off_palette``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from .base import BAD_FILE_FIX, ColourLabels, DatasetError, Sample, SegmentationDataset, is_rgb_file, register_dataset
from .labels import apply_lut, build_lut, decode_colours

POTSDAM3_CLASSES = ("roads and cars", "buildings and clutter", "trees and vegetation")
_COARSE = {0: (0, 4), 1: (1, 5), 2: (2, 3)}  # over the 6-class indices
SIX_TO_3 = build_lut(_COARSE, ignore=(255,))
MMSEG_TO_3 = build_lut({c: [v + 1 for v in six] for c, six in _COARSE.items()}, ignore=(0, 255))
ISPRS_COLOURS = np.array([(255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0),
                          (0, 0, 0)])  # the 6 classes in IIC's order, then the boundary
_ISPRS_VALUES = np.append(SIX_TO_3[:6], 255)
STEGO_SPLITS = {"train": ("labelled_train.txt",), "unlabelled_train": ("unlabelled_train.txt",),
                "val": ("labelled_test.txt",), "train+val": ("labelled_train.txt", "labelled_test.txt"),
                "all": ("all.txt",)}
_UNLABELLED_SPLITS = ("unlabelled_train", "all")  # STEGO reads these without requiring gt


def _loadmat(path: Path, key: str) -> np.ndarray:
    """One array from a .mat file; any read failure (scipy raises many kinds) becomes a DatasetError naming the file."""
    try:
        data = scipy.io.loadmat(path)
    except Exception as e:  # noqa: BLE001 - scipy raises IndexError, OSError, MatReadError, ... for damaged files
        raise DatasetError(f"cannot read {path}: {type(e).__name__}: {e}. " + BAD_FILE_FIX) from e
    if key not in data:
        raise DatasetError(f"{path} has no variable '{key}' (has: {sorted(k for k in data if not k.startswith('_'))})")
    return np.asarray(data[key])


@register_dataset
class Potsdam3(SegmentationDataset):
    """`potsdam3`: Potsdam-3 from STEGO's .mat layout (splits train, unlabelled_train, val, train+val, all; the root may
    be the `potsdam` folder or hold it) or mmsegmentation's PNG layout (splits from img_dir/<split>/, or 'all' for PNGs
    directly in img_dir/)."""

    id = "potsdam3"
    class_names = POTSDAM3_CLASSES
    splits = tuple(STEGO_SPLITS)
    source = ("ISPRS Potsdam, https://www.isprs.org/education/benchmarks/UrbanSemLab/2d-sem-label-potsdam.aspx; "
              "STEGO's .mat copy: https://github.com/mhamilton723/STEGO")
    licence = "ISPRS terms; see https://www.isprs.org/education/benchmarks/UrbanSemLab/2d-sem-label-potsdam.aspx"
    layout = ("  STEGO:  <root>/potsdam/imgs/<id>.mat (img: HxWx4)  <root>/potsdam/gt/<id>.mat (gt: HxW, 0-5, 255)\n"
              "          <root>/potsdam/{labelled_train,unlabelled_train,labelled_test,all}.txt\n"
              "  mmseg:  <root>/img_dir/{train,val}/*.png  <root>/ann_dir/{train,val}/*.png  (0 boundary, 1-6)\n"
              "          or <root>/img_dir/*.png  <root>/ann_dir/*.png  (split 'all')")

    colour_masks = True  # ISPRS's RGB label PNGs

    def __init__(self, root, split=None, *, skip_bad: bool = False, resize_masks: bool = False,
                 off_palette: str = "refuse", reduce_zero_label: bool = True):
        self.reduce_zero_label = reduce_zero_label
        super().__init__(root, split, skip_bad=skip_bad, resize_masks=resize_masks, off_palette=off_palette)
        self.notes.append(f"layout: {'STEGO .mat' if self._stego_dir() else 'mmsegmentation png'}")

    @property
    def palette(self) -> np.ndarray:
        return np.array([(255, 255, 255), (0, 0, 255), (0, 255, 0)], dtype=np.uint8)

    def _stego_dir(self) -> Path | None:
        return next((d for d in (self.root / "potsdam", self.root) if (d / "imgs").is_dir()), None)

    def available_splits(self) -> list[str]:
        stego = self._stego_dir()
        if stego is not None:
            return [s for s, files in STEGO_SPLITS.items() if all((stego / f).is_file() for f in files)]
        img_dir = self.root / "img_dir"
        if not img_dir.is_dir():
            return []
        subdirs = sorted(d.name for d in img_dir.iterdir() if d.is_dir())
        return subdirs or (["all"] if any(img_dir.glob("*.png")) else [])

    def _default_split(self, available: list[str]) -> str:
        return "val" if "val" in available or "all" not in available else "all"

    def _find_samples(self) -> list[Sample]:
        stego = self._stego_dir()
        if stego is None:
            img_dir, ann_dir = self.root / "img_dir", self.root / "ann_dir"
            if self.split != "all":
                img_dir, ann_dir = img_dir / self.split, ann_dir / self.split
            images = {p.stem: p for p in img_dir.glob("*.png")}
            return self._pair(images, {p.stem: p for p in ann_dir.glob("*.png")}, ann_dir)
        ids = [line.strip() for f in STEGO_SPLITS[self.split] for line in (stego / f).read_text().splitlines()
               if line.strip()]
        images = {i: stego / "imgs" / f"{i}.mat" for i in dict.fromkeys(ids)}
        missing = [i for i, p in images.items() if not p.is_file()]
        self._reject([(i, f"listed image {images[i]} does not exist") for i in missing])
        for i in missing:
            del images[i]
        masks = {i: stego / "gt" / f"{i}.mat" for i in images if (stego / "gt" / f"{i}.mat").is_file()}
        if self.split in _UNLABELLED_SPLITS:
            return [Sample(i, p, masks.get(i)) for i, p in images.items()]
        return self._pair(images, masks, stego / "gt")

    # .mat images and masks are not PIL files
    def _mat_rgb(self, path: Path) -> np.ndarray:
        img = _loadmat(path, "img")
        if img.ndim != 3 or img.shape[2] < 3:
            raise DatasetError(f"{path}: 'img' has shape {img.shape}, expected HxWx4 (RGB + infrared)")
        return np.ascontiguousarray(img[..., :3]).astype(np.uint8)

    def load_image(self, i: int) -> Image.Image:
        path = self.samples[i].image
        return Image.fromarray(self._mat_rgb(path)) if path.suffix == ".mat" else super().load_image(i)

    def image_size(self, i: int) -> tuple[int, int]:
        path = self.samples[i].image
        if path.suffix != ".mat":
            return super().image_size(i)
        h, w = self._mat_rgb(path).shape[:2]
        return w, h

    def _read_mask(self, sample: Sample) -> np.ndarray:
        if sample.mask.suffix != ".mat":
            return super()._read_mask(sample)
        gt = _loadmat(sample.mask, "gt")
        if gt.ndim != 2:
            raise DatasetError(f"{sample.mask}: 'gt' has shape {gt.shape}, expected HxW")
        return apply_lut(gt, SIX_TO_3, sample.mask, "Potsdam (STEGO gt: 0-5, 255)")

    def decoding_identity(self) -> dict:
        return {**super().decoding_identity(), "reduce_zero_label": bool(self.reduce_zero_label)}

    def _may_hold_colours(self, sample: Sample) -> bool:
        return sample.mask.suffix != ".mat" and is_rgb_file(sample.mask)

    def decode_mask(self, raw: Image.Image, sample: Sample) -> np.ndarray | ColourLabels:
        if raw.mode in ("RGB", "RGBA"):
            return decode_colours(np.asarray(raw.convert("RGB")), ISPRS_COLOURS, _ISPRS_VALUES)
        if self.reduce_zero_label:
            return apply_lut(np.asarray(raw), MMSEG_TO_3, sample.mask, "Potsdam (mmsegmentation: 0 ignore, 1-6)")
        return apply_lut(np.asarray(raw), SIX_TO_3, sample.mask, "Potsdam (0-5, 255 ignore)")
