"""ADE20K SceneParse150 (0 = other → ignore) and CamVid's SegNet release (11 = void → ignore)."""
import numpy as np
import pytest
from fixtures_data import grid, write_image, write_labels

from ssl_segbench.data import DatasetError, get_dataset


@pytest.fixture
def ade_root(tmp_path):
    data = tmp_path / "ADEChallengeData2016"
    labels = grid(range(151), width=16)
    for sub, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        write_image(data / "images" / sub / f"{stem}.jpg", *labels.shape)
        write_labels(data / "annotations" / sub / f"{stem}.png", labels)
    return tmp_path, labels


def test_ade20k_shifts_classes_and_ignores_other(ade_root):
    root, labels = ade_root
    ds = get_dataset("ade20k", root)
    assert ds.split == "val" and ds.samples[0].name == "ADE_val_00000001"
    mask = ds.load_mask(0)
    np.testing.assert_array_equal(mask[labels == 0], 255)
    np.testing.assert_array_equal(mask[labels > 0], labels[labels > 0] - 1)
    assert ds.num_classes == 150
    assert (ds.class_names[0], ds.class_names[2], ds.class_names[12], ds.class_names[149]) == \
        ("wall", "sky", "person", "flag")
    assert get_dataset("ade20k", root / "ADEChallengeData2016", "train").samples[0].name == "ADE_train_00000001"


def test_ade20k_value_above_150_is_an_error(ade_root):
    root, labels = ade_root
    write_labels(root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000001.png",
                 np.full_like(labels, 151))
    with pytest.raises(DatasetError, match=r"\[151\]"):
        get_dataset("ade20k", root).load_mask(0)


def test_camvid_segnet_layout(tmp_path):
    labels = np.array([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])
    for split in ("train", "val", "test"):
        write_image(tmp_path / split / "0001TP_006690.png", *labels.shape)
        write_labels(tmp_path / f"{split}annot" / "0001TP_006690.png", labels)
    ds = get_dataset("camvid", tmp_path)
    assert ds.split == "val" and set(ds.available_splits()) == {"train", "val", "test"}
    names = [ds.class_names[v] if v != 255 else None for v in ds.load_mask(0).ravel()]
    assert names == ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                     "Bicyclist", None]
    write_labels(tmp_path / "testannot" / "0001TP_006690.png", np.full_like(labels, 12))
    with pytest.raises(DatasetError, match=r"\[12\]"):
        get_dataset("camvid", tmp_path, "test").load_mask(0)
