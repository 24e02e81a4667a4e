"""`folder`: the user's own data. images/ and masks/ (integer or palette masks) plus a classes file.

Layout: either `<root>/{images,masks}` (split 'all') or `<root>/<split>/{images,masks}` for each split, and
`<root>/classes.yaml` (or .yml / .json; or any file given as ``classes=PATH``) with `names: [...]`, optional
`ignore_index` (default 255) and optional `palette: [[r,g,b], ...]` (then RGB masks are decoded by exact colour; an
unknown colour is refused unless ``off_palette`` maps it). Integer masks (8/16-bit grey or palette-mode PNGs) carry
class indices directly.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .. import yamlload
from .base import ColourLabels, DatasetError, Sample, SegmentationDataset, is_rgb_file, register_dataset
from .labels import decode_colours

_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CLASSES_FILES = ("classes.yaml", "classes.yml", "classes.json")


def find_classes_file(root: Path) -> Path | None:
    """The classes file directly under `root`, if any."""
    return next((root / n for n in CLASSES_FILES if (root / n).is_file()), None)


def read_classes_file(path: Path) -> tuple[tuple[str, ...], int, np.ndarray | None]:
    """(class names, ignore index, palette or None) from a YAML / JSON classes file."""
    try:
        spec = json.loads(path.read_text()) if path.suffix == ".json" else yamlload.load(path.read_text(), str(path))
    except (OSError, json.JSONDecodeError, yamlload.YAMLError) as e:
        raise DatasetError(f"cannot read classes file {path}: {e}") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("names"), list) or not spec["names"]:
        raise DatasetError(f"{path}: needs a non-empty list 'names' of class names")
    unknown = set(spec) - {"names", "ignore_index", "palette"}
    if unknown:
        raise DatasetError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: names, ignore_index, palette")
    names = tuple(str(n) for n in spec["names"])
    ignore_index = int(spec.get("ignore_index", 255))
    if 0 <= ignore_index < len(names):
        raise DatasetError(f"{path}: ignore_index {ignore_index} is also a class index (0..{len(names) - 1})")
    palette = None
    if spec.get("palette") is not None:
        pal = np.asarray(spec["palette"], dtype=np.int64)
        if pal.shape != (len(names), 3) or pal.min() < 0 or pal.max() > 255:
            raise DatasetError(f"{path}: palette must be one [r, g, b] (0-255) per class name")
        palette = pal.astype(np.uint8)
    return names, ignore_index, palette


def decode_user_mask(raw: Image.Image | np.ndarray, num_classes: int, ignore_index: int, palette: np.ndarray | None,
                     path: str | Path) -> np.ndarray | ColourLabels:
    """Integer mask (grey / palette-mode / 2-D array) → indices checked against 0..C-1 and ignore; an RGB mask is
    decoded by colour when a palette is given (`ColourLabels`: the dataset's off_palette settles unknown colours)."""
    if isinstance(raw, Image.Image) and raw.mode in ("RGB", "RGBA"):
        if palette is None:
            raise DatasetError(f"mask {path} is RGB: give a palette in the classes file to decode colours, or store "
                               "integer labels (grey or palette-mode PNG)")
        return decode_colours(np.asarray(raw.convert("RGB")), palette, np.arange(num_classes))
    if isinstance(raw, Image.Image) and raw.mode not in ("L", "P", "I", "I;16"):
        raise DatasetError(f"mask {path} has mode {raw.mode}: expected integer labels (L/P/I PNG) or RGB with "
                           "a palette")
    label = np.asarray(raw).astype(np.int64)
    if label.ndim != 2:
        raise DatasetError(f"mask {path} has shape {label.shape}: expected a 2-D label map")
    bad = ((label < 0) | (label >= num_classes)) & (label != ignore_index)
    if bad.any():
        raise DatasetError(f"mask {path} has label values {np.unique(label[bad])[:10].tolist()} outside "
                           f"0..{num_classes - 1} and ignore {ignore_index}")
    return label


@register_dataset
class Folder(SegmentationDataset):
    id = "folder"
    eval_split = "all"
    train_split = None
    source = "your own files"
    licence = "yours"
    layout = ("  <root>/classes.yaml  (names: [...], ignore_index: 255, palette: [[r,g,b], ...] optional)\n"
              "  <root>/images/*.png|jpg  <root>/masks/*.png   (split 'all')\n"
              "  or <root>/<split>/images, <root>/<split>/masks for each split")

    colour_masks = True  # with a palette in the classes file (then per dataset: see __init__)

    def __init__(self, root, split=None, *, skip_bad: bool = False, resize_masks: bool = False,
                 off_palette: str = "refuse", classes: str | Path | None = None):
        root = Path(root).expanduser()
        path = Path(classes).expanduser() if classes is not None else find_classes_file(root)
        if path is None:
            problem = f"no classes.yaml or classes.json in {root} (or pass classes=PATH)" if root.is_dir() \
                else f"dataset root {root} does not exist"
            raise DatasetError(f"{problem}.\nExpected layout for 'folder':\n{self.layout}")
        self.class_names, self.ignore_index, self._palette = read_classes_file(path)
        self.classes_file = path
        self.colour_masks = self._palette is not None
        super().__init__(root, split, skip_bad=skip_bad, resize_masks=resize_masks, off_palette=off_palette)
        self.notes.append(f"classes file: {path}")

    def available_splits(self) -> list[str]:
        if (self.root / "images").is_dir():
            return ["all"]
        return sorted(d.name for d in self.root.iterdir() if (d / "images").is_dir())

    def _default_split(self, available: list[str]) -> str:
        return next((s for s in ("val", "all") if s in available), available[0] if available else "all")

    @property
    def palette(self) -> np.ndarray:
        return self._palette if self._palette is not None else super().palette

    def identity_files(self) -> list[tuple[str, Path]]:
        return [("classes file", self.classes_file)]

    def _find_samples(self) -> list[Sample]:
        d = self.root if self.split == "all" else self.root / self.split
        masks = {p.stem: p for p in (d / "masks").glob("*") if p.suffix.lower() in _EXTS} \
            if (d / "masks").is_dir() else {}
        images = {p.stem: p for p in (d / "images").glob("*") if p.suffix.lower() in _EXTS}
        return self._pair(images, masks, d / "masks")

    def _may_hold_colours(self, sample: Sample) -> bool:
        return self.colour_masks and is_rgb_file(sample.mask)

    def decode_mask(self, raw: Image.Image, sample: Sample) -> np.ndarray | ColourLabels:
        return decode_user_mask(raw, self.num_classes, self.ignore_index, self._palette, sample.mask)
