"""Dataset interface: what every segmentation dataset gives the pipeline.

A dataset is a sorted list of (image, mask) files in one split of a root laid out as its authors distribute it. It knows
its class names, ignore index and palette, decodes masks into class indices, and hashes its file list so a record says
exactly which images produced a number. Images are read lazily, one at a time: nothing holds the whole split in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from ..errors import SegbenchError

BAD_FILE_FIX = "Re-download or remove this file, or pass --skip-bad to leave it out."
RESIZE_FIX = ("Re-extract the pair, pass --skip-bad to leave it out, or -o resize_masks=true to resize such masks to "
              "their images (nearest neighbour; the record counts them).")


class DatasetError(SegbenchError):
    """A dataset root, split or file that cannot be read; the message names the path and the fix."""


@dataclass(frozen=True)
class Sample:
    """One image and its mask, as paths; `name` is the stable id used in file lists and saved masks."""

    name: str
    image: Path
    mask: Path | None


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard PASCAL VOC bit-interleaved colour map, (n, 3) uint8; also the fallback palette for any dataset."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


class SegmentationDataset:
    """Base class. Subclasses set the class attributes and implement `_find_samples` and `decode_mask`.

    Class attributes
    - ``id``: the dataset id used on the command line and in records.
    - ``class_names``: one name per class index 0..C-1.
    - ``ignore_index``: label value that is never scored.
    - ``splits``: the split names this dataset knows; ``eval_split`` / ``train_split`` are the defaults the protocols
      use.
    - ``layout``: the expected on-disk layout, shown in every error about a missing or malformed root.
    - ``version``: bumped whenever decoding or file selection changes, so records made before the change stand out.

    Options every dataset takes:
    - ``skip_bad``: bad input is never skipped silently. By default a missing mask, an unreadable file or an
      undecodable label raises ``DatasetError`` naming the file; with ``skip_bad=True`` (``--skip-bad``) such samples
      are left out (every file is read once when the dataset opens) and counted in ``describe()``.
    - ``resize_masks``: a mask of another size than its image is an error naming both files; with
      ``resize_masks=True`` (``-o resize_masks=true``; SUIM's release has such pairs) it is resized to the image with
      nearest neighbour, and the feature cache's label entry lists the resized samples, which the record reports.

    Identity: `content_sha256()` covers the bytes of every image and mask (and of files that change decoding, such as
    a classes file), the dataset id, version, split and decoding options: any changed file changes it.
    """

    id: ClassVar[str] = ""
    class_names: ClassVar[tuple[str, ...]] = ()
    ignore_index: ClassVar[int] = 255
    splits: ClassVar[tuple[str, ...]] = ()
    eval_split: ClassVar[str] = "val"
    train_split: ClassVar[str | None] = "train"
    layout: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __init__(self, root: str | Path, split: str | None = None, *, skip_bad: bool = False,
                 resize_masks: bool = False):
        self.root = Path(root).expanduser()
        self.skip_bad = skip_bad
        self.resize_masks = bool(resize_masks)
        self._content_sha256: str | None = None
        self.notes: list[str] = []  # facts a record should carry (e.g. which list file was used)
        self.skipped: list[tuple[str, str]] = []  # (sample name, problem) left out under skip_bad
        if not self.root.is_dir():
            raise DatasetError(f"dataset root {self.root} does not exist.\n"
                               f"Expected layout for '{self.id}':\n{self.layout}")
        available = self.available_splits()
        self.split = split or self._default_split(available)
        if self.split not in available:
            raise DatasetError(
                f"split '{self.split}' of '{self.id}' not found under {self.root}; available here: "
                f"{', '.join(available) or 'none'}.\nExpected layout:\n{self.layout}"
            )
        self.samples: list[Sample] = sorted(self._find_samples(), key=lambda s: s.name)
        if skip_bad:
            self._drop_unreadable()
        if not self.samples:
            skipped = f" ({len(self.skipped)} bad sample(s) skipped)" if self.skipped else ""
            raise DatasetError(f"split '{self.split}' of '{self.id}' under {self.root} has no images{skipped}.\n"
                               f"Expected layout:\n{self.layout}")

    # --- to implement -------------------------------------------------------------------------------------------
    def available_splits(self) -> list[str]:
        """Splits present under this root (default: all known splits)."""
        return list(self.splits)

    def _default_split(self, available: list[str]) -> str:
        """The split opened when none is asked for (default: ``eval_split``)."""
        return self.eval_split

    def _find_samples(self) -> list[Sample]:
        raise NotImplementedError

    def decode_mask(self, raw: Image.Image, sample: Sample) -> np.ndarray:
        """Mask file → (H, W) int64 class indices in 0..C-1 or ``ignore_index``."""
        raise NotImplementedError

    # --- helpers for subclasses ---------------------------------------------------------------------------------
    def _reject(self, problems: list[tuple[str, str]]) -> None:
        """Bad samples found while listing a split: raise naming them, or record them under skip_bad."""
        if not problems:
            return
        if not self.skip_bad:
            shown = "\n  ".join(msg for _, msg in problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise DatasetError(f"{len(problems)} bad sample(s) in '{self.id}' split '{self.split}' under {self.root}:\n"
                               f"  {shown}{more}\nFix or remove these files, or pass --skip-bad to leave them out.")
        self.skipped.extend(problems)

    def _pair(self, images: dict[str, Path], masks: dict[str, Path], mask_dir: Path) -> list[Sample]:
        """Samples for the images whose mask (same name) exists; an image without one is rejected."""
        self._reject([(n, f"image {p} has no mask in {mask_dir}") for n, p in sorted(images.items()) if n not in masks])
        return [Sample(n, p, masks[n]) for n, p in images.items() if n in masks]

    def _pair_listed(self, ids: list[str], image_dir: Path, mask_dir: Path) -> list[Sample]:
        """Samples for ids from a list file: `<image_dir>/<id>.jpg` with `<mask_dir>/<id>.png`; a listed image that does
        not exist, or has no mask, is rejected."""
        images = {i: image_dir / f"{i}.jpg" for i in ids}
        missing = [i for i in ids if not images[i].is_file()]
        self._reject([(i, f"listed image {images[i]} does not exist") for i in missing])
        for i in missing:
            del images[i]
        masks = {i: mask_dir / f"{i}.png" for i in images if (mask_dir / f"{i}.png").is_file()}
        return self._pair(images, masks, mask_dir)

    def _drop_unreadable(self) -> None:
        """skip_bad: read every image and mask once and leave out those that fail to load or decode."""
        bad = set()
        for i, s in enumerate(self.samples):
            try:
                self.load_image(i)
                if s.mask is not None:
                    self.load_mask(i)
            except DatasetError as e:
                bad.add(i)
                self.skipped.append((s.name, str(e)))
        self.samples = [s for i, s in enumerate(self.samples) if i not in bad]

    def _read_mask(self, sample: Sample) -> np.ndarray:
        """Open a mask file and decode it (subclasses whose masks are not images override this)."""
        try:
            with Image.open(sample.mask) as raw:
                raw.load()
                return self.decode_mask(raw, sample)
        except (OSError, SyntaxError) as e:
            raise DatasetError(f"cannot read mask {sample.mask}: {e}. " + BAD_FILE_FIX) from e

    # --- shared behaviour ---------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def palette(self) -> np.ndarray:
        """(C, 3) uint8 colours for visualising label maps."""
        return voc_palette(max(self.num_classes, 1))[: self.num_classes]

    def __len__(self) -> int:
        return len(self.samples)

    def image_size(self, i: int) -> tuple[int, int]:
        """(width, height) of image i, read from the file header only."""
        try:
            with Image.open(self.samples[i].image) as im:
                return im.size
        except (OSError, SyntaxError) as e:
            raise DatasetError(f"cannot read image {self.samples[i].image}: {e}. " + BAD_FILE_FIX) from e

    def load_image(self, i: int) -> Image.Image:
        s = self.samples[i]
        try:
            with Image.open(s.image) as im:
                return im.convert("RGB")
        except (OSError, SyntaxError) as e:
            raise DatasetError(f"cannot read image {s.image}: {e}. " + BAD_FILE_FIX) from e

    def load_mask(self, i: int) -> np.ndarray:
        """Decoded mask of image i at the image's size (see ``resize_masks`` for a mask of another size)."""
        return self.load_mask_checked(i)[0]

    def load_mask_checked(self, i: int) -> tuple[np.ndarray, bool]:
        """(decoded mask of image i at the image's size, whether it had to be resized to get there)."""
        s = self.samples[i]
        if s.mask is None:
            raise DatasetError(f"image {s.image} has no mask in '{self.id}' split '{self.split}'.")
        mask = self._read_mask(s)
        size = self.image_size(i)
        if mask.shape[::-1] == size:
            return mask, False
        if not self.resize_masks:
            raise DatasetError(f"mask {s.mask} is {mask.shape[1]}x{mask.shape[0]} but its image {s.image} is "
                               f"{size[0]}x{size[1]}: they do not belong together. " + RESIZE_FIX)
        return np.asarray(Image.fromarray(mask.astype(np.int32)).resize(size, Image.NEAREST), dtype=np.int64), True

    def check_mask(self, i: int) -> str | None:
        """A warning about mask i that decoding tolerates but a user should see (`datasets check`), or None."""
        return None

    # --- identity -------------------------------------------------------------------------------------------------
    def decoding_identity(self) -> dict:
        """The options that change how files become labels; part of `content_sha256`."""
        return {"resize_masks": self.resize_masks}

    def identity_files(self) -> list[tuple[str, Path]]:
        """Files besides images and masks whose content changes the labels (e.g. a classes file)."""
        return []

    def _rel(self, p: Path) -> str:
        try:
            return p.relative_to(self.root).as_posix()
        except ValueError:
            return p.name

    def content_sha256(self) -> str:
        """sha256 over the dataset id, version, split, decoding options and the bytes of every image, mask and
        identity file, in sample order: equal values mean the same data decoded the same way (see fingerprint.py for
        how unchanged files are not read twice)."""
        if self._content_sha256 is None:
            from ..fingerprint import content_sha256

            header = {"id": self.id, "version": self.version, "split": self.split,
                      "decoding": self.decoding_identity()}
            files: list[tuple[str, Path | None]] = []
            for s in self.samples:
                files.append((f"{s.name}|image|{self._rel(s.image)}", s.image))
                files.append((f"{s.name}|mask|{self._rel(s.mask) if s.mask else '-'}", s.mask))
            files += [(f"identity|{label}", p) for label, p in self.identity_files()]
            try:
                self._content_sha256 = content_sha256(header, files, self.root, f"{self.id}/{self.split}")
            except OSError as e:
                raise DatasetError(f"cannot read a file of '{self.id}' split '{self.split}' under {self.root} to "
                                   f"fingerprint it: {e}") from e
        return self._content_sha256

    def describe(self) -> dict:
        """What a record stores about the images behind a number."""
        return {
            "id": self.id,
            "version": self.version,
            "split": self.split,
            "root": str(self.root),
            "n_images": len(self),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "ignore_index": self.ignore_index,
            "content_sha256": self.content_sha256(),
            "resize_masks": self.resize_masks,
            "n_skipped": len(self.skipped),
            "skipped": [name for name, _ in self.skipped],
            "notes": list(self.notes),
        }
