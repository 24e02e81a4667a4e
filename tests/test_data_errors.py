"""Bad input is named, never skipped silently; skip_bad leaves it out and counts it."""
import numpy as np
import pytest
from fixtures_data import write_image, write_labels, write_rgb_mask

from ssl_segbench.data import DatasetError, get_dataset

WHITE = np.full((2, 3, 3), 255, np.uint8)


@pytest.fixture
def suim_root(tmp_path):
    for name in ("a", "b", "c"):
        write_image(tmp_path / "TEST" / "images" / f"{name}.jpg", 2, 3)
        write_rgb_mask(tmp_path / "TEST" / "masks" / f"{name}.bmp", WHITE)
    return tmp_path


def test_missing_mask_names_the_image_and_the_way_out(suim_root):
    (suim_root / "TEST" / "masks" / "b.bmp").unlink()
    with pytest.raises(DatasetError, match=r"(?s)b.jpg has no mask in .*masks.*--skip-bad"):
        get_dataset("suim", suim_root)
    ds = get_dataset("suim", suim_root, skip_bad=True)
    assert [s.name for s in ds.samples] == ["a", "c"]
    info = ds.describe()
    assert info["n_skipped"] == 1 and info["skipped"] == ["b"] and info["n_images"] == 2


def test_corrupt_image_is_named_and_can_be_skipped(suim_root):
    (suim_root / "TEST" / "images" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    ds = get_dataset("suim", suim_root)
    with pytest.raises(DatasetError, match=r"cannot read image .*a.jpg"):
        ds.load_image(0)
    with pytest.raises(DatasetError, match=r"cannot read image .*a.jpg"):
        ds.load_mask(0)  # needs the image size
    skipping = get_dataset("suim", suim_root, skip_bad=True)
    assert [s.name for s in skipping.samples] == ["b", "c"] and skipping.describe()["n_skipped"] == 1
    assert skipping.content_sha256() != ds.content_sha256()


def test_truncated_image_is_caught_when_decoded(suim_root):
    path = suim_root / "TEST" / "images" / "c.jpg"
    path.write_bytes(path.read_bytes()[:-40])
    ds = get_dataset("suim", suim_root)
    with pytest.raises(DatasetError, match="c.jpg"):
        ds.load_image(2)
    assert len(get_dataset("suim", suim_root, skip_bad=True)) == 2


def test_corrupt_mask_is_named(suim_root):
    (suim_root / "TEST" / "masks" / "c.bmp").write_bytes(b"BM garbage")
    with pytest.raises(DatasetError, match=r"cannot read mask .*c.bmp"):
        get_dataset("suim", suim_root).load_mask(2)


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "TEST" / "images").mkdir(parents=True)
    (tmp_path / "TEST" / "masks").mkdir()
    with pytest.raises(DatasetError, match="split 'test' of 'suim' .* has no images"):
        get_dataset("suim", tmp_path)


def test_all_bad_under_skip_bad_is_still_an_empty_split(suim_root):
    for name in ("a", "b", "c"):
        (suim_root / "TEST" / "masks" / f"{name}.bmp").unlink()
    with pytest.raises(DatasetError, match=r"has no images \(3 bad sample\(s\) skipped\)"):
        get_dataset("suim", suim_root, skip_bad=True)


def test_missing_split_lists_what_is_there(suim_root):
    with pytest.raises(DatasetError, match="split 'train' .* available here: test"):
        get_dataset("suim", suim_root, "train")


def test_mask_of_wrong_size_is_an_error_where_pairs_always_match(tmp_path):
    for name, shape in (("a", (2, 3)), ("b", (3, 3))):
        write_image(tmp_path / "val" / f"{name}.png", 2, 3)
        write_labels(tmp_path / "valannot" / f"{name}.png", np.zeros(shape))
    ds = get_dataset("camvid", tmp_path)
    with pytest.raises(DatasetError, match=r"b.png is 3x3 but its image .* is 3x2: they do not belong together"):
        ds.load_mask(1)
    assert [s.name for s in get_dataset("camvid", tmp_path, skip_bad=True).samples] == ["a"]


def test_unknown_dataset_and_option_are_named(suim_root, tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="unknown dataset 'nope'.*cityscapes27"):
        get_dataset("nope", suim_root)
    with pytest.raises(DatasetError, match=r"takes no option\(s\) \['curated_list'\]; it takes: skip_bad"):
        get_dataset("suim", suim_root, curated_list="x")
    monkeypatch.setenv("SSL_SEGBENCH_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match=r"'voc' not found: no --data-root given and .*nowhere/voc does not exist"):
        get_dataset("voc", None)


def test_describe_carries_version_and_skips(suim_root):
    info = get_dataset("suim", suim_root).describe()
    assert info["version"] >= 1 and info["n_skipped"] == 0 and info["skipped"] == []
