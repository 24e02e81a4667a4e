"""Resize policies: image and labels share one geometry; padding is ignore."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ssl_segbench.transforms import Transform, TransformError


def test_shorter_side_resize_and_centre_crop_keeps_labels_aligned():
    mask = np.zeros((192, 256), dtype=np.int64)
    mask[:, 128:] = 2
    mask[:, :128] = 1
    t = Transform("shorter", 224, 16)
    lab = t.labels(mask, 255)
    assert lab.shape == (224, 224) == t.output_size(256, 192)
    # resized width round(256·224/192) = 299, crop offset 37, boundary at 128·224/192 − 37 = 112.3
    assert (lab[:, :112] == 1).all() and (lab[:, 113:] == 2).all()
    img = Image.fromarray(np.where(mask[..., None] == 1, 0, 255).astype(np.uint8).repeat(3, -1))
    x = t.image(img, (0, 0, 0), (1, 1, 1))
    assert x.shape == (3, 224, 224)
    assert float(x[0, :, :110].max()) < 0.05 and float(x[0, :, 115:].min()) > 0.95


def test_square_resize_loses_aspect_ratio():
    t = Transform("square", 448, 16)
    assert t.output_size(500, 300) == (448, 448)
    assert t.labels(np.zeros((300, 500), dtype=np.int64), 255).shape == (448, 448)


def test_pad_to_patch_multiple_marks_padding_ignore():
    t = Transform("pad", 56, 16)
    mask = np.ones((60, 100), dtype=np.int64)
    # shorter side 60 → 56, width round(100·56/60) = 93; padded to 64 × 96
    assert t.output_size(100, 60) == (64, 96)
    lab = t.labels(mask, 255)
    assert lab.shape == (64, 96)
    assert (lab[:56, :93] == 1).all() and (lab[56:] == 255).all() and (lab[:, 93:] == 255).all()
    x = t.image(Image.new("RGB", (100, 60), (255, 255, 255)), (0, 0, 0), (1, 1, 1))
    assert x.shape == (3, 64, 96) and float(x[:, 56:].abs().max()) == 0.0 and float(x[:, :56, :93].min()) == 1.0


def test_size_must_be_patch_multiple():
    with pytest.raises(TransformError, match="multiple of the patch size"):
        Transform("shorter", 225, 16)
