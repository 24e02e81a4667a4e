"""Potsdam-3 in STEGO's .mat layout and in mmsegmentation's PNG layout."""
import numpy as np
import pytest
import scipy.io
from fixtures_data import shared_data, write_image, write_labels, write_rgb_mask
from PIL import Image

from ssl_segbench.data import DatasetError, get_dataset

ROADS, BUILDINGS, VEGETATION = "roads and cars", "buildings and clutter", "trees and vegetation"
# ISPRS classes in IIC's order 0..5 and the Potsdam-3 group each belongs to
SIX = [("impervious surfaces", ROADS), ("building", BUILDINGS), ("low vegetation", VEGETATION), ("tree", VEGETATION),
       ("car", ROADS), ("clutter", BUILDINGS)]


def named(ds, mask):
    return [ds.class_names[v] if v != 255 else None for v in mask.ravel()]


@pytest.fixture
def stego_root(tmp_path):
    pots = tmp_path / "potsdam"
    (pots / "imgs").mkdir(parents=True)
    (pots / "gt").mkdir()
    rng = np.random.default_rng(0)
    images = {}
    for name in ("11", "22", "33"):
        images[name] = rng.integers(0, 256, (2, 4, 4), dtype=np.uint8)  # RGB + infrared
        scipy.io.savemat(pots / "imgs" / f"{name}.mat", {"img": images[name]})
    gt = np.array([[0, 1, 2, 3], [4, 5, 255, 0]], dtype=np.int32)
    for name in ("11", "22"):
        scipy.io.savemat(pots / "gt" / f"{name}.mat", {"gt": gt})
    for fname, ids in (("labelled_train.txt", "11"), ("labelled_test.txt", "22"), ("unlabelled_train.txt", "33"),
                       ("all.txt", "11\n22\n33")):
        (pots / fname).write_text(ids + "\n")
    return tmp_path, images, gt


def test_stego_mat_layout(stego_root):
    root, images, gt = stego_root
    ds = get_dataset("potsdam3", root)
    assert ds.split == "val" and [s.name for s in ds.samples] == ["22"]
    assert np.asarray(ds.load_image(0)).tolist() == images["22"][..., :3].tolist()
    want = [SIX[v][1] if v != 255 else None for v in gt.ravel()]
    assert named(ds, ds.load_mask(0)) == want
    assert get_dataset("potsdam3", root / "potsdam", "train").samples[0].name == "11"
    assert len(get_dataset("potsdam3", root, "train+val")) == 2


def test_stego_unlabelled_split_has_no_masks(stego_root):
    root, _, _ = stego_root
    ds = get_dataset("potsdam3", root, "unlabelled_train")
    assert ds.samples[0].mask is None
    with pytest.raises(DatasetError, match="has no mask"):
        ds.load_mask(0)
    assert [s.mask is None for s in get_dataset("potsdam3", root, "all").samples] == [False, False, True]


def test_stego_labelled_image_without_gt_is_an_error(stego_root):
    root, _, _ = stego_root
    (root / "potsdam" / "gt" / "22.mat").unlink()
    with pytest.raises(DatasetError, match=r"22.mat has no mask"):
        get_dataset("potsdam3", root, "val")


def test_stego_corrupt_mat_is_named(stego_root):
    root, _, _ = stego_root
    (root / "potsdam" / "gt" / "22.mat").write_bytes(b"MATLAB 5.0 but not really")
    with pytest.raises(DatasetError, match=r"cannot read .*22.mat"):
        get_dataset("potsdam3", root, "val").load_mask(0)


@pytest.fixture
def mmseg_root(tmp_path):
    ann = np.array([[0, 1, 2, 3], [4, 5, 6, 255]])
    write_image(tmp_path / "img_dir" / "val" / "2_10_0_0_512_512.png", *ann.shape)
    write_labels(tmp_path / "ann_dir" / "val" / "2_10_0_0_512_512.png", ann)
    return tmp_path, ann


def test_mmseg_png_layout_shifts_classes_by_one(mmseg_root):
    root, _ = mmseg_root
    ds = get_dataset("potsdam3", root)
    assert ds.split == "val"
    # 0 boundary, 1-6 = the six classes in IIC's order, 255 ignore
    want = [None] + [group for _, group in SIX] + [None]
    assert named(ds, ds.load_mask(0)) == want


def test_mmseg_png_layout_without_zero_label(mmseg_root):
    root, ann = mmseg_root
    write_labels(root / "ann_dir" / "val" / "2_10_0_0_512_512.png", np.where(ann == 6, 255, ann))
    ds = get_dataset("potsdam3", root, reduce_zero_label=False)
    want = [group for _, group in SIX] + [None, None]
    assert named(ds, ds.load_mask(0)) == want
    write_labels(root / "ann_dir" / "val" / "2_10_0_0_512_512.png", ann)
    with pytest.raises(DatasetError, match=r"\[6\]"):
        ds.load_mask(0)


def test_isprs_rgb_label_png_is_read_by_colour(tmp_path):
    # ISPRS's colour code: impervious white, building blue, low vegetation cyan, tree green, car yellow, clutter red,
    # black boundary; then a reddish colour off the palette, nearest clutter's red
    rgb = np.array([[(255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0)],
                    [(255, 255, 0), (255, 0, 0), (0, 0, 0), (230, 20, 10)]], np.uint8)
    write_image(tmp_path / "img_dir" / "a.png", 2, 4)
    write_rgb_mask(tmp_path / "ann_dir" / "a.png", rgb)
    with pytest.raises(DatasetError, match=r"a.png has 1 pixel\(s\) \(12.50 %\) off the 'potsdam3' palette"):
        get_dataset("potsdam3", tmp_path).load_mask(0)
    want = [group for _, group in SIX] + [None]
    for policy, last in (("nearest", BUILDINGS), ("ignore", None)):
        ds = get_dataset("potsdam3", tmp_path, off_palette=policy)
        assert named(ds, ds.load_mask(0)) == want + [last]


def test_real_potsdam_tile_has_three_classes_and_red_roofs():
    root = shared_data("potsdam_sample")
    ds = get_dataset("potsdam3", root)
    assert ds.split == "all" and len(ds) == 1
    raw = np.asarray(Image.open(ds.samples[0].mask)).astype(int)
    mask = ds.load_mask(0)
    assert set(np.unique(mask)) == {0, 1, 2, 255}
    group = {0: None, 1: ROADS, 2: BUILDINGS, 3: VEGETATION, 4: VEGETATION, 5: ROADS, 6: BUILDINGS}
    assert named(ds, mask) == [group[v] for v in raw.ravel()]
    # the label encoding is right if the class holding buildings is the one with the tile's red-tiled roofs
    rgb = np.asarray(ds.load_image(0)).astype(float)
    redness = {c: (rgb[mask == c, 0] - rgb[mask == c, 2]).mean() for c in range(3)}
    assert max(redness, key=redness.get) == ds.class_names.index(BUILDINGS)
    assert redness[ds.class_names.index(BUILDINGS)] > 30
