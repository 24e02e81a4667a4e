"""Input transforms: one geometry applied to an image (bicubic, then normalised) and its labels (nearest).

Policies (PROTOCOLS.md §0, the first axis that changes numbers):
- ``shorter``: resize the shorter side to `size`, centre-crop size×size (STEGO / PiCIE at 320);
- ``square``: resize to size×size, aspect ratio lost (Leopart at 448);
- ``pad``: resize the shorter side to `size` keeping the aspect ratio, then zero-pad right/bottom to a multiple of the
  patch size (MaskDistill at 640); padded label pixels are ignore.
Labels are evaluated at the transformed image's resolution.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

POLICIES = ("shorter", "square", "pad")


@dataclass(frozen=True)
class Transform:
    policy: str = "shorter"
    size: int = 224
    patch_size: int = 16

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown resize policy {self.policy!r}; use one of {POLICIES}")
        if self.policy != "pad" and self.size % self.patch_size:
            raise ValueError(f"size {self.size} is not a multiple of the patch size {self.patch_size}: "
                             f"use e.g. {self.size // self.patch_size * self.patch_size}")

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

    def image(self, img: Image.Image, mean, std) -> torch.Tensor:
        """PIL RGB → normalised (3, H, W) float tensor."""
        x = np.asarray(self._geometry(img, Image.BICUBIC), dtype=np.float32) / 255.0
        x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
        t = torch.from_numpy(x.transpose(2, 0, 1).copy())
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
