"""Scoring split in two: the confusion accumulator (metrics.ConfusionAccumulator: update / compute / per-image
statistics) against a per-pixel count, and the prediction stream (protocols.base.Predictions) against one-image-at-a-
time scoring and, with the CRF on, against crf.refine_scores called by hand; the CRF setting travels in an explicit
Scoring, and a crf=true run that never refined anything through the stream is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from stores import feature_set

from ssl_segbench.crf import CRFParams, refine_scores
from ssl_segbench.metrics import ConfusionAccumulator
from ssl_segbench.protocols.base import (
    Context,
    Predictions,
    Protocol,
    ProtocolError,
    ProtocolResult,
    Scoring,
    count_confusions,
)


def _per_pixel(gt: np.ndarray, pred: np.ndarray, c: int, k: int, ignore: int) -> np.ndarray:
    """The reference: a Python loop over pixels."""
    out = np.zeros((c, k), np.int64)
    for g, p in zip(gt.ravel().tolist(), pred.ravel().tolist()):
        if g != ignore:
            out[g, p] += 1
    return out


@pytest.mark.parametrize("gt_dtype", [np.int64, np.uint8])  # label stores hold uint8 maps
def test_accumulator_equals_a_per_pixel_count_and_its_images_sum_to_it(gt_dtype):
    rng = np.random.default_rng(0)
    c, k, ignore = 4, 6, 255
    acc = ConfusionAccumulator(c, k, ignore, per_image=True)
    expected, images = np.zeros((c, k), np.int64), []
    for b, h, w in [(3, 5, 7), (1, 9, 4), (2, 5, 7)]:  # batches of different sizes and shapes
        gt = rng.integers(0, c, size=(b, h, w))
        gt[rng.random(gt.shape) < 0.2] = ignore
        pred = rng.integers(0, k, size=(b, h, w))
        acc.update(torch.from_numpy(gt.astype(gt_dtype)), torch.from_numpy(pred))
        for i in range(b):
            images.append(_per_pixel(gt[i], pred[i], c, k, ignore))
            expected += images[-1]
    assert expected.sum() < 66 + 36 + 70  # ignore pixels were planted and left out
    np.testing.assert_array_equal(acc.compute(), expected)
    assert len(acc.images) == len(images) == 6
    dense = []
    for (idx, counts), ref in zip(acc.images, images):  # metrics.sparse form, in update order
        dense.append(np.bincount(idx, counts, minlength=c * k).reshape(c, k))
        np.testing.assert_array_equal(dense[-1], ref)
    np.testing.assert_array_equal(np.sum(dense, 0), acc.compute())
    assert ConfusionAccumulator(c, k, ignore).images is None  # kept only when asked


@pytest.mark.parametrize("gt,pred,message", [
    ([[[0, 4]]], [[[0, 0]]], r"ground-truth labels outside 0\.\.3 \(ignore 255\)"),
    ([[[0, -1]]], [[[0, 0]]], r"ground-truth labels outside"),
    ([[[0, 255]]], [[[0, 6]]], r"predicted labels outside 0\.\.5"),  # even under an ignore pixel
    ([[[0, 1]]], [[[0, 1, 2]]], r"ground truth is \(1, 1, 2\) but prediction is \(1, 1, 3\)"),
])
def test_accumulator_refuses_labels_outside_the_range(gt, pred, message):
    acc = ConfusionAccumulator(4, 6, 255)
    with pytest.raises(ValueError, match=message):
        acc.update(np.array(gt), np.array(pred))
    assert acc.compute().sum() == 0


def _mixed_store(tmp_path, n_channels=5):
    """Token grids of three shapes interleaved (batches break on shape), labels with ignore pixels."""
    rng = np.random.default_rng(1)
    grids = [(3, 4), (3, 4), (3, 4), (5, 2), (3, 4), (4, 4), (4, 4)]
    tokens = [rng.normal(size=(h, w, n_channels)).astype(np.float16).astype(np.float32) for h, w in grids]
    labels = [rng.integers(0, 3, size=(4 * h, 3 * w)) for h, w in grids]
    for lab in labels:
        lab[rng.random(lab.shape) < 0.1] = 255
    return feature_set(tmp_path / "fs", tokens, labels)


def _channels(x: torch.Tensor) -> torch.Tensor:
    """A scoring function whose scores of an image do not depend on the rest of its batch: the tokens themselves."""
    return x.permute(0, 3, 1, 2)


def _shifted(x: torch.Tensor) -> torch.Tensor:
    return torch.roll(x, 1, dims=-1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("upsample,eval_size", [("bilinear", None), ("nearest", 10), ("bilinear", 10)])
def test_stream_batches_equal_one_image_at_a_time(tmp_path, upsample, eval_size):
    fs = _mixed_store(tmp_path)
    fns = [_channels, _shifted]

    def collect(num_preds):
        out, sizes = {}, []
        for idx, j, gt, pred in Predictions(fs["tokens"], fs.labels, fns, num_preds, upsample, eval_size, Scoring()):
            sizes.append(len(idx))
            for b, i in enumerate(idx):
                out[i, j] = (gt[b].numpy(), pred[b].numpy())
        return out, sizes

    batched, sizes = collect(5)
    single, single_sizes = collect(1 << 26)  # a budget of one label pixel: one image per batch
    assert max(sizes) == 3 and set(single_sizes) == {1}
    assert sorted(batched) == sorted(single) == [(i, j) for i in range(7) for j in range(2)]
    for key in batched:
        np.testing.assert_array_equal(batched[key][0], single[key][0])
        np.testing.assert_array_equal(batched[key][1], single[key][1])
    assert any(not np.array_equal(batched[i, 0][1], batched[i, 1][1]) for i in range(7))  # the two functions differ

    confs, per_image = count_confusions(Predictions(fs["tokens"], fs.labels, fns, 5, upsample, eval_size,
                                                    Scoring()), 3, 255)
    for j in range(2):
        ref = [_per_pixel(*single[i, j], 3, 5, 255) for i in range(7)]
        np.testing.assert_array_equal(confs[j], np.sum(ref, 0))
        for (idx, counts), r in zip(per_image[j], ref):
            np.testing.assert_array_equal(np.bincount(idx, counts, minlength=15).reshape(3, 5), r)


def test_stream_refuses_non_finite_scores_and_a_missing_scoring(tmp_path):
    fs = _mixed_store(tmp_path)

    calls = []

    def broken(x):  # diverges on its third batch: images 0-2, 3, then 4
        calls.append(len(x))
        s = _channels(x).clone()
        if len(calls) == 3:
            s[-1, 0, 0, 0] = float("nan")
        return s

    with pytest.raises(ProtocolError, match="from image 4 on contain NaN or infinite"):
        list(Predictions(fs["tokens"], fs.labels, [broken], 5, "bilinear", None, Scoring()))
    with pytest.raises(ProtocolError, match="needs the run's Scoring"):
        iter(Predictions(fs["tokens"], fs.labels, [_channels], 5, "bilinear", None, None))


def test_crf_stream_equals_refine_scores_by_hand(tmp_path):
    pytest.importorskip("pydensecrf.densecrf", reason="the optional crf extra (pydensecrf2) is not installed")
    rng = np.random.default_rng(3)
    tokens = [rng.normal(size=(4, 6, 3)).astype(np.float32) for _ in range(3)]
    labels = [rng.integers(0, 3, size=(16, 24)) for _ in range(3)]
    images = [rng.integers(0, 255, size=(16, 24, 3), dtype=np.uint8) for _ in range(3)]
    fs = feature_set(tmp_path / "fs", tokens, labels)
    params = CRFParams(iterations=5)
    scoring = Scoring(params, temperature=0.25)
    stream = Predictions(fs["tokens"], fs.labels, [_channels, _shifted], 3, "bilinear", None, scoring,
                         score_type="raw tokens", images=lambda i: images[i])
    seen = {}
    confs, _ = count_confusions(stream, 3, 255, on_labels=lambda i, j, lab: seen.__setitem__((i, j), lab))
    differs = False
    for i in range(3):
        x = torch.from_numpy(np.asarray(fs["tokens"].image(i), dtype=np.float32))[None]
        for j, fn in enumerate((_channels, _shifted)):
            s = fn(x)[0].numpy()
            ref = refine_scores(images[i], s / 0.25, "bilinear", params)
            np.testing.assert_array_equal(seen[i, j], ref)
            differs |= not np.array_equal(ref, refine_scores(images[i], s, "bilinear", params))
    assert differs  # the temperature changes the answer on this case, so the check above covers it
    for j in range(2):
        np.testing.assert_array_equal(
            confs[j], np.sum([_per_pixel(labels[i], seen[i, j], 3, 3, 255) for i in range(3)], 0))
    assert (scoring.refined, scoring.score_types) == (6, {"raw tokens"})


class _Silent(Protocol):
    """A protocol whose numbers never pass through Predictions (not registered)."""

    name = "silent"
    checked: list = []

    def check_data(self, eval_set, train_set, transform) -> None:
        self.checked.append(eval_set)

    def evaluate(self, ctx: Context) -> ProtocolResult:
        assert self.checked == [ctx.eval_set], "check_data runs before evaluate"
        assert ctx.scoring.temperature == self.params["crf_temperature"] and ctx.scoring.device == "cpu"
        return ProtocolResult([{"miou": 1.0}])


def test_crf_true_without_scoring_through_the_stream_is_refused():
    pytest.importorskip("pydensecrf.densecrf", reason="the optional crf extra (pydensecrf2) is not installed")

    def ctx():
        _Silent.checked = []
        return Context(eval_set="eval", train_set=None, features=None, seeds=[0])

    assert "crf" not in _Silent(crf_temperature=0.5).run(ctx()).info  # without the CRF it runs
    with pytest.raises(ProtocolError, match="'silent' was run with crf=true but scored nothing"):
        _Silent(crf=True).run(ctx())


def test_a_protocol_cannot_replace_run():
    with pytest.raises(TypeError, match="implements evaluate"):
        type("Bypass", (Protocol,), {"run": lambda self, ctx: None})


@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
@pytest.mark.parametrize("limit,calls", [(1 << 26, 3), (2 * 4 * 6 * 18 * 21, 4), (1, 6)])
def test_seeds_upsampled_together_equal_one_call_per_seed(monkeypatch, upsample, limit, calls):
    """Issue 24: the seeds' scores of a batch share one interpolation and argmax where their shapes agree and the
    upsampled scores stay within the limit; the labels equal one `scores_to_labels` call per seed, bit for bit."""
    from ssl_segbench.protocols import base

    rng = np.random.default_rng(3)
    ks = [6, 6, 6, 5, 6, 6]  # seed 3 has fewer clusters: its neighbours cannot be concatenated with it
    scored = [torch.from_numpy(rng.normal(size=(4, k, 7, 5)).astype(np.float32)) for k in ks]
    size = (18, 21)
    reference = [base.scores_to_labels(s, size, upsample) for s in scored]
    made = []
    real = base.scores_to_labels
    monkeypatch.setattr(base, "scores_to_labels", lambda s, *a: made.append(len(s)) or real(s, *a))
    monkeypatch.setattr(base, "UPSAMPLED_SCORES", limit)
    labels = base.seeds_to_labels(scored, size, upsample)
    assert len(made) == calls  # all-in-one limit: [0-2], [3], [4-5]; two seeds at a time: [0-1], [2], [3], [4-5]
    assert sum(made) == 4 * len(ks)
    assert len(labels) == len(ks)
    for got, want in zip(labels, reference):
        assert got.shape == (4, *size)
        assert torch.equal(got, want)
    assert not torch.equal(labels[0], labels[1])  # the seeds' labels differ: a mix-up would show
