"""Issue 25: sliding-window evaluation offered to `linear` and `retrieval` (`slide_crop`, `slide_stride`). One window
covering the image is the whole-image number; overlapping windows give the label map a hand-written loop over the
windows gives; unset, the parameters leave every record key where it was; bad values are refused before any work; a
Cityscapes-size image runs end to end."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures_data import write_image, write_labels
from PIL import Image
from test_refusals import _cli_refused, _dinov2_dir, _run_args
from timm.models.vision_transformer import VisionTransformer

import ssl_segbench
from ssl_segbench.backbones import BackboneRef
from ssl_segbench.cli import main
from ssl_segbench.data import get_dataset
from ssl_segbench.protocols import ProtocolError, get_protocol
from ssl_segbench.protocols import linear as linear_module
from ssl_segbench.protocols import retrieval as retrieval_module
from ssl_segbench.published import Claim
from ssl_segbench.records import iter_records
from ssl_segbench.runner import plan_setting, resolve_params
from ssl_segbench.setting import Setting
from ssl_segbench.transforms import Transform

NEW = ("slide_crop", "slide_stride")
FAST = {"linear": {"epochs": 2}, "retrieval": {"k": 5}}


def _run(tmp_path, data, protocol, results, *extra, backbone="pixels"):
    args = ["run", "--backbone", str(backbone), "--dataset", "synthetic", "--data-root", str(data), "--size", "64",
            "--protocol", protocol, "--seeds", "1", "--results-dir", str(tmp_path / results), *extra]
    for key, value in FAST[protocol].items():
        args += ["--param", f"{protocol}.{key}={value}"]
    assert main(args) == 0
    return [rec for _, rec in iter_records(tmp_path / results)]


def _slide(protocol, crop, stride):
    return ["--param", f"{protocol}.slide_crop={crop}", "--param", f"{protocol}.slide_stride={stride}"]


@pytest.mark.parametrize("protocol", ["linear", "retrieval"])
def test_one_window_over_each_image_gives_the_whole_image_numbers(small_synthetic, tmp_path, protocol):
    (whole,) = _run(tmp_path, small_synthetic, protocol, "whole")
    # 64 × 64 images (--size 64): a 64 crop is one window per image, a 128 crop is clipped to the image
    for crop, stride in ((64, 32), (128, 128)) if protocol == "linear" else ((64, 32),):
        (slid,) = _run(tmp_path, small_synthetic, protocol, f"slide{crop}", *_slide(protocol, crop, stride))
        assert slid.key != whole.key
        assert slid.metrics == whole.metrics and slid.per_seed == whole.per_seed
        assert slid.confusions == whole.confusions
        assert slid.info["sliding"] == {"crop": crop, "stride": stride, "images": 8, "windows": 8}
        assert f"slide {crop}/{stride}" in slid.setting.column.label
        assert "slide" not in whole.setting.column.label and "sliding" not in whole.info
        # the evaluation split's tokens were never extracted: its labels alone were read
        assert not [p for p in slid.provenance["passes"] if p.get("split") == "test" and p.get("facets")]
        # a published claim matches the records of exactly its own setting
        plain = Claim("synthetic", "test", "pixels", protocol, "1", None, FAST[protocol], run={"size": 64},
                      train={"split": "train"})
        claimed = replace(plain, overrides={**FAST[protocol], "slide_crop": crop, "slide_stride": stride})
        assert plain.matches(whole) and not plain.matches(slid)
        assert claimed.matches(slid) and not claimed.matches(whole)


def _hand_windows(length: int, crop: int, stride: int) -> list[int]:
    """Window starts along one axis written out: every `stride`, the last moved back to end at the edge."""
    starts = list(range(0, max(length - crop, 0) + 1, stride))
    if starts[-1] + crop < length:
        starts.append(length - crop)
    return starts


def _brute_force(data, checkpoint, scorer, crop: int, stride: int, size: int) -> list[np.ndarray]:
    """Each test image's label map, the slow way: every window embedded alone (float16 tokens, as the cache keeps
    them), scored, bilinearly resized to the window, summed and counted per pixel, averaged, argmax."""
    ds = get_dataset("synthetic", data, "test")
    ref = BackboneRef(str(checkpoint))
    backbone = ref.load("cpu")
    transform = Transform("shorter", size, ref.spec.patch_size)
    out = []
    for i in range(len(ds)):
        x = transform.image(ds.load_image(i), ref.spec.mean, ref.spec.std)
        total, count = None, torch.zeros(size, size)
        for top in _hand_windows(size, crop, stride):
            for left in _hand_windows(size, crop, stride):
                win = x[None, :, top:top + crop, left:left + crop]
                with torch.inference_mode():
                    tokens = backbone(win, -1, ("tokens",))["tokens"].half().float()
                scores = F.interpolate(scorer(tokens).float(), size=(crop, crop), mode="bilinear",
                                       align_corners=False)[0]
                total = torch.zeros(scores.shape[0], size, size) if total is None else total
                total[:, top:top + crop, left:left + crop] += scores
                count[top:top + crop, left:left + crop] += 1
        out.append((total / count).argmax(0).numpy())
    return out


def _masks(folder) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


@pytest.mark.parametrize("protocol, module", [("linear", linear_module), ("retrieval", retrieval_module)])
def test_overlapping_windows_give_the_label_map_of_a_hand_written_window_loop(small_synthetic, tmp_path,
                                                                              monkeypatch, protocol, module):
    """64 × 64 images, a tiny DINOv2 of patch 8 (global attention: a window's tokens differ from the whole image's),
    crop 32, stride 24: windows start at 0, 24 and 32 (the last moved back to the edge) along each axis, so pixels
    are covered by one to four windows. The protocol's own scorer (the trained head, the memory bank) is taken from
    the run; everything around it is recomputed by hand. Batch size 1 embeds each window alone, as the loop does, so
    the two see the same floats."""
    checkpoint = _dinov2_dir(tmp_path / "tiny-dinov2")
    scorers = []
    original = module.eval_predictions

    def capture(ctx, score_fns, *args, **kwargs):
        scorers.extend(score_fns)
        return original(ctx, score_fns, *args, **kwargs)

    monkeypatch.setattr(module, "eval_predictions", capture)
    common = ["--batch-size", "1"]
    (slid,) = _run(tmp_path, small_synthetic, protocol, "slide", *common, *_slide(protocol, 32, 24),
                   "--save-masks", str(tmp_path / "slide-masks"), backbone=checkpoint)
    assert _hand_windows(64, 32, 24) == [0, 24, 32]
    assert slid.info["sliding"] == {"crop": 32, "stride": 24, "images": 8, "windows": 8 * 9}
    expected = _brute_force(small_synthetic, checkpoint, scorers[0], 32, 24, 64)
    got = _masks(tmp_path / "slide-masks" / protocol)
    assert len(got) == len(expected) == 8
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    _run(tmp_path, small_synthetic, protocol, "whole", *common, "--save-masks", str(tmp_path / "whole-masks"),
         backbone=checkpoint)
    whole = _masks(tmp_path / "whole-masks" / protocol)
    assert sum(int((w != g).sum()) for w, g in zip(whole, got)) > 100  # the windows changed the answer


def test_the_crf_refines_the_sliding_window_scores(small_synthetic, tmp_path):
    pytest.importorskip("pydensecrf.densecrf")
    (plain,) = _run(tmp_path, small_synthetic, "retrieval", "plain", *_slide("retrieval", 32, 16))
    (refined,) = _run(tmp_path, small_synthetic, "retrieval", "crf", *_slide("retrieval", 32, 16), "--crf")
    assert refined.info["crf"]["images_refined"] == 8 and refined.info["sliding"]["windows"] == 8 * 9
    assert refined.info["crf"]["score_types"] == ["retrieved label distributions"]
    assert refined.confusions != plain.confusions and refined.key != plain.key


@pytest.mark.parametrize("protocol", ["linear", "retrieval"])
def test_unset_sliding_parameters_leave_the_record_key_as_it_was(small_synthetic, protocol):
    ds = get_dataset("synthetic", small_synthetic, "test")
    train = get_dataset("synthetic", small_synthetic, "train")
    ref = BackboneRef("pixels")
    proto, params, _ = resolve_params(get_protocol(protocol), ref.spec.patch_size, 64, "shorter", "cpu")
    assert {k: params[k] for k in NEW} == {"slide_crop": None, "slide_stride": None}  # the record lists them
    planned = plan_setting(ref, ds, train, proto, params, -1, [0])
    before = {k: v for k, v in params.items() if k not in NEW}  # the parameters as they were before they existed
    old = Setting(ref.spec.id, ref.source, ref.revision, ds.id, ds.split, ds.content_sha256(), proto.name,
                  proto.version, before, -1, (0,), train=planned.train)
    assert planned.key == old.key and planned.column.id == old.column.id
    assert planned.column.label == old.column.label
    # set, they are part of the identity: a key and a column of their own
    slid_proto, slid, _ = resolve_params(get_protocol(protocol, slide_crop=32, slide_stride=16), 16, 64, "shorter",
                                         "cpu")
    other = plan_setting(ref, ds, train, slid_proto, slid, -1, [0])
    assert {k: other.params[k] for k in NEW} == {"slide_crop": 32, "slide_stride": 16}
    assert other.key != old.key and other.column.id != old.column.id
    # one set, one at its default (refused in a run, see below) still differs from the old key
    assert proto.identity_params({**params, "slide_stride": 16}) != before


@pytest.mark.parametrize("protocol, extra, expected", [
    ("linear", ("--param", "linear.slide_crop=40", "--param", "linear.slide_stride=20"),
     ("linear: slide_crop=40 is not a multiple of the backbone's patch size 16", "linear.slide_crop=32 or 48")),
    ("retrieval", ("--param", "retrieval.slide_crop=40", "--param", "retrieval.slide_stride=20"),
     ("retrieval: slide_crop=40 is not a multiple of the backbone's patch size 16", "retrieval.slide_crop=32 or 48")),
    ("linear", ("--param", "linear.slide_crop=32", "--param", "linear.slide_stride=48"),
     ("linear: slide_stride=48 exceeds slide_crop=32", "set slide_stride <= 32")),
    ("retrieval", ("--param", "retrieval.slide_crop=32"),
     ("retrieval: slide_crop and slide_stride go together", "slide_stride=None",
      "--param retrieval.slide_crop=C --param retrieval.slide_stride=S, or neither")),
    ("linear", ("--param", "linear.slide_stride=16"), ("linear: slide_crop and slide_stride go together",)),
    ("linear", ("--param", "linear.slide_crop=0", "--param", "linear.slide_stride=0"),
     ("linear: slide_crop must be > 0, got 0",)),
])
def test_bad_sliding_parameters_are_refused_before_anything_is_written(small_synthetic, tmp_path, protocol, extra,
                                                                        expected):
    _cli_refused(tmp_path, _run_args(tmp_path, small_synthetic, "pixels", protocol, *extra), *expected)


def _cityscapes(root, n_val=2, n_train=2, height=256, width=512):
    """A Cityscapes layout (leftImg8bit/ + gtFine/ labelIds) at a large size: road below, sky above, a car box."""
    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(n):
            frame = f"city_{k:06d}_000019"
            write_image(root / "leftImg8bit" / split / "city" / f"{frame}_leftImg8bit.png", height, width,
                        seed=k + 10 * (split == "val"))
            ids = np.full((height, width), 7, np.uint8)  # road
            ids[: height // 3] = 23  # sky
            ids[height // 2: height // 2 + 40, 64 * (k + 1): 64 * (k + 1) + 120] = 26  # car
            write_labels(root / "gtFine" / split / "city" / f"{frame}_gtFine_labelIds.png", ids)
    return root


def test_a_cityscapes_size_image_is_evaluated_by_sliding_windows_end_to_end(tmp_path):
    root = _cityscapes(tmp_path / "cityscapes")
    assert main(["run", "--backbone", "pixels", "--dataset", "cityscapes19", "--data-root", str(root), "--resize",
                 "pad", "--size", "256", "--protocol", "linear", "--param", "linear.epochs=1", "--seeds", "1",
                 *_slide("linear", 128, 96), "--results-dir", str(tmp_path / "res")]) == 0
    ((_, rec),) = iter_records(tmp_path / "res")
    assert rec.transform == {"policy": "pad", "size": 256, "patch_size": 16}  # 256 × 512, as given
    # rows: windows at 0, 96, 128; columns at 0, 96, 192, 288, 384: 15 windows per image, 2 images
    assert [_hand_windows(256, 128, 96), _hand_windows(512, 128, 96)] == [[0, 96, 128], [0, 96, 192, 288, 384]]
    assert rec.info["sliding"] == {"crop": 128, "stride": 96, "images": 2, "windows": 30}
    assert rec.identity["dataset"] == "cityscapes19" and 0 <= rec.metrics["miou"]["mean"] <= 1
    assert "slide 128/96 · pad 256" in rec.setting.column.label


def test_a_fixed_input_backbone_is_refused_windows_smaller_than_its_input(small_synthetic, tmp_path):
    """A model whose position terms are fixed to 64 × 64 cannot embed 32-pixel windows: refused with the fix, before
    any window goes through it, and no record is written."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=0).eval()
    with pytest.raises(ProtocolError, match=r"takes only 64×64 input, but slide_crop=32 .* or set slide_crop >= 64"):
        ssl_segbench.evaluate(model, dataset="synthetic", data_root=small_synthetic, protocols=("retrieval",),
                              params={"retrieval.slide_crop": 32, "retrieval.slide_stride": 32, "retrieval.k": 5},
                              size=64, resize="square", seeds=1, mean=(0.5,) * 3, std=(0.5,) * 3,
                              results_dir=tmp_path / "res")
    assert not list(tmp_path.rglob("*.json"))
