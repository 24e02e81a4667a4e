"""linear-dinov2's photometric distortion (mmseg's PhotoMetricDistortion) and the shared input normalisation, against
hand-computed values: each step drawn by a scripted generator, so every branch is chosen by the test."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest

from ssl_segbench.protocols.linear_dinov2 import photometric
from ssl_segbench.transforms import normalise


class Script:
    """A stand-in numpy Generator that returns the test's values in the order the transform draws them."""

    def __init__(self, *values):
        self.values = list(values)

    def integers(self, *_a):
        return self.values.pop(0)

    def uniform(self, *_a):
        return self.values.pop(0)


GREYS = np.array([[[0, 0, 0], [10, 10, 10], [200, 200, 200], [250, 250, 250]]], dtype=np.uint8)  # 1 × 4 pixels


def _grey(im):
    return im[0, :, 0].tolist()


@pytest.mark.parametrize("delta, expected", [(40.6, [40, 50, 240, 255]), (-32.0, [0, 0, 168, 218])])
def test_brightness_adds_then_clips_and_truncates(delta, expected):
    # coins: brightness yes, contrast after (first=0), saturation no, hue no, contrast no
    out = photometric(GREYS, Script(1, delta, 0, 0, 0, 0), "mmseg")
    assert _grey(out) == expected and out.dtype == np.uint8


@pytest.mark.parametrize("first", [1, 0])
def test_contrast_multiplies_then_clips_before_or_after_the_colour_steps(first):
    script = (0, 1, 1, 1.5, 0, 0) if first else (0, 0, 0, 0, 1, 1.5)
    assert _grey(photometric(GREYS, Script(*script), "mmseg")) == [0, 15, 255, 255]
    script = (0, 1, 1, 0.5, 0, 0) if first else (0, 0, 0, 0, 1, 0.5)
    assert _grey(photometric(GREYS, Script(*script), "mmseg")) == [0, 5, 100, 125]


def test_saturation_and_hue_act_on_colour_and_leave_greys_alone():
    red = np.array([[[255, 0, 0]]], dtype=np.uint8)
    # saturation × 0.5: S 255 → 127, so min channel = 255 · (1 − 127/255) = 128 (PIL's 8-bit integer HSV truncates:
    # within 2 of the exact colour)
    out = photometric(red, Script(0, 0, 1, 0.5, 0, 0), "mmseg")[0, 0]
    assert abs(int(out[0]) - 255) <= 2 and abs(int(out[1]) - 128) <= 2 and abs(int(out[2]) - 128) <= 2
    # hue + 9 of 180 steps: 9/180 of the circle = round(12.8) = 13 of PIL's 256 hue levels
    out = photometric(red, Script(0, 0, 0, 1, 9, 0), "mmseg")[0, 0]
    expected = [255 * c for c in colorsys.hsv_to_rgb(13 / 256, 1.0, 1.0)]
    assert np.abs(out.astype(float) - expected).max() <= 2
    # dinov3: the hue turns by U(−0.5, 0.5) of the circle: 0.25 → 64 levels
    out = photometric(red, Script(0, 0, 0, 1, 0.25, 0), "dinov3")[0, 0]
    expected = [255 * c for c in colorsys.hsv_to_rgb(64 / 256, 1.0, 1.0)]
    assert np.abs(out.astype(float) - expected).max() <= 2
    assert _grey(photometric(GREYS, Script(0, 0, 1, 0.5, 1, 9, 0), "mmseg")) == [0, 10, 200, 250]


def test_normalise_matches_the_formula_for_every_8_bit_value():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    v = np.arange(256, dtype=np.uint8)
    img = np.stack([v, v[::-1], np.roll(v, 7)], -1)[None]  # 1 × 256 pixels, every value in every channel
    t = normalise(img, mean, std).numpy()[:, 0]
    for c in range(3):
        expected = (img[0, :, c].astype(np.float64) / 255 - mean[c]) / std[c]
        np.testing.assert_allclose(t[c], expected, rtol=0, atol=2e-6)
    with pytest.raises(TypeError, match="8-bit"):
        normalise(img.astype(np.float32), mean, std)
