"""Sliding-window inference (`sliding.slide_logits`, mmseg's slide mode): whole-image inference when one window covers
the image; otherwise the average, per pixel, of the windows covering it, checked against a hand-built window list."""
from __future__ import annotations

import torch

from ssl_segbench.sliding import slide_logits, windows


def _position_logits(x: torch.Tensor) -> torch.Tensor:
    """A window-dependent stand-in for head logits: two channels from each pixel's values and its place in the window
    (so the same pixel seen from two windows gets two different logits, and averaging shows)."""
    n, _, h, w = x.shape
    yy = torch.arange(h, dtype=x.dtype)[:, None].expand(h, w)
    xx = torch.arange(w, dtype=x.dtype)[None, :].expand(h, w)
    return torch.stack([x[:, 0] * (1 + yy), x[:, 1] - 0.5 * xx], 1)


def test_one_window_is_whole_image_inference():
    img = torch.randn(3, 6, 9)
    whole = _position_logits(img[None])[0]
    assert torch.equal(slide_logits(img, _position_logits, crop=(6, 9), stride=(4, 5)), whole)
    assert torch.equal(slide_logits(img, _position_logits, crop=12, stride=3), whole)  # crop larger than the image


def test_windows_follow_the_edge_aligned_grid():
    # 10 rows, crop 4, stride 3: starts 0, 3, 6 (the last ends at the edge); 7 columns: 0 and 3
    assert windows(10, 7, (4, 4), (3, 3)) == [(0, 4, 0, 4), (0, 4, 3, 7), (3, 7, 0, 4), (3, 7, 3, 7),
                                              (6, 10, 0, 4), (6, 10, 3, 7)]
    # 11 rows, crop 4, stride 3: starts 0, 3, 6, then 7 (moved back so the window ends at row 11)
    assert [w[:2] for w in windows(11, 4, (4, 4), (3, 3))] == [(0, 4), (3, 7), (6, 10), (7, 11)]


def test_overlapping_windows_are_averaged_like_a_brute_force_loop():
    torch.manual_seed(0)
    img = torch.randn(3, 11, 7)
    boxes = [(0, 4, 0, 4), (0, 4, 3, 7), (3, 7, 0, 4), (3, 7, 3, 7), (6, 10, 0, 4), (6, 10, 3, 7),
             (7, 11, 0, 4), (7, 11, 3, 7)]
    total, count = torch.zeros(2, 11, 7), torch.zeros(11, 7)
    for t, b, left, r in boxes:
        total[:, t:b, left:r] += _position_logits(img[None, :, t:b, left:r])[0]
        count[t:b, left:r] += 1
    expected = total / count
    for batch in (1, 3, 16):  # how windows are batched does not change the map
        got = slide_logits(img, _position_logits, crop=4, stride=3, batch_size=batch)
        assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(expected, _position_logits(img[None])[0])  # the windows did change the answer
