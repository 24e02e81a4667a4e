"""PASCAL VOC 2012: devkit layout with palette PNGs, SegmentationClassAug, and RGB-rendered targets (`voc-rgb`)."""
import numpy as np
import pytest
from fixtures_data import grid, shared_data, write_image, write_labels, write_rgb_mask
from PIL import Image

from ssl_segbench.data import DatasetError, get_dataset

# the standard VOC colours, written out by class
VOC_COLOURS = {
    "background": (0, 0, 0), "aeroplane": (128, 0, 0), "bicycle": (0, 128, 0), "bird": (128, 128, 0),
    "boat": (0, 0, 128), "bottle": (128, 0, 128), "bus": (0, 128, 128), "car": (128, 128, 128), "cat": (64, 0, 0),
    "chair": (192, 0, 0), "cow": (64, 128, 0), "diningtable": (192, 128, 0), "dog": (64, 0, 128),
    "horse": (192, 0, 128), "motorbike": (64, 128, 128), "person": (192, 128, 128), "pottedplant": (0, 64, 0),
    "sheep": (128, 64, 0), "sofa": (0, 192, 0), "train": (128, 192, 0), "tvmonitor": (0, 64, 128),
}
BOUNDARY = (224, 224, 192)
PALETTE = np.zeros((256, 3), np.uint8)
PALETTE[: len(VOC_COLOURS)] = list(VOC_COLOURS.values())
PALETTE[255] = BOUNDARY


@pytest.fixture
def voc_root(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    labels = grid(list(range(21)) + [255], width=11)  # 2 x 11
    for k, stem in enumerate(("2007_000032", "2007_000033", "2008_000001")):
        write_image(voc / "JPEGImages" / f"{stem}.jpg", *labels.shape, seed=k)
        write_labels(voc / "SegmentationClassAug" / f"{stem}.png", np.roll(labels, k))
    for stem in ("2007_000032", "2007_000033"):
        write_labels(voc / "SegmentationClass" / f"{stem}.png", labels, palette=PALETTE)
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2007_000032\n")
    (sets / "val.txt").write_text("2007_000033\n")
    return tmp_path, labels


def test_palette_png_values_are_the_classes(voc_root):
    root, labels = voc_root
    ds = get_dataset("voc", root)
    assert ds.split == "val" and [s.name for s in ds.samples] == ["2007_000033"]
    with Image.open(ds.samples[0].mask) as raw:
        assert raw.mode == "P"
    np.testing.assert_array_equal(ds.load_mask(0), labels)
    assert ds.palette[ds.class_names.index("person")].tolist() == list(VOC_COLOURS["person"])
    assert list(ds.class_names) == list(VOC_COLOURS)


def test_root_may_be_voc2012_itself(voc_root):
    root, _ = voc_root
    assert len(get_dataset("voc", root / "VOCdevkit" / "VOC2012", "train")) == 1


def test_trainaug_without_list_is_aug_minus_val(voc_root):
    root, labels = voc_root
    ds = get_dataset("voc", root, "trainaug")
    assert [s.name for s in ds.samples] == ["2007_000032", "2008_000001"]
    assert all(s.mask.parent.name == "SegmentationClassAug" for s in ds.samples)
    np.testing.assert_array_equal(ds.load_mask(1), np.roll(labels, 2))
    assert any("not in val.txt" in n for n in ds.notes)


def test_trainaug_list_is_used_when_present(voc_root):
    root, _ = voc_root
    sets = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    (sets / "train_aug.txt").write_text("/JPEGImages/2008_000001.jpg /SegmentationClassAug/2008_000001.png\n")
    ds = get_dataset("voc", root, "trainaug")
    assert [s.name for s in ds.samples] == ["2008_000001"]
    assert any("train_aug.txt" in n for n in ds.notes)


def test_value_outside_voc_is_an_error(voc_root):
    root, labels = voc_root
    write_labels(root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000033.png", np.full_like(labels, 21))
    with pytest.raises(DatasetError, match=r"2007_000033.png has label value\(s\) \[21\]"):
        get_dataset("voc", root).load_mask(0)


def test_voc_rgb_flat_pairs_decode_every_colour(tmp_path):
    colours = list(VOC_COLOURS.values()) + [BOUNDARY]
    write_image(tmp_path / "7_image.png", 1, len(colours))
    write_rgb_mask(tmp_path / "7_target.png", np.array([colours], np.uint8))
    ds = get_dataset("voc-rgb", tmp_path)
    assert ds.split == "all" and [s.name for s in ds.samples] == ["7"]
    assert ds.load_mask(0).tolist() == [list(range(21)) + [255]]


def test_voc_rgb_unknown_colour_is_refused_or_mapped_as_asked(tmp_path):
    write_image(tmp_path / "1_image.png", 1, 3)
    # background, then a reddish colour nearest aeroplane (128, 0, 0) and one nearest the boundary (224, 224, 192)
    write_rgb_mask(tmp_path / "1_target.png", np.array([[(0, 0, 0), (120, 10, 5), (224, 224, 190)]], np.uint8))
    with pytest.raises(DatasetError, match=r"1_target.png has 2 pixel\(s\) \(66.67 %\) off the 'voc-rgb' palette"):
        get_dataset("voc-rgb", tmp_path).load_mask(0)
    assert get_dataset("voc-rgb", tmp_path, off_palette="nearest").load_mask(0).tolist() == [[0, 1, 255]]
    assert get_dataset("voc-rgb", tmp_path, off_palette="ignore").load_mask(0).tolist() == [[0, 255, 255]]


# classes in each real sample, read off its target colours with the VOC palette
REAL = {"0": {"aeroplane"}, "1": {"aeroplane"}, "8": {"horse"}, "20": {"sheep"}, "23": {"sheep"}, "60": {"bird"},
        "114": {"bird"}, "120": {"bicycle", "bottle"}, "166": {"aeroplane"}, "293": {"cow"}, "294": {"car", "person"},
        "417": {"aeroplane"}, "474": {"bus"}, "582": {"motorbike", "person"}}


def test_real_voc_samples_decode_with_boundary_ignored():
    root = shared_data("voc_sample")
    ds = get_dataset("voc-rgb", root)
    assert sorted(s.name for s in ds.samples) == sorted(REAL)
    for i, s in enumerate(ds.samples):
        mask = ds.load_mask(i)
        rgb = np.asarray(Image.open(s.mask).convert("RGB"))
        boundary = (rgb == BOUNDARY).all(-1)
        assert boundary.any()
        np.testing.assert_array_equal(mask == 255, boundary)
        assert {ds.class_names[v] for v in np.unique(mask[~boundary])} == REAL[s.name] | {"background"}, s.name
