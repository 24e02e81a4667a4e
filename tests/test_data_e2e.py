"""`ssl-segbench run` end to end on every dataset id, each on a fixture in its native layout, with a tiny backbone."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from fixtures_data import write_image, write_labels, write_rgb_mask

from ssl_segbench.cli import main
from ssl_segbench.data import DATASETS
from ssl_segbench.records import iter_records

H, W = 24, 40


def _labels(num_classes: int, seed: int, ignore: int | None = 255) -> np.ndarray:
    lab = np.random.default_rng(seed).integers(0, num_classes, size=(H, W))
    if ignore is not None:
        lab[0] = ignore
    return lab


def _suim(root):
    for k, (split, stem) in enumerate((("TEST", "t1"), ("TEST", "t2"), ("train_val", "a1"), ("train_val", "a2"))):
        write_image(root / split / "images" / f"{stem}.jpg", H, W, seed=k)
        lab = _labels(8, k, None)
        bits = np.stack([(lab >> 2) & 1, (lab >> 1) & 1, lab & 1], -1) * 255
        write_rgb_mask(root / split / "masks" / f"{stem}.bmp", bits)


def _coco(root):
    for split, stems in (("val2017", ["000000000001", "000000000002"]), ("train2017", ["000000000003"])):
        for k, stem in enumerate(stems):
            write_image(root / "images" / split / f"{stem}.jpg", H, W, seed=k)
            write_labels(root / "annotations" / split / f"{stem}.png", _labels(182, k))
            write_labels(root / "annotations" / f"stuff_{split}_pixelmaps" / f"{stem}.png",
                         np.random.default_rng(k).integers(92, 184, size=(H, W)))
        (root / "curated" / split).mkdir(parents=True)
        (root / "curated" / split / "Coco164kFull_Stuff_Coarse_7.txt").write_text("\n".join(stems) + "\n")


def _voc(root):
    voc = root / "VOCdevkit" / "VOC2012"
    for k, stem in enumerate(("2007_000032", "2007_000033", "2007_000034")):
        write_image(voc / "JPEGImages" / f"{stem}.jpg", H, W, seed=k)
        write_labels(voc / "SegmentationClass" / f"{stem}.png", _labels(21, k))
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n2007_000034\n")


def _voc_rgb(root):
    from ssl_segbench.data import voc_palette

    for k in range(2):
        write_image(root / f"{k}_image.png", H, W, seed=k)
        write_rgb_mask(root / f"{k}_target.png", voc_palette(21)[_labels(21, k, None)])


def _cityscapes(root):
    for split in ("train", "val"):
        for k in range(2):
            stem = f"aachen_00000{k}_000019"
            write_image(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png", H, W, seed=k)
            write_labels(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png", _labels(34, k, None))


def _potsdam(root):
    for split in ("train", "val"):
        for k in range(2):
            write_image(root / "img_dir" / split / f"2_1{k}_0_0_512_512.png", H, W, seed=k)
            write_labels(root / "ann_dir" / split / f"2_1{k}_0_0_512_512.png", _labels(7, k, None))


def _ade(root):
    data = root / "ADEChallengeData2016"
    for sub in ("training", "validation"):
        for k in range(2):
            write_image(data / "images" / sub / f"ADE_{sub}_{k}.jpg", H, W, seed=k)
            write_labels(data / "annotations" / sub / f"ADE_{sub}_{k}.png", _labels(151, k, None))


def _camvid(root):
    for split in ("train", "val", "test"):
        for k in range(2):
            write_image(root / split / f"0001TP_00{k}.png", H, W, seed=k)
            write_labels(root / f"{split}annot" / f"0001TP_00{k}.png", _labels(12, k, None))


def _folder(root):
    (root / "classes.yaml").write_text(yaml.safe_dump({"names": ["a", "b", "c"], "ignore_index": 255}))
    for k in range(3):
        write_image(root / "images" / f"im{k}.png", H, W, seed=k)
        write_labels(root / "masks" / f"im{k}.png", _labels(3, k))


def _hf(root):
    import datasets
    from PIL import Image

    def split(n, seed):
        rng = np.random.default_rng(seed)
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in range(n)],
             "mask": [Image.fromarray(_labels(3, seed + k).astype(np.uint8)) for k in range(n)]},
            features=datasets.Features({"image": datasets.Image(), "mask": datasets.Image()}))

    datasets.DatasetDict({"train": split(2, 0), "validation": split(2, 5)}).save_to_disk(str(root))
    (root / "classes.yaml").write_text(yaml.safe_dump({"names": ["a", "b", "c"]}))


BUILDERS = {"synthetic": _suim, "suim": _suim, "suim-coarse": _suim, "cocostuff27": _coco,
            "cocostuff27-stuff15": _coco, "cocostuff27-things12": _coco, "cocostuff15-leopart": _coco, "voc": _voc,
            "voc-rgb": _voc_rgb, "cityscapes27": _cityscapes, "cityscapes19": _cityscapes, "potsdam3": _potsdam,
            "ade20k": _ade, "camvid": _camvid, "folder": _folder, "hf:acme/tiny": _hf}


def test_every_registered_dataset_has_an_end_to_end_case():
    assert set(DATASETS) <= set(BUILDERS)


@pytest.mark.parametrize("dataset_id", sorted(BUILDERS))
def test_run_end_to_end(dataset_id, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    BUILDERS[dataset_id](root)
    options = ["-o", "image_column=image", "-o", "mask_column=mask"] if dataset_id.startswith("hf:") else []
    code = main(["run", "--backbone", "pixels", "--dataset", dataset_id, "--data-root", str(root), "--size", "32",
                 "--protocol", "kmeans,linear", "--seeds", "1", "--param", "kmeans.k=2", "--param", "linear.epochs=1",
                 "--results-dir", str(tmp_path / "res"), *options])
    assert code == 0
    recs = [r for _, r in iter_records(tmp_path / "res")]
    assert sorted(r.protocol["name"] for r in recs) == ["kmeans", "linear"]
    for r in recs:
        assert r.dataset["n_images"] >= 1 and 0.0 <= r.metrics["pixel_acc"]["mean"] <= 1.0
