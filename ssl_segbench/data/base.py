"""Dataset interface: what every segmentation dataset gives the pipeline.

A dataset is a sorted list of (image, mask) files in one split of a root laid out as its authors distribute it. It knows
its class names, ignore index and palette, decodes masks into class indices, and hashes its file list so a record says
exactly which images produced a number. Images are read lazily, one at a time: nothing holds the whole split in memory.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
from PIL import Image

from ..atomic import WriteError, write_json_atomic
from ..errors import SegbenchError
from ..fingerprint import content_sha256
from ..paths import cache_dir, inside

BAD_FILE_FIX = "Re-download or remove this file, or pass --skip-bad to leave it out."
RESIZE_FIX = ("Re-extract the pair, pass --skip-bad to leave it out, or -o resize_masks=true to resize such masks to "
              "their images (nearest neighbour; the record counts them).")
OFF_PALETTE_CHOICES = ("refuse", "nearest", "ignore")
OFF_PALETTE_FIX = ("Repaint the mask(s) in the palette, or pass -o off_palette=nearest (such a pixel takes the class "
                   "of its nearest palette colour) or -o off_palette=ignore (such pixels are not scored); the record "
                   "counts them.")


class DatasetError(SegbenchError):
    """A dataset root, split or file that cannot be read; the message names the path and the fix."""


class ColourLabels(NamedTuple):
    """A mask decoded by colour: every pixel's class by its nearest palette colour, and where that colour is off the
    palette (`off`, (H, W) bool). The dataset's ``off_palette`` option decides what becomes of the off pixels."""

    labels: np.ndarray
    off: np.ndarray


@dataclass(frozen=True)
class Sample:
    """One image and its mask, as paths; `name` is the stable id used in file lists and saved masks."""

    name: str
    image: Path
    mask: Path | None


def is_rgb_file(path: Path) -> bool:
    """Whether an image file holds RGB(A) colours, read from its header alone."""
    try:
        with Image.open(path) as raw:
            return raw.mode in ("RGB", "RGBA")
    except (OSError, SyntaxError) as e:
        raise DatasetError(f"cannot read mask {path}: {e}. " + BAD_FILE_FIX) from e


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
    - ``source`` and ``licence``: where the dataset is downloaded from (URL or Hub id) and under which terms ("see
      <source>" where the source states none), shown by `list datasets` and in every error about a missing root or
      split (`where_to_get`).
    - ``version``: bumped whenever decoding or file selection changes, so records made before the change stand out.
    - ``colour_masks``: masks are (or may be) RGB images decoded by colour in a palette; such a dataset takes
      ``off_palette`` and its `decode_mask` returns a `ColourLabels` for them. ``off_palette_rule`` says, for messages
      and records, which colours count as off the palette.

    Options every dataset takes:
    - ``skip_bad``: bad input is never skipped silently. By default a missing mask, an unreadable file or an
      undecodable label raises ``DatasetError`` naming the file; with ``skip_bad=True`` (``--skip-bad``) such samples
      are left out (every file is read once when the dataset opens) and counted in ``describe()``.
    - ``resize_masks``: a mask of another size than its image is an error naming both files; with
      ``resize_masks=True`` (``-o resize_masks=true``; SUIM's release has such pairs) it is resized to the image with
      nearest neighbour, and the feature cache's label entry lists the resized samples, which the record reports.
    - ``off_palette`` (datasets with ``colour_masks``): a mask pixel whose colour is off the palette has no defined
      class. ``refuse`` (default): `content_sha256` (so a run, before any cache entry or record is looked up) refuses
      the split naming the masks, their pixel counts and the fix, and loading such a mask is an error naming it;
      ``nearest``: the pixel takes the class of the nearest palette colour; ``ignore``: it is not scored. The choice
      is part of the identity, and `describe()` reports it with the pixels and masks it mapped.

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
    source: ClassVar[str] = ""
    licence: ClassVar[str] = ""
    version: ClassVar[int] = 1
    colour_masks: ClassVar[bool] = False
    off_palette_rule: ClassVar[str] = "a colour that is not exactly one of the palette's"

    def __init__(self, root: str | Path, split: str | None = None, *, skip_bad: bool = False,
                 resize_masks: bool = False, off_palette: str = "refuse"):
        self.root = Path(root).expanduser()
        self.skip_bad = skip_bad
        self.resize_masks = bool(resize_masks)
        if off_palette not in OFF_PALETTE_CHOICES:
            raise DatasetError(f"option off_palette={off_palette!r} of '{self.id}' is not one of "
                               f"{', '.join(OFF_PALETTE_CHOICES)}: use -o off_palette=refuse|nearest|ignore")
        if off_palette != "refuse" and not self.colour_masks:
            raise DatasetError(f"option off_palette={off_palette} does not apply to '{self.id}' here: it decodes no "
                               "mask by colour (a palette is needed for that). Leave the option out.")
        self.off_palette = off_palette
        self._off_pixels: dict[str, int] = {}  # sample name → off-palette pixels, for every colour mask decoded
        self._content_sha256: str | None = None
        self.notes: list[str] = []  # facts a record should carry (e.g. which list file was used)
        self.skipped: list[tuple[str, str]] = []  # (sample name, problem) left out under skip_bad
        if not self.root.is_dir():
            raise DatasetError(f"dataset root {self.root} does not exist.\n"
                               f"Expected layout for '{self.id}':\n{self.layout}\n{self.where_to_get()}")
        available = self.available_splits()
        self.split = split or self._default_split(available)
        if self.split not in available:
            raise DatasetError(
                f"split '{self.split}' of '{self.id}' not found under {self.root}; available here: "
                f"{', '.join(available) or 'none'}.\nExpected layout:\n{self.layout}\n{self.where_to_get()}"
            )
        self.samples: list[Sample] = sorted(self._find_samples(), key=lambda s: s.name)
        if skip_bad:
            self._drop_unreadable()
        if not self.samples:
            skipped = f" ({len(self.skipped)} bad sample(s) skipped)" if self.skipped else ""
            raise DatasetError(f"split '{self.split}' of '{self.id}' under {self.root} has no images{skipped}.\n"
                               f"Expected layout:\n{self.layout}\n{self.where_to_get()}")

    @classmethod
    def where_to_get(cls) -> str:
        """The line every missing-data error ends with: where the dataset is downloaded from, and its terms."""
        return f"Source: {cls.source}\nLicence: {cls.licence}"

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

    def _read_mask(self, sample: Sample) -> np.ndarray | ColourLabels:
        """Open a mask file and decode it, off-palette pixels not yet settled (subclasses whose masks are not images
        override this)."""
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
        mask = self._settle(self._read_mask(s), s)
        size = self.image_size(i)
        if mask.shape[::-1] == size:
            return mask, False
        if not self.resize_masks:
            raise DatasetError(f"mask {s.mask} is {mask.shape[1]}x{mask.shape[0]} but its image {s.image} is "
                               f"{size[0]}x{size[1]}: they do not belong together. " + RESIZE_FIX)
        return np.asarray(Image.fromarray(mask.astype(np.int32)).resize(size, Image.NEAREST), dtype=np.int64), True

    def check_mask(self, i: int) -> str | None:
        """A warning about mask i (already loaded) that decoding tolerates but a user should see (`datasets check`):
        off-palette pixels that ``off_palette`` mapped; or None."""
        n = self._off_pixels.get(self.samples[i].name, 0)
        if not n:
            return None
        how = "given the class of the nearest palette colour" if self.off_palette == "nearest" else "ignored"
        return (f"{n} pixel(s) off the palette ({self.off_palette_rule}) were {how} (off_palette="
                f"{self.off_palette}). Check the mask, or re-export it without resampling.")

    # --- off-palette colours ------------------------------------------------------------------------------------
    def _settle(self, decoded: np.ndarray | ColourLabels, sample: Sample) -> np.ndarray:
        """Class indices from a decoded mask: a colour mask's off-palette pixels are counted, then refused, kept at
        the nearest colour's class or set to the ignore index, as ``off_palette`` says."""
        if not isinstance(decoded, ColourLabels):
            return decoded
        n = int(decoded.off.sum())
        self._off_pixels[sample.name] = n
        if not n or self.off_palette == "nearest":
            return decoded.labels
        if self.off_palette == "ignore":
            return np.where(decoded.off, self.ignore_index, decoded.labels)
        raise DatasetError(f"mask {sample.mask} has {n} pixel(s) ({100 * n / decoded.off.size:.2f} %) off the "
                           f"'{self.id}' palette ({self.off_palette_rule}). " + OFF_PALETTE_FIX)

    def _may_hold_colours(self, sample: Sample) -> bool:
        """Whether the mask of `sample` may be decoded by colour (a loader whose files say so in their header, such
        as palette-mode PNGs, overrides this to spare reading them)."""
        return self.colour_masks

    def off_palette_pixels(self, digest: str | None = None) -> dict[str, int]:
        """{sample name: off-palette pixels}, in sample order, for every mask of the split that has any. Decoding
        every mask of a large split takes seconds, so the answer is remembered in the cache under the split's content
        digest (`digest`, default `content_sha256()`): an unchanged split is decoded for this once per machine."""
        memo = inside(cache_dir(), Path("off_palette") / f"{digest or self.content_sha256()}.json")
        try:
            doc = json.loads(memo.read_text())
            found = doc["off_pixels"]
            if doc["rule"] == self.off_palette_rule and all(isinstance(n, int) for n in found.values()):
                return found
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        for s in self.samples:
            if s.mask is not None and s.name not in self._off_pixels and self._may_hold_colours(s):
                decoded = self._read_mask(s)
                self._off_pixels[s.name] = int(decoded.off.sum()) if isinstance(decoded, ColourLabels) else 0
        found = {s.name: self._off_pixels[s.name] for s in self.samples if self._off_pixels.get(s.name)}
        with contextlib.suppress(WriteError):  # a read-only cache only loses the shortcut
            write_json_atomic(memo, {"rule": self.off_palette_rule, "off_pixels": found})
        return found

    def _require_on_palette(self, digest: str) -> None:
        """Under ``off_palette=refuse``, refuse a split (content digest `digest`) whose masks have off-palette pixels,
        naming the first masks, their counts and how many in all, and the fix."""
        if self.off_palette != "refuse" or not self.colour_masks:
            return
        found = self.off_palette_pixels(digest)
        if found:
            paths = {s.name: s.mask for s in self.samples}
            shown = ", ".join(f"{paths[name]} ({n} pixels)" for name, n in list(found.items())[:5])
            more = f" and {len(found) - 5} more" if len(found) > 5 else ""
            raise DatasetError(f"{len(found)} mask(s) of '{self.id}' split '{self.split}' under {self.root} have "
                               f"{sum(found.values())} pixel(s) off the palette ({self.off_palette_rule}), which "
                               f"have no class: {shown}{more}. " + OFF_PALETTE_FIX)

    # --- identity -------------------------------------------------------------------------------------------------
    def decoding_identity(self) -> dict:
        """The options that change how files become labels; part of `content_sha256`. ``off_palette`` appears only
        when it maps pixels: under the default a split decodes as it did before the option existed, or is refused."""
        return {"resize_masks": self.resize_masks,
                **({"off_palette": self.off_palette} if self.off_palette != "refuse" else {})}

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
        how unchanged files are not read twice). A split refused by ``off_palette`` has none (see
        `_require_on_palette`)."""
        if self._content_sha256 is None:
            digest = self._digest_content()
            self._require_on_palette(digest)
            self._content_sha256 = digest
        return self._content_sha256

    def _digest_content(self) -> str:
        """The content digest `content_sha256` returns, computed (datasets not made of files override this)."""
        header = {"id": self.id, "version": self.version, "split": self.split, "decoding": self.decoding_identity()}
        files: list[tuple[str, Path | None]] = []
        for s in self.samples:
            files.append((f"{s.name}|image|{self._rel(s.image)}", s.image))
            files.append((f"{s.name}|mask|{self._rel(s.mask) if s.mask else '-'}", s.mask))
        files += [(f"identity|{label}", p) for label, p in self.identity_files()]
        try:
            return content_sha256(header, files, self.root, f"{self.id}/{self.split}")
        except OSError as e:
            raise DatasetError(f"cannot read a file of '{self.id}' split '{self.split}' under {self.root} to "
                               f"fingerprint it: {e}") from e

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
            **({"off_palette": self.describe_off_palette()} if self.colour_masks else {}),
        }

    def describe_off_palette(self) -> dict:
        """The ``off_palette`` choice with what it mapped: pixels and masks (names)."""
        found = self.off_palette_pixels()
        return {"policy": self.off_palette, "rule": self.off_palette_rule, "pixels": sum(found.values()),
                "n_masks": len(found), "masks": list(found)}


# dataset id → loader class; each dataset module registers its class (data/__init__.py discovers the modules)
from ..plugins import PluginError, Registry  # noqa: E402  (here with the registry it makes)

HF_PREFIX = "hf:"  # `hf:<org>/<name>` opens a Hugging Face dataset (data/hf.py), which is not registered
DATASETS = Registry("dataset", "id", "register_dataset", DatasetError, "ssl-segbench list datasets",
                    hint=f"; or {HF_PREFIX}<org>/<name> for a Hugging Face dataset")


def register_dataset(cls: type[SegmentationDataset]) -> type[SegmentationDataset]:
    """Class decorator: make a dataset available under its ``id``; it must state where users get it and its terms."""
    if not cls.source or not cls.licence:
        raise PluginError(f"dataset {cls.id!r} ({cls.__module__}) states no source or licence: set the class "
                          "attributes source (where users download it) and licence (its terms)")
    return DATASETS.register(cls)
