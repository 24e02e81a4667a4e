"""Input transforms: one geometry applied to an image (bicubic, then normalised) and its labels (nearest).

Policies (PROTOCOLS.md §0, the first axis that changes numbers):
- ``shorter``: resize the shorter side to `size`, centre-crop size×size (STEGO / PiCIE at 320);
- ``square``: resize to size×size, aspect ratio lost (Leopart at 448);
- ``pad``: resize the shorter side to `size` keeping the aspect ratio, then zero-pad right/bottom to a multiple of the
  patch size (MaskDistill at 640); padded label pixels are ignore.
Labels are evaluated at the transformed image's resolution. `RandomResizedCropFlip` is the training augmentation of the
linear probe's `augmented` variant (Leopart's RandomResizedCrop + flip), drawn from a caller-seeded generator.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .errors import SegbenchError

if TYPE_CHECKING:  # torch is imported where tensors are made, so `--help` (which reads POLICIES) need not load it
    import torch

POLICIES = ("shorter", "square", "pad")


def normalise(img, mean, std) -> torch.Tensor:
    """RGB image (PIL or uint8 array) → (3, H, W) float32 tensor of (pixel / 255 − mean) / std per channel: the one
    input normalisation of the evaluation transform, the linear probe's crops and maskdistill's crops."""
    import torch

    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise TypeError(f"normalise takes 8-bit RGB pixels, got {a.dtype}")
    # a table of the formula for the 256 values of each channel, in the same float32 arithmetic: identical numbers
    lut = (np.arange(256, dtype=np.float32)[:, None] / 255.0 - np.asarray(mean, dtype=np.float32)) / np.asarray(
        std, dtype=np.float32)
    out = np.empty((3, *a.shape[:2]), dtype=np.float32)
    for c in range(3):
        np.take(lut[:, c], a[..., c], out=out[c])
    return torch.from_numpy(out)


class TransformError(SegbenchError):
    """A resize policy or size that cannot be used; the message says what can."""


@dataclass(frozen=True)
class Transform:
    policy: str = "shorter"
    size: int = 224
    patch_size: int = 16

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise TransformError(f"unknown resize policy {self.policy!r}; use one of {POLICIES}")
        if self.policy != "pad" and self.size % self.patch_size:
            p = self.patch_size
            below, above = self.size // p * p, (self.size // p + 1) * p
            near = f"{below} or {above}" if below > 0 else str(above)  # the nearest positive multiples
            raise TransformError(f"size {self.size} is not a multiple of the patch size {p}: use --size {near}, "
                                 "or --resize pad (it pads to the patch grid)")

    def to_dict(self) -> dict:
        return asdict(self)

    def _resized(self, width: int, height: int) -> tuple[int, int]:
        if self.policy == "square":
            return self.size, self.size
        scale = self.size / min(width, height)
        return max(self.size, round(width * scale)), max(self.size, round(height * scale))

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of the transformed image for an input of `width`×`height`: known before any pixel is read,
        so the cache can be sized up front."""
        if self.policy in ("shorter", "square"):
            return self.size, self.size
        w, h = self._resized(width, height)
        p = self.patch_size
        return math.ceil(h / p) * p, math.ceil(w / p) * p

    def _geometry(self, img: Image.Image, resample) -> Image.Image:
        w, h = self._resized(*img.size)
        img = img.resize((w, h), resample)
        if self.policy == "shorter":
            left, top = (w - self.size) // 2, (h - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        return img

    def image(self, img: Image.Image, mean, std, resample: int = Image.BICUBIC) -> torch.Tensor:
        """PIL RGB → normalised (3, H, W) float tensor, resized with `resample` (bicubic; STEGO's loader uses
        nearest)."""
        import torch

        t = normalise(self._geometry(img, resample), mean, std)
        oh, ow = self.output_size(*img.size)
        if t.shape[1:] != (oh, ow):
            t = torch.nn.functional.pad(t, (0, ow - t.shape[2], 0, oh - t.shape[1]))
        return t

    def labels(self, mask: np.ndarray, ignore_index: int) -> np.ndarray:
        """(H0, W0) class indices → (H, W) at the transformed geometry (nearest; padding = ignore)."""
        im = Image.fromarray(mask.astype(np.int32))
        out = np.asarray(self._geometry(im, Image.NEAREST), dtype=np.int64)
        oh, ow = self.output_size(mask.shape[1], mask.shape[0])
        if out.shape != (oh, ow):
            out = np.pad(out, ((0, oh - out.shape[0]), (0, ow - out.shape[1])), constant_values=ignore_index)
        return out


def five_crop_boxes(width: int, height: int, ratio: float) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of torchvision's five_crop at (int(ratio·H), int(ratio·W)) for a width × height
    image, in its order: top-left, top-right, bottom-left, bottom-right, centre (offsets round half to even, as
    torchvision's center_crop does). STEGO's `crop_type: five` training set (PROTOCOLS.md §11)."""
    ch, cw = int(height * ratio), int(width * ratio)
    if ch < 1 or cw < 1:
        raise TransformError(f"a {width}x{height} image has no {ratio:g} five-crop (a side would be 0 pixels)")
    top, left = round((height - ch) / 2.0), round((width - cw) / 2.0)
    corners = [(0, 0), (width - cw, 0), (0, height - ch), (width - cw, height - ch), (left, top)]
    return [(x, y, x + cw, y + ch) for x, y in corners]


@dataclass(frozen=True)
class RandomResizedCropFlip:
    """Training augmentation of Leopart's linear probe: torchvision's RandomResizedCrop(size, scale, ratio) (area
    fraction from U(scale), log aspect ratio from U(log ratio), 10 tries, else the centre crop at the clamped ratio),
    then a horizontal flip with probability `flip`; the image is resized bilinearly, its labels nearest. Draws come
    from the numpy generator passed in, so a caller that seeds one generator per (seed, epoch, image) gets crops that
    do not depend on batching."""

    size: int
    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5

    def sample(self, rng: np.random.Generator, width: int, height: int) -> tuple[tuple[int, int, int, int], bool]:
        """((left, top, crop width, crop height), flipped) for an image of width × height."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        box = None
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                box = (int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h)
                break
        if box is None:
            in_ratio = width / height
            if in_ratio < self.ratio[0]:
                w, h = width, round(width / self.ratio[0])
            elif in_ratio > self.ratio[1]:
                h, w = height, round(height * self.ratio[1])
            else:
                w, h = width, height
            box = ((width - w) // 2, (height - h) // 2, w, h)
        return box, bool(rng.random() < self.flip)

    def apply(self, img: Image.Image, mask: np.ndarray, box, flipped: bool, mean, std,
              jitter: list[tuple[str, float]] = ()) -> tuple[torch.Tensor, np.ndarray]:
        """(normalised (3, size, size) image, (size, size) int64 labels) of one sampled crop, colour-jittered after
        the crop by `jitter` (`sample_jitter`)."""
        left, top, w, h = box
        region = (left, top, left + w, top + h)
        im = img.crop(region).resize((self.size, self.size), Image.BILINEAR)
        lab = Image.fromarray(mask.astype(np.int32)).crop(region).resize((self.size, self.size), Image.NEAREST)
        if flipped:
            im, lab = im.transpose(Image.FLIP_LEFT_RIGHT), lab.transpose(Image.FLIP_LEFT_RIGHT)
        im = color_jitter(im, jitter)
        return normalise(im, mean, std), np.asarray(lab, dtype=np.int64)


JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def sample_jitter(rng: np.random.Generator, strength: float, p: float) -> list[tuple[str, float]]:
    """torchvision's RandomApply([ColorJitter(op=strength)], p) for brightness, contrast, saturation and hue in that
    order, each applied independently: the (op, factor) pairs drawn (factor from U(1 − s, 1 + s), hue from U(−s, s)).
    Two draws per op whether or not it applies, so the stream does not depend on the outcomes."""
    out = []
    for op in JITTER_OPS:
        apply, u = rng.random() < p, rng.uniform(-strength, strength)
        if apply and strength > 0:
            out.append((op, float(u if op == "hue" else max(0.0, 1.0 + u))))
    return out


def color_jitter(img: Image.Image, ops: list[tuple[str, float]]) -> Image.Image:
    """Apply sampled colour-jitter ops to an RGB image (torchvision's functional adjust_* on PIL images)."""
    if not ops:
        return img
    import torchvision.transforms.functional as TF

    adjust = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
              "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
    for op, factor in ops:
        img = adjust[op](img, factor)
    return img
