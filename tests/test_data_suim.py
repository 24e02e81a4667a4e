"""SUIM and its DatUS² coarse view: 24-bit BMP colour masks read bit by bit."""
import numpy as np
import pytest
from fixtures_data import shared_data, write_image, write_rgb_mask

from ssl_segbench.data import DatasetError, get_dataset

# one pixel per class colour, then the same classes with compression-like noise on every channel (each channel within
# 63 levels of 0 or 255), then the same classes in colours near none of the eight (a channel in 64..191)
COLOURS = [(0, 0, 0), (0, 0, 255), (0, 255, 0), (0, 255, 255), (255, 0, 0), (255, 0, 255), (255, 255, 0),
           (255, 255, 255)]
NOISY = [(20, 9, 63), (3, 30, 240), (12, 200, 40), (0, 192, 250), (251, 60, 0), (230, 2, 240), (199, 255, 30),
         (228, 210, 200)]
AMBIGUOUS = [(20, 9, 100), (3, 30, 140), (12, 200, 127), (0, 129, 250), (251, 60, 0), (130, 2, 240), (199, 128, 90),
             (128, 160, 200)]
FINE = ["BW", "HD", "PF", "WR", "RO", "RI", "FV", "SR"]
COARSE = ["BW+PF+SR", "HD", "BW+PF+SR", "WR", "RO", "RI", "FV", "BW+PF+SR"]


@pytest.fixture
def suim_root(tmp_path):
    rgb = np.array([COLOURS, NOISY], dtype=np.uint8)  # 2 x 8
    write_image(tmp_path / "TEST" / "images" / "a.jpg", 2, 8)
    write_rgb_mask(tmp_path / "TEST" / "masks" / "a.bmp", rgb)
    write_image(tmp_path / "train_val" / "images" / "b.jpg", 2, 8)
    write_rgb_mask(tmp_path / "train_val" / "masks" / "b.bmp", rgb)
    return tmp_path


def names(ds, mask):
    return [[ds.class_names[v] for v in row] for row in mask]


def test_suim_fine_classes_from_bits(suim_root):
    ds = get_dataset("suim", suim_root)
    assert ds.split == "test" and len(ds) == 1
    assert names(ds, ds.load_mask(0)) == [FINE, FINE]
    assert get_dataset("suim", suim_root, "train").samples[0].name == "b"


def test_suim_coarse_groups_background_plants_and_seafloor(suim_root):
    ds = get_dataset("suim-coarse", suim_root)
    assert ds.class_names == ("HD", "RO", "FV", "RI", "WR", "BW+PF+SR")
    assert names(ds, ds.load_mask(0)) == [COARSE, COARSE]
    assert ds.palette.shape == (6, 3)
    assert ds.palette[ds.class_names.index("HD")].tolist() == [0, 0, 255]


def test_suim_colours_near_no_palette_colour_are_refused_or_mapped_as_asked(tmp_path):
    write_image(tmp_path / "images" / "a.jpg", 1, 8)
    write_rgb_mask(tmp_path / "masks" / "a.bmp", np.array([AMBIGUOUS], np.uint8))
    off = [c != (251, 60, 0) for c in AMBIGUOUS]  # the only one with every channel within 63 of 0 or 255
    with pytest.raises(DatasetError, match=r"a.bmp has 7 pixel\(s\) \(87.50 %\) off the 'suim' palette.*"
                                           "off_palette=nearest.*off_palette=ignore"):
        get_dataset("suim", tmp_path).load_mask(0)
    nearest = get_dataset("suim", tmp_path, off_palette="nearest")
    assert names(nearest, nearest.load_mask(0)) == [FINE]  # each channel read at 128: the nearest of the eight
    ignoring = get_dataset("suim", tmp_path, off_palette="ignore")
    assert ignoring.load_mask(0).tolist() == [[255 if o else FINE.index(c) for o, c in zip(off, FINE)]]
    assert nearest.describe()["off_palette"] == {"policy": "nearest", "rule": nearest.off_palette_rule, "pixels": 7,
                                                 "n_masks": 1, "masks": ["a"]}
    assert len({nearest.content_sha256(), ignoring.content_sha256()}) == 2  # the choice is part of the identity


def test_suim_mask_of_other_size_is_an_error_or_resized_when_asked(tmp_path):
    write_image(tmp_path / "images" / "a.jpg", 4, 4)
    write_rgb_mask(tmp_path / "masks" / "a.bmp", np.full((2, 2, 3), 255, np.uint8))
    ds = get_dataset("suim", tmp_path)
    with pytest.raises(DatasetError, match=r"(?s)a.bmp is 2x2 but its image .*a.jpg is 4x4.*resize_masks=true"):
        ds.load_mask(0)
    resizing = get_dataset("suim", tmp_path, resize_masks=True)
    mask, resized = resizing.load_mask_checked(0)
    assert resized and mask.shape == (4, 4) and (mask == FINE.index("SR")).all()
    assert resizing.content_sha256() != ds.content_sha256()  # decoding options are part of the identity


def test_real_suim_d_r_47_has_exactly_bw_hd_ro_ri():
    ds = get_dataset("suim", shared_data("suim_sample"))
    i = [s.name for s in ds.samples].index("d_r_47_")
    mask = ds.load_mask(i)
    assert mask.shape == (448, 480)
    assert {ds.class_names[v] for v in np.unique(mask)} == {"BW", "HD", "RO", "RI"}
    coarse = get_dataset("suim-coarse", shared_data("suim_sample"))
    assert {coarse.class_names[v] for v in np.unique(coarse.load_mask(i))} == {"BW+PF+SR", "HD", "RO", "RI"}
