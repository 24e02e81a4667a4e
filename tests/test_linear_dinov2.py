"""`linear-dinov2` (issue 25, PROTOCOLS.md §10): its schedules against their formulas, centre padding, mmcv's
keep-ratio rescale and ADE20K's reduce_zero_label against hand-built cases; the crop-window rescale against resizing the
whole image and cropping; a planted ADE20K-layout dataset on which
the head must reach mIoU 1; a run killed with SIGKILL resumes to the identical record; the same seed gives the same
record; the cached variant; bad parameters refused through the CLI with nothing written."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures_data import write_labels
from PIL import Image
from test_refusals import _cli, _nothing_written

from ssl_segbench.data.ade20k import ADE20K
from ssl_segbench.protocols import get_protocol
from ssl_segbench.protocols.linear_dinov2 import (
    _Augment,
    centre_pad,
    image_order,
    lr_at,
    rescale_window,
    rescaled_size,
)
from ssl_segbench.records import iter_records

PROTO = "linear-dinov2"
COLOURS = ((220, 30, 30), (30, 200, 40), (40, 60, 230))  # one colour per class: ADE20K classes 0, 1, 2


def _p(**kw):
    return get_protocol(PROTO, **kw).p


def test_poly_schedule_with_linear_warmup_follows_mmcv():
    p = _p()  # lr 1e-3, 40,000 iterations, 1,500 warm-up from 1e-6, power 1, min_lr 0
    assert lr_at(0, p) == pytest.approx(1e-3 * 1e-6, rel=1e-9)
    # warm-up scales the poly value: at 750, (1 - 750/40000)·1e-3 × (1 - 0.5·(1 - 1e-6))
    assert lr_at(750, p) == pytest.approx(9.8125e-4 * 0.5000005, rel=1e-9)
    assert lr_at(1500, p) == pytest.approx(1e-3 * (1 - 1500 / 40000), rel=1e-12)
    assert lr_at(20000, p) == pytest.approx(5e-4, rel=1e-12)
    assert lr_at(39999, p) == pytest.approx(2.5e-8, rel=1e-9)
    sq = _p(poly_power=2.0, min_lr=1e-4, warmup_iters=0)
    assert lr_at(10000, sq) == pytest.approx(9e-4 * 0.75 ** 2 + 1e-4, rel=1e-12)


def test_cosine_schedule_with_linear_warmup():
    p = get_protocol(f"{PROTO}:dinov3").p
    assert p.schedule == "cosine" and p.weight_decay == 1e-3 and p.head_dropout == 0.1
    assert lr_at(0, p) == pytest.approx(1e-9, rel=1e-9)
    assert lr_at(750, p) == pytest.approx(1e-3 * (1e-6 + (1 - 1e-6) * 0.5), rel=1e-9)
    assert lr_at(1500, p) == pytest.approx(1e-3, rel=1e-12)
    assert lr_at(1500 + 38500 // 2, p) == pytest.approx(5e-4, rel=1e-9)  # half way down the cosine
    assert lr_at(1500 + 38500 // 4, p) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-9)
    assert lr_at(40000, p) == pytest.approx(0.0, abs=1e-15)


def test_centre_padding_splits_the_pad_and_keeps_the_image():
    x = torch.arange(1, 31, dtype=torch.float32).reshape(1, 1, 5, 6)
    out = centre_pad(x, 4)  # 5 rows → 8: 1 above, 2 below; 6 columns → 8: 1 each side
    assert out.shape == (1, 1, 8, 8)
    assert torch.equal(out[0, 0, 1:6, 1:7], x[0, 0])
    assert out[0, 0, 0].abs().sum() == 0 and out[0, 0, 6:].abs().sum() == 0
    assert out[0, 0, :, 0].abs().sum() == 0 and out[0, 0, :, 7].abs().sum() == 0
    assert centre_pad(x[..., :4, :4], 4) is not None and torch.equal(centre_pad(x[..., :4, :4], 4), x[..., :4, :4])
    assert centre_pad(torch.zeros(1, 3, 512, 512), 14).shape[-2:] == (518, 518)  # DINOv2: 512 → 37×37 tokens


def test_keep_ratio_rescale_is_mmcvs():
    assert rescaled_size(500, 375, (99999999, 512)) == (683, 512)  # short side 512
    assert rescaled_size(2048, 1024, (2048, 1024)) == (2048, 1024)
    assert rescaled_size(3000, 500, (2048, 512)) == (2048, 341)  # the long side caps it


@pytest.mark.parametrize("size", [(23, 17), (61, 45), (150, 111)])  # down, up, far up from 40 × 30
def test_a_crop_window_rescaled_alone_equals_the_whole_image_rescaled_then_cropped(size):
    """Bilinear without antialiasing (OpenCV's INTER_LINEAR, torch's align_corners=False) and nearest labels
    (OpenCV's INTER_NEAREST), computed for the window alone: against a float64 loop over the whole rescaled image
    (then cropped) and torch's own resize, and labels against the whole nearest-resized map, cropped."""
    rng = np.random.default_rng(0)
    im = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    w, h = size
    ref = np.empty((h, w, 3))
    for y in range(h):
        for x in range(w):
            sy = min(max((y + 0.5) * 30 / h - 0.5, 0), 29)
            sx = min(max((x + 0.5) * 40 / w - 0.5, 0), 39)
            y0, x0 = int(sy), int(sx)
            y1, x1, ly, lx = min(y0 + 1, 29), min(x0 + 1, 39), sy - y0, sx - x0
            ref[y, x] = ((1 - ly) * ((1 - lx) * im[y0, x0] + lx * im[y0, x1])
                         + ly * ((1 - lx) * im[y1, x0] + lx * im[y1, x1]))
    torch_ref = F.interpolate(torch.from_numpy(im).permute(2, 0, 1)[None].double(), size=(h, w), mode="bilinear",
                              align_corners=False, antialias=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ref, torch_ref, atol=1e-9)  # the loop is torch's rule
    top, left, ch, cw = h // 3, w // 4, h - h // 3 - 1, w // 2
    window = rescale_window(im, size, top, left, ch, cw)
    expected = ref[top: top + ch, left: left + cw]
    assert window.shape == expected.shape and window.dtype == np.uint8
    assert np.abs(window - expected).max() <= 0.5 + 1e-4  # rounded to the nearest integer
    np.testing.assert_array_equal(rescale_window(im, size, 0, 0, h, w)[top: top + ch, left: left + cw], window)
    mask = rng.integers(0, 7, size=(30, 40))
    whole = mask[np.minimum(np.arange(h) * 30 // h, 29)][:, np.minimum(np.arange(w) * 40 // w, 39)]
    aug = _Augment(_p(crop_size=max(ch, cw)), [512, 512], 255, (0, 0, 0), (1, 1, 1))
    np.testing.assert_array_equal(aug.labels(mask, size, top, left), whole[top: top + max(ch, cw), left:
                                                                           left + max(ch, cw)])


def test_image_order_does_not_depend_on_batch_size():
    a = [image_order(3, 7, it * 4 + s) for it in range(7) for s in range(4)]
    b = [image_order(3, 7, it * 2 + s) for it in range(14) for s in range(2)]
    assert a == b and sorted(a[:7]) == list(range(7)) and sorted(a[7:14]) == list(range(7))


def _ade(root, n_train=6, n_val=3):
    """ADE20K layout, 48×32 images, each one class colour; annotation 0 ('other') on the left 16 columns, the image's
    class (annotation k + 1, i.e. ADE20K class k) on the rest. Returns the number of non-zero annotation pixels in
    val."""
    base = root / "ADEChallengeData2016"
    for split, n in (("training", n_train), ("validation", n_val)):
        for i in range(n):
            k = i % 3
            (base / "images" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((32, 48, 3), COLOURS[k], dtype=np.uint8)).save(
                base / "images" / split / f"{split}_{i}.jpg", quality=95)
            ann = np.full((32, 48), k + 1, dtype=np.uint8)
            ann[:, :16] = 0
            write_labels(base / "annotations" / split / f"{split}_{i}.png", ann)
    return n_val * 32 * 32


def test_reduce_zero_label_is_the_datasets_own_and_applied_once(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    Image.new("RGB", (3, 2)).save((base / "images" / "validation").mkdir(parents=True) or
                                  base / "images" / "validation" / "a.jpg")
    write_labels(base / "annotations" / "validation" / "a.png", np.array([[0, 1, 150], [2, 0, 75]]))
    assert ADE20K(tmp_path, "val").load_mask(0).tolist() == [[255, 0, 149], [1, 255, 74]]


TINY = ["--param", "linear-dinov2.img_scale={'*': [99999999, 32]}", "--param", "linear-dinov2.crop_size=32",
        "--param", "linear-dinov2.slide_crop=32", "--param", "linear-dinov2.slide_stride=16",
        "--param", "linear-dinov2.batch_size=4", "--param", "linear-dinov2.warmup_iters=5",
        "--param", "linear-dinov2.photometric=none", "--param", "linear-dinov2.lr=0.01"]


def _run(tmp_path, data, res, *extra, iterations=60, env=None, popen=False):
    args = [sys.executable, "-m", "ssl_segbench", "run", "--backbone", "pixels", "--dataset", "ade20k", "--data-root",
            str(data), "--size", "64", "--protocol", PROTO, "--seeds", "1", "--results-dir", str(res), *TINY,
            "--param", f"linear-dinov2.iterations={iterations}", *extra]
    full = {**os.environ, "SSL_SEGBENCH_CACHE": str(tmp_path / "cache"), **(env or {})}
    if popen:
        return subprocess.Popen(args, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.run(args, env=full, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (_, rec), = iter_records(res)
    return rec


def test_planted_dataset_head_reaches_miou_one_and_counts_only_labelled_pixels(tmp_path):
    data = tmp_path / "ade"
    labelled = _ade(data)
    rec = _run(tmp_path, data, tmp_path / "res")
    iou = rec.per_seed[0]["per_class_iou"]
    assert iou[:3] == [1.0, 1.0, 1.0] and all(v is None for v in iou[3:]), iou[:5]
    assert rec.metrics["miou"]["mean"] == 1.0
    # annotation 0 is ignored and nothing else is: every non-zero annotation pixel, at the label's own size, counted
    assert int(np.asarray(rec.confusions[0]).sum()) == labelled
    assert rec.info["iterations"] == 60 and rec.info["training"][0]["iterations_run_here"] == 60
    assert "depends on batch_size" in rec.info["batch_dependence"]
    # the run's --size 64 does not reach the augmented variant's record (its column): fixed at the crop, padded
    assert (rec.protocol["params"]["size"], rec.protocol["params"]["resize"]) == (32, "pad")
    # the same seed again (fresh cache): the same record; the head is then taken from the cache
    again = _run(tmp_path, data, tmp_path / "res2", env={"SSL_SEGBENCH_CACHE": str(tmp_path / "cache2")})
    assert again.per_seed == rec.per_seed and again.confusions == rec.confusions
    cached = _run(tmp_path, data, tmp_path / "res3")
    assert cached.per_seed == rec.per_seed and cached.info["training"][0]["head"] == "from the cache"


def test_untrained_heads_miss_the_planted_answer_and_seeds_share_the_windows(tmp_path):
    data = tmp_path / "ade"
    _ade(data)
    rec = _run(tmp_path, data, tmp_path / "res", "--param", "linear-dinov2.lr=0.000001", iterations=2)
    assert rec.metrics["miou"]["mean"] < 0.9  # the head is what gets the planted answer right
    # two seeds: both heads score every window of one backbone pass; seed 0's numbers are the one-seed run's
    two = _run(tmp_path, data, tmp_path / "res2", "--param", "linear-dinov2.lr=0.000001", "--seeds", "2",
               iterations=2)
    assert len(two.per_seed) == 2 and two.per_seed[0] == rec.per_seed[0] and two.confusions[0] == rec.confusions[0]
    assert two.confusions[1] != two.confusions[0]  # another seed, another (untrained) head


def test_killed_training_resumes_to_the_identical_record(tmp_path):
    data = tmp_path / "ade"
    _ade(data)
    n = 150
    ref = _run(tmp_path, data, tmp_path / "ref", iterations=n, env={"SSL_SEGBENCH_CACHE": str(tmp_path / "refcache")})
    proc = _run(tmp_path, data, tmp_path / "res", iterations=n, popen=True,
                env={"SSL_SEGBENCH_CHECKPOINT_SECONDS": "0"})
    deadline, reached = time.monotonic() + 120, 0
    while time.monotonic() < deadline and proc.poll() is None and not reached:
        for state in (tmp_path / "cache").rglob("linear-dinov2/**/state.pt"):
            try:
                reached = torch.load(state, weights_only=True)["iteration"]
            except Exception:  # being replaced right now
                continue
        time.sleep(0.02)
    assert proc.poll() is None and reached, "training finished before it could be killed; raise n"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "res").rglob("*.json")), "no record may exist after a kill during training"
    rec = _run(tmp_path, data, tmp_path / "res", iterations=n)
    assert rec.per_seed == ref.per_seed and rec.confusions == ref.confusions
    start = rec.info["training"][0]["resumed_from_iteration"]
    assert 0 < start < n and rec.info["training"][0]["iterations_run_here"] == n - start
    metas = [json.loads(m.read_text()) for m in (tmp_path / "cache").rglob("linear-dinov2/**/meta.json")]
    assert [m["resumed_from"] for m in metas] == [start]


def test_cached_variant_trains_on_cached_tokens_and_is_its_own_column(tmp_path):
    data = tmp_path / "ade"
    _ade(data)
    rec = _run(tmp_path, data, tmp_path / "res", "--param", "linear-dinov2.variant=cached", "--param",
               "linear-dinov2.resize=null")
    assert rec.metrics["miou"]["mean"] == 1.0
    assert rec.protocol["params"]["variant"] == "cached" and rec.protocol["params"]["size"] == 64
    kinds = {p["kind"]: p for p in rec.provenance["passes"]}
    assert "linear-dinov2 head training (cached)" in kinds and kinds["features"]["split"] == "train"
    assert get_protocol(f"{PROTO}:dinov2-cached").column_axes(rec.protocol["params"]) == {
        "training": "head on cached features", "iterations": "60 iterations"}


@pytest.mark.parametrize("param, expected", [
    ("linear-dinov2.img_scale={'voc': [2048, 512]}", "'*' for any other"),
    ("linear-dinov2.cat_max_ratio=0", "cat_max_ratio must be in (0, 1]"),
    ("linear-dinov2.betas=[0.9]", "betas must be [beta1, beta2]"),
    ("linear-dinov2.iterations=0", "iterations must be > 0"),
    ("linear-dinov2.photometric=opencv", "photometric must be one of"),
    ("linear-dinov2.crf=true", "crf is not offered"),
])
def test_bad_parameters_are_refused_with_nothing_written(tmp_path, param, expected):
    data = tmp_path / "ade"
    _ade(data)
    rc, err = _cli(tmp_path, "run", "--backbone", "pixels", "--dataset", "ade20k", "--data-root", str(data),
                   "--size", "32", "--protocol", PROTO, "--results-dir", str(tmp_path / "res"), "--param", param)
    assert rc == 2 and "Traceback" not in err and expected in err, err
    _nothing_written(tmp_path)
    assert not list((tmp_path / "cache").rglob("linear-dinov2"))


def test_cached_variant_with_padded_grids_is_refused(tmp_path):
    data = tmp_path / "ade"
    _ade(data)
    rc, err = _cli(tmp_path, "run", "--backbone", "pixels", "--dataset", "ade20k", "--data-root", str(data),
                   "--size", "32", "--resize", "pad", "--protocol", f"{PROTO}:dinov2-cached", "--results-dir",
                   str(tmp_path / "res"))
    assert rc == 2 and "resize 'pad' gives each image its own grid" in err, err
    _nothing_written(tmp_path)
