"""Cityscapes-27 and -19 from labelIds / labelTrainIds, checked against the official label table written out here."""
import shutil

import numpy as np
import pytest
from fixtures_data import grid, shared_data, write_image, write_labels
from PIL import Image
from scipy.ndimage import maximum_filter

from ssl_segbench.data import DatasetError, get_dataset
from ssl_segbench.data.cityscapes import labelids_to_19, labelids_to_27

# official labelId → trainId for the 19 evaluated classes (cityscapesScripts labels.py); every other id → 255
TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
            28: 15, 31: 16, 32: 17, 33: 18}
NAMES_27 = ["road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel",
            "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider",
            "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle"]
ID_OF_TRAIN_ID = {t: i for i, t in TRAIN_ID.items()}


def want_27(label_id: int) -> int:
    return label_id - 7 if 7 <= label_id <= 33 else 255


@pytest.mark.parametrize("label_id", range(-1, 34))
def test_every_label_id_in_both_views(label_id):
    assert labelids_to_27(np.array([[label_id]]))[0, 0] == want_27(label_id)
    assert labelids_to_19(np.array([[label_id]]))[0, 0] == TRAIN_ID.get(label_id, 255)


def make_frame(root, city, frame, label_ids, train_ids=None):
    write_image(root / "leftImg8bit" / "val" / city / f"{frame}_leftImg8bit.png", *label_ids.shape)
    gt = root / "gtFine" / "val" / city
    write_labels(gt / f"{frame}_gtFine_labelIds.png", label_ids)
    if train_ids is not None:
        write_labels(gt / f"{frame}_gtFine_labelTrainIds.png", train_ids)


@pytest.fixture
def cs_root(tmp_path):
    ids = grid(list(range(34)) + [255], width=7)  # 5 x 7, every labelId and an 8-bit -1
    make_frame(tmp_path, "aachen", "aachen_000000_000019", ids)
    train_ids = np.where(ids == 26, 13, 255)  # a labelTrainIds file that differs from the table: only cars
    make_frame(tmp_path, "bremen", "bremen_000000_000019", ids, train_ids)
    return tmp_path, ids, train_ids


def test_cityscapes27_from_label_ids(cs_root):
    root, ids, _ = cs_root
    ds = get_dataset("cityscapes27", root)
    assert list(ds.class_names) == NAMES_27 and ds.split == "val"
    assert [s.name for s in ds.samples] == ["aachen_000000_000019", "bremen_000000_000019"]
    for i in range(2):
        np.testing.assert_array_equal(ds.load_mask(i), np.vectorize(want_27)(ids))
    assert ds.palette[NAMES_27.index("road")].tolist() == [128, 64, 128]


def test_cityscapes19_prefers_label_train_ids(cs_root):
    root, ids, train_ids = cs_root
    ds = get_dataset("cityscapes19", root)
    assert ds.class_names[13] == "car" and ds.num_classes == 19
    np.testing.assert_array_equal(ds.load_mask(0), np.vectorize(lambda i: TRAIN_ID.get(i, 255))(ids))
    assert ds.samples[1].mask.name.endswith("_labelTrainIds.png")
    np.testing.assert_array_equal(ds.load_mask(1), train_ids)
    assert any("1 of 2 from *_labelTrainIds.png" in n for n in ds.notes)


def test_train_id_outside_19_is_an_error(cs_root):
    root, ids, _ = cs_root
    write_labels(root / "gtFine" / "val" / "bremen" / "bremen_000000_000019_gtFine_labelTrainIds.png",
                 np.full_like(ids, 19))
    with pytest.raises(DatasetError, match=r"\[19\]"):
        get_dataset("cityscapes19", root).load_mask(1)


def test_real_frame_27_view_follows_its_label_ids():
    root = shared_data("cityscapes_sample")
    ds = get_dataset("cityscapes27", root)
    ids = np.asarray(Image.open(ds.samples[0].mask)).astype(int)
    mask = ds.load_mask(0)
    assert mask.shape == (128, 256)
    np.testing.assert_array_equal(mask, np.vectorize(want_27)(ids))
    present = {ds.class_names[v] for v in np.unique(mask) if v != 255}
    assert {"road", "sidewalk", "building", "car", "sky", "vegetation"} <= present


def test_real_frame_19_and_27_views_agree(tmp_path):
    """Where the sample's labelTrainIds names a class, the 27-class label must be that class too. The sample's files
    were downscaled one by one, so labelIds and labelTrainIds disagree on a few boundary pixels: those must lie within
    2 pixels of the class the trainId names."""
    root = shared_data("cityscapes_sample")
    c27, c19 = get_dataset("cityscapes27", root), get_dataset("cityscapes19", root)
    train_ids = np.asarray(Image.open(c19.samples[0].mask)).astype(int)
    assert c19.samples[0].mask.name.endswith("_labelTrainIds.png")
    l19, l27 = c19.load_mask(0), c27.load_mask(0)
    np.testing.assert_array_equal(l19, train_ids)
    named = l19 != 255
    want = np.vectorize(lambda t: want_27(ID_OF_TRAIN_ID.get(t, -1)))(l19)
    differ = named & (l27 != want)
    assert differ.sum() <= 0.005 * named.sum()
    for t in np.unique(l19[differ]):
        near = maximum_filter((l27 == want_27(ID_OF_TRAIN_ID[t])).astype(np.uint8), size=5).astype(bool)
        assert (near[differ & (l19 == t)]).all(), c19.class_names[t]

    # without the labelTrainIds file the 19 view comes from labelIds through the table: then it agrees exactly
    copy = tmp_path / "cs"
    shutil.copytree(root, copy)
    next(copy.rglob("*_labelTrainIds.png")).unlink()
    t19 = get_dataset("cityscapes19", copy).load_mask(0)
    named = t19 != 255
    np.testing.assert_array_equal(l27[named], np.vectorize(lambda t: want_27(ID_OF_TRAIN_ID[t]))(t19[named]))
