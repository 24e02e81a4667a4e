"""Issue case 6: the linear probe's parameters do what they say. `train_split` picks the split it trains on (Leopart's
preset: VOC trainaug when present, else the record says what it used); `variant=augmented` really trains on
RandomResizedCrop + flip through the backbone, deterministically and independently of batch sizes."""
from __future__ import annotations

import numpy as np
import pytest
from fixtures_data import write_image, write_labels

from ssl_segbench.cli import main
from ssl_segbench.data import get_dataset
from ssl_segbench.records import iter_records
from ssl_segbench.transforms import RandomResizedCropFlip


@pytest.fixture
def voc(tmp_path):
    """VOC devkit: train 2, val 2, and SegmentationClassAug for 6 images (trainaug = the 4 not in val)."""
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(0)
    stems = [f"2007_00{i:04d}" for i in range(6)]
    for k, stem in enumerate(stems):
        write_image(voc / "JPEGImages" / f"{stem}.jpg", 32, 32, seed=k)
        labels = np.zeros((32, 32), np.uint8)
        labels[:, 16:] = rng.integers(1, 21)
        write_labels(voc / "SegmentationClassAug" / f"{stem}.png", labels)
        write_labels(voc / "SegmentationClass" / f"{stem}.png", labels)
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(stems[:2]) + "\n")
    (sets / "val.txt").write_text("\n".join(stems[4:]) + "\n")
    return tmp_path


def _linear(tmp_path, dataset, root, spec="linear", *extra):
    args = ["run", "--backbone", "pixels", "--dataset", dataset, "--data-root", str(root), "--size", "32",
            "--protocol", spec, "--param", "linear.epochs=1", "--param", "linear.size=32",
            "--param", "linear.eval_size=16", "--results-dir", str(tmp_path / "res"), *extra]
    return main(args)


def _records(tmp_path):
    return [rec for _, rec in iter_records(tmp_path / "res")]


def test_leopart_preset_trains_on_trainaug_when_present(voc, tmp_path):
    assert _linear(tmp_path, "voc", voc, "linear:leopart") == 0
    assert _linear(tmp_path, "voc", voc, "linear") == 0
    by_preset = {r.protocol["preset"]: r for r in _records(tmp_path)}
    aug, default = by_preset["leopart"], by_preset[None]
    trainaug = get_dataset("voc", voc, "trainaug")
    assert aug.info["train_split"] == "trainaug" and len(trainaug) == 4
    assert aug.identity["train"] == {"split": "trainaug", "content_sha256": trainaug.content_sha256()}
    assert default.info["train_split"] == "train" and default.identity["train"]["split"] == "train"
    assert aug.key != default.key


def test_leopart_preset_elsewhere_says_what_it_trained_on(small_synthetic, tmp_path):
    assert _linear(tmp_path, "synthetic", small_synthetic, "linear:leopart") == 0
    (rec,) = _records(tmp_path)
    assert rec.info["train_split"] == "train (first available of ['trainaug', 'default'] under this root)"
    assert rec.identity["train"]["split"] == "train"


def test_an_explicit_split_that_is_not_there_is_an_error(small_synthetic, tmp_path, capsys):
    assert _linear(tmp_path, "synthetic", small_synthetic, "linear", "--param", "linear.train_split=trainaug") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "train_split 'trainaug' is not available" in err and "available: train, test" in err
    assert not _records(tmp_path) if (tmp_path / "res").exists() else True


def _augmented(tmp_path, data, name, *extra):
    return main(["run", "--backbone", "random_vits16", "--dataset", "synthetic", "--data-root", str(data),
                 "--size", "32", "--protocol", "linear", "--param", "linear.epochs=2", "--param",
                 "linear.batch_size=5", "--results-dir", str(tmp_path / name), *extra])


def test_augmented_variant_runs_the_backbone_on_augmented_crops_deterministically(small_synthetic, tmp_path):
    assert _augmented(tmp_path, small_synthetic, "cached") == 0
    assert _augmented(tmp_path, small_synthetic, "aug", "--param", "linear.variant=augmented") == 0
    assert _augmented(tmp_path, small_synthetic, "aug-again", "--param", "linear.variant=augmented",
                      "--batch-size", "3") == 0
    (cached,) = [r for _, r in iter_records(tmp_path / "cached")]
    (aug,) = [r for _, r in iter_records(tmp_path / "aug")]
    (again,) = [r for _, r in iter_records(tmp_path / "aug-again")]
    passes = [p for p in aug.provenance["passes"] if p["kind"] == "augmented training"]
    assert len(passes) == 1 and passes[0]["computed"] and passes[0]["images"] == 16 * 2  # 16 images × 2 epochs
    assert not aug.provenance["cache_hit"]
    assert aug.protocol["params"]["variant"] == "augmented"
    assert aug.per_seed != cached.per_seed  # it trained on something else than the cached tokens
    assert again.per_seed == aug.per_seed  # same seed, other extraction batch size: same numbers


def test_random_resized_crop_follows_torchvisions_rule():
    aug = RandomResizedCropFlip(32)
    boxes, flips = [], []
    for i in range(400):
        box, flipped = aug.sample(np.random.default_rng([0, 0, i]), 160, 120)
        boxes.append(box)
        flips.append(flipped)
        left, top, w, h = box
        assert 0 <= left and left + w <= 160 and 0 <= top and top + h <= 120
    areas = np.array([w * h for _, _, w, h in boxes]) / (160 * 120)
    ratios = np.array([w / h for _, _, w, h in boxes])
    assert (areas >= 0.79).all() and (areas <= 1.0).all() and (ratios >= 0.74).all() and (ratios <= 1.35).all()
    assert areas.std() > 0.03 and 0.4 < np.mean(flips) < 0.6
    # no crop of 80-100 % of a 2:1 image has an aspect ratio in [3/4, 4/3]: torchvision's fallback, the centre crop
    # at the clamped ratio 4/3
    assert aug.sample(np.random.default_rng(0), 200, 100)[0] == (33, 0, 133, 100)
    assert aug.sample(np.random.default_rng([1, 2, 3]), 160, 120) == aug.sample(np.random.default_rng([1, 2, 3]),
                                                                              160, 120)
