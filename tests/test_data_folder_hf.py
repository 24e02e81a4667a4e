"""User data: the `folder` dataset and Hugging Face `datasets` sources (`hf:<org>/<name>`), all offline."""
import datasets
import numpy as np
import pytest
import yaml
from fixtures_data import write_image, write_labels, write_rgb_mask
from PIL import Image

from ssl_segbench.data import DatasetError, get_dataset

LABELS = np.array([[0, 1, 2], [2, 1, 255]])
PALETTE = [[10, 10, 10], [200, 0, 0], [0, 0, 200]]


def write_classes(path, **extra):
    path.write_text(yaml.safe_dump({"names": ["ground", "car", "sky"], **extra}))
    return path


def test_folder_integer_and_palette_masks(tmp_path):
    write_classes(tmp_path / "classes.yaml")
    for name, palette in (("grey", None), ("pal", PALETTE + [[0, 0, 0]] * 253)):
        write_image(tmp_path / "images" / f"{name}.jpg", *LABELS.shape)
        write_labels(tmp_path / "masks" / f"{name}.png", LABELS, palette=palette)
    ds = get_dataset("folder", tmp_path)
    assert ds.split == "all" and [s.name for s in ds.samples] == ["grey", "pal"]
    for i in range(2):
        np.testing.assert_array_equal(ds.load_mask(i), LABELS)


def test_folder_rgb_masks_with_palette_and_splits(tmp_path):
    write_classes(tmp_path / "classes.yaml", palette=PALETTE, ignore_index=255)
    rgb = np.array([[PALETTE[v] for v in row] for row in [[0, 1, 2], [2, 1, 0]]], np.uint8)
    for split in ("train", "val"):
        write_image(tmp_path / split / "images" / "a.png", 2, 3)
        write_rgb_mask(tmp_path / split / "masks" / "a.png", rgb)
    ds = get_dataset("folder", tmp_path)
    assert ds.split == "val"
    assert ds.load_mask(0).tolist() == [[0, 1, 2], [2, 1, 0]]
    assert ds.palette.tolist() == PALETTE
    rgb[0, 0] = (1, 2, 3)
    write_rgb_mask(tmp_path / "val" / "masks" / "a.png", rgb)
    with pytest.raises(DatasetError, match=r"a.png has 1 pixel\(s\) \(16.67 %\) off the 'folder' palette"):
        ds.load_mask(0)
    # (1, 2, 3) is nearest ground's (10, 10, 10)
    assert get_dataset("folder", tmp_path, off_palette="nearest").load_mask(0).tolist() == [[0, 1, 2], [2, 1, 0]]
    assert get_dataset("folder", tmp_path, off_palette="ignore").load_mask(0).tolist() == [[255, 1, 2], [2, 1, 0]]
    grey = tmp_path / "grey"  # without a palette nothing is decoded by colour: the option is refused, not ignored
    write_image(grey / "images" / "a.png", *LABELS.shape)
    write_classes(grey / "classes.yaml")
    write_labels(grey / "masks" / "a.png", LABELS)
    with pytest.raises(DatasetError, match="off_palette=ignore does not apply to 'folder' here"):
        get_dataset("folder", grey, off_palette="ignore")


def test_folder_classes_file_may_live_elsewhere_and_is_validated(tmp_path):
    write_image(tmp_path / "data" / "images" / "a.png", *LABELS.shape)
    write_labels(tmp_path / "data" / "masks" / "a.png", LABELS)
    with pytest.raises(DatasetError, match="no classes.yaml"):
        get_dataset("folder", tmp_path / "data")
    ds = get_dataset("folder", tmp_path / "data", classes=write_classes(tmp_path / "mine.yaml"))
    assert ds.class_names == ("ground", "car", "sky")
    with pytest.raises(DatasetError, match="also a class index"):
        get_dataset("folder", tmp_path / "data", classes=write_classes(tmp_path / "bad.yaml", ignore_index=1))
    write_labels(tmp_path / "data" / "masks" / "a.png", np.full_like(LABELS, 3))
    with pytest.raises(DatasetError, match=r"values \[3\] outside 0..2"):
        ds.load_mask(0)


# --- Hugging Face ------------------------------------------------------------------------------------------------


def hf_split(n: int, seed: int):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (2, 3, 3), dtype=np.uint8)) for _ in range(n)]
    masks = [Image.fromarray(np.roll(LABELS, k).astype(np.uint8)) for k in range(n)]
    features = datasets.Features({"pixel_values": datasets.Image(), "label": datasets.Image(),
                                  "file": datasets.Value("string")})
    return datasets.Dataset.from_dict({"pixel_values": images, "label": masks,
                                       "file": [f"img{seed}_{k}" for k in range(n)]}, features=features), images


@pytest.fixture
def saved(tmp_path):
    train, _ = hf_split(3, 0)
    val, val_images = hf_split(2, 1)
    root = tmp_path / "saved"
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(root))
    write_classes(root / "classes.yaml")
    return root, val_images


OPTS = {"image_column": "pixel_values", "mask_column": "label"}


def test_hf_save_to_disk_copy(saved):
    root, val_images = saved
    ds = get_dataset("hf:acme/streets", root, **OPTS)
    assert ds.id == "hf:acme/streets" and ds.split == "validation" and ds.train_split == "train"
    assert [s.name for s in ds.samples] == ["000000", "000001"]
    for k in range(2):
        np.testing.assert_array_equal(ds.load_mask(k), np.roll(LABELS, k))
        assert np.asarray(ds.load_image(k)).tolist() == np.asarray(val_images[k]).tolist()
    assert any("load_from_disk" in n for n in ds.notes)
    again = get_dataset("hf:acme/streets", root, "val", **OPTS)
    assert again.split == "validation" and again.content_sha256() == ds.content_sha256()
    assert get_dataset("hf:acme/streets", root, "train", **OPTS).content_sha256() != ds.content_sha256()
    named = get_dataset("hf:acme/streets", root, "train", name_column="file", **OPTS)
    assert [s.name for s in named.samples] == ["img0_0", "img0_1", "img0_2"]


def test_hf_missing_column_is_named(saved):
    root, _ = saved
    with pytest.raises(DatasetError, match=r"no column\(s\) \['mask'\].*pixel_values"):
        get_dataset("hf:acme/streets", root, image_column="pixel_values")


def test_hf_rgb_masks_off_the_palette_are_refused_or_mapped(tmp_path):
    rgb = np.array([[PALETTE[v] for v in row] for row in [[0, 1, 2], [2, 1, 0]]], np.uint8)
    rgb[1, 2] = (190, 20, 0)  # nearest car's (200, 0, 0)
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    split = datasets.Dataset.from_dict({"image": [Image.fromarray(rgb)], "mask": [Image.fromarray(rgb)]},
                                       features=features)
    root = tmp_path / "rgb"
    datasets.DatasetDict({"validation": split}).save_to_disk(str(root))
    write_classes(root / "classes.yaml", palette=PALETTE)
    with pytest.raises(DatasetError, match=r"1 mask\(s\) of 'hf:acme/rgb' .* 1 pixel\(s\) off the palette"):
        get_dataset("hf:acme/rgb", root).content_sha256()
    ignoring = get_dataset("hf:acme/rgb", root, off_palette="ignore")
    assert ignoring.load_mask(0).tolist() == [[0, 1, 2], [2, 1, 255]]
    assert ignoring.describe()["off_palette"]["pixels"] == 1
    assert get_dataset("hf:acme/rgb", root, off_palette="nearest").load_mask(0).tolist() == [[0, 1, 2], [2, 1, 1]]


def test_hf_local_copy_of_a_hub_repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    val, _ = hf_split(2, 1)
    val.to_parquet(str(repo / "data" / "validation-00000-of-00001.parquet"))
    classes = write_classes(tmp_path / "classes.yaml")
    ds = get_dataset("hf:acme/streets", repo, classes=classes, cache_dir=tmp_path / "cache", revision="abc123", **OPTS)
    assert ds.split == "validation" and len(ds) == 2
    np.testing.assert_array_equal(ds.load_mask(1), np.roll(LABELS, 1))


def test_hf_hub_needs_a_pinned_revision_and_passes_it(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="needs revision="):
        get_dataset("hf:acme/streets", None, classes=["ground", "car", "sky"], **OPTS)
    val, _ = hf_split(2, 1)
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.DatasetDict({"validation": val})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = get_dataset("hf:acme/streets", None, classes=["ground", "car", "sky"], revision="0123abc",
                     cache_dir=tmp_path, **OPTS)
    assert calls[0][0] == "acme/streets" and calls[0][1]["revision"] == "0123abc"
    assert any("revision=0123abc" in n for n in ds.notes)
    np.testing.assert_array_equal(ds.load_mask(0), LABELS)


def test_hf_unreachable_hub_is_a_dataset_error(monkeypatch):
    def offline(path, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetError, match="HF_DATASETS_OFFLINE"):
        get_dataset("hf:acme/streets", None, classes=["a", "b"], revision="x", **OPTS)
