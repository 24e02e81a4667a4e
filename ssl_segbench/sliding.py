"""Sliding-window inference, the one implementation (PROTOCOLS.md §10 A3): mmseg's `slide` mode, which DINOv2's and
DINOv3's segmentation evaluations use (crop 512, stride 341).

Windows of `crop` pixels start every `stride` pixels along each axis; the last window of an axis is moved back to end
at the image edge (so every window has the full crop size, or the image's size where the image is smaller). Each
window's logits (at the window's size) are summed into the full map and every pixel is divided by the number of
windows covering it. When one window covers the image this is whole-image inference.
"""
from __future__ import annotations

from typing import Callable

import torch


def _starts(length: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) of the windows along one axis of `length` pixels."""
    n = max(length - crop + stride - 1, 0) // stride + 1
    out = []
    for k in range(n):
        end = min(k * stride + crop, length)
        out.append((max(end - crop, 0), end))
    return out


def windows(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of every window over a height × width image, rows first."""
    return [(t, b, left, r) for t, b in _starts(height, crop[0], stride[0])
            for left, r in _starts(width, crop[1], stride[1])]


def slide_logits(image: torch.Tensor, logits_of: Callable[[torch.Tensor], torch.Tensor], crop: int | tuple[int, int],
                 stride: int | tuple[int, int], batch_size: int = 16) -> torch.Tensor:
    """(3, H, W) image → (C, H, W) logits averaged over the sliding windows (module docstring). `logits_of` maps a
    batch of windows (N, 3, h, w) to their (N, C, h, w) logits at the window size; windows go to it `batch_size` at a
    time (all of one size, so one backbone call per batch)."""
    crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
    stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if min(*crop, *stride) < 1:
        raise ValueError(f"sliding windows need a positive crop and stride, got crop {crop}, stride {stride}")
    _, height, width = image.shape
    boxes = windows(height, width, crop, stride)
    total, count = None, torch.zeros(height, width, device=image.device)
    for b in range(0, len(boxes), batch_size):
        chunk = boxes[b: b + batch_size]
        out = logits_of(torch.stack([image[:, t:bt, left:r] for t, bt, left, r in chunk]))
        if total is None:
            total = torch.zeros(out.shape[1], height, width, dtype=out.dtype, device=out.device)
            count = count.to(out.device)
        for (t, bt, left, r), logits in zip(chunk, out):
            total[:, t:bt, left:r] += logits
            count[t:bt, left:r] += 1
    return total / count
