"""Issue 19: mask pixels off the palette are refused by `run` unless -o off_palette=nearest|ignore maps them (then the
record says so, with the counts), and synthetic generation on a full disk is a one-line error that leaves nothing a
later run would take as complete."""
from __future__ import annotations

import argparse
import json
import resource

import numpy as np
import pytest
from fixtures_data import shared_data, write_image, write_rgb_mask
from rich.console import Console
from test_refusals import _cli

from ssl_segbench.data import DatasetError, get_dataset
from ssl_segbench.data.check import run_list

SIDE = 128  # images and masks 128×128, run at --size 128: labels are scored at the mask's own pixels
BLOCK = (100, 50, 200)  # R = 100 is more than 63 levels from 0 and from 255: near none of SUIM's eight colours
BW, HD, SR = 0, 1, 7  # SUIM class indices of black, blue and white


def _suim_with_block(root):
    """Two SUIM test pairs: left half black (BW), right half white (SR); b.bmp also holds a 100×100 block of BLOCK at
    rows 10..109, columns 20..119 (44 of its columns on black, 56 on white)."""
    for i, name in enumerate(("a", "b")):
        write_image(root / "TEST" / "images" / f"{name}.jpg", SIDE, SIDE, seed=i)
        mask = np.zeros((SIDE, SIDE, 3), np.uint8)
        mask[:, 64:] = 255
        if name == "b":
            mask[10:110, 20:120] = BLOCK
        write_rgb_mask(root / "TEST" / "masks" / f"{name}.bmp", mask)
    return root


def _run(tmp_path, data, *extra):
    return _cli(tmp_path, "run", "--backbone", "pixels", "--dataset", "suim", "--data-root", str(data), "--size",
                str(SIDE), "--protocol", "kmeans", "--seeds", "1", "--results-dir", str(tmp_path / "res"), *extra)


def _records(tmp_path):
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "res").rglob("*.json"))]


def _class_pixels(record) -> list[int]:
    """Scored pixels per ground-truth class: the row sums of the (class × cluster) confusion of the one seed."""
    return np.asarray(record["confusions"][0]).sum(1).tolist()


def test_off_palette_block_is_refused_with_count_and_file_and_nothing_written(tmp_path):
    data = _suim_with_block(tmp_path / "suim")
    rc, err = _run(tmp_path, data)
    assert rc == 2 and "Traceback" not in err and err.count("error:") == 1
    assert "1 mask(s)" in err and "10000 pixel(s)" in err and "b.bmp (10000 pixels)" in err and "a.bmp" not in err
    assert "-o off_palette=nearest" in err and "-o off_palette=ignore" in err
    assert not (tmp_path / "res").exists()  # no record
    assert not list((tmp_path / "cache").rglob("meta.json")), "a cache entry (labels or features) was made"
    assert not list((tmp_path / "cache").rglob("*.partial"))


def test_ignore_and_nearest_map_the_block_as_hand_computed_under_different_keys(tmp_path):
    data = _suim_with_block(tmp_path / "suim")
    half = SIDE * SIDE // 2  # each mask's black half and white half
    # ignore: the block's pixels are not scored
    rc, err = _run(tmp_path, data, "-o", "off_palette=ignore")
    assert rc == 0, err
    [ignored] = _records(tmp_path)
    expected = [0] * 8
    expected[BW], expected[SR] = 2 * half - 100 * 44, 2 * half - 100 * 56
    assert _class_pixels(ignored) == expected and sum(expected) == 2 * SIDE * SIDE - 10_000
    assert ignored["dataset"]["off_palette"] == {"policy": "ignore", "rule": ignored["dataset"]["off_palette"]["rule"],
                                                 "pixels": 10_000, "n_masks": 1, "masks": ["b"]}
    # nearest: (100, 50, 200) is nearest blue (0, 0, 255) of the eight colours: the block is HD, 10000 pixels
    rc, err = _run(tmp_path, data, "-o", "off_palette=nearest")
    assert rc == 0, err
    [nearest] = [r for r in _records(tmp_path) if r["key"] != ignored["key"]]
    expected[HD] = 10_000
    assert _class_pixels(nearest) == expected
    assert nearest["dataset"]["off_palette"]["policy"] == "nearest" and nearest["dataset"]["off_palette"]["pixels"] \
        == 10_000
    assert nearest["identity"]["content_sha256"] != ignored["identity"]["content_sha256"]


def test_every_colour_decoder_refuses_split_wide_naming_the_first_masks_and_how_many(tmp_path):
    """One mechanism for SUIM, its coarse view, VOC renderings, user palettes and ISPRS's Potsdam colours: 7 dirty
    masks, 5 named, 2 more."""
    folder_palette = [[10, 10, 10], [200, 0, 0], [0, 0, 200]]
    layouts = {
        "suim": (lambda r, n: (r / "images" / f"{n}.jpg", r / "masks" / f"{n}.bmp"), (0, 0, 0), BLOCK),
        "suim-coarse": (lambda r, n: (r / "images" / f"{n}.jpg", r / "masks" / f"{n}.bmp"), (0, 0, 0), BLOCK),
        "voc-rgb": (lambda r, n: (r / f"{n}_image.png", r / f"{n}_target.png"), (128, 0, 0), (120, 10, 5)),
        "folder": (lambda r, n: (r / "images" / f"{n}.png", r / "masks" / f"{n}.png"), (200, 0, 0), (1, 2, 3)),
        "potsdam3": (lambda r, n: (r / "img_dir" / f"{n}.png", r / "ann_dir" / f"{n}.png"), (0, 0, 255), (9, 9, 240)),
    }
    for dataset_id, (paths, good, bad) in layouts.items():
        root = tmp_path / dataset_id
        if dataset_id == "folder":
            root.mkdir()
            (root / "classes.yaml").write_text(json.dumps({"names": ["g", "c", "s"], "palette": folder_palette}))
        for k in range(8):
            image, mask = paths(root, f"m{k}")
            write_image(image, 4, 4)
            rgb = np.full((4, 4, 3), good, np.uint8)
            rgb.reshape(-1, 3)[:k] = bad  # mask k has k off-palette pixels
            write_rgb_mask(mask, rgb)
        ds = get_dataset(dataset_id, root)
        with pytest.raises(DatasetError) as e:
            ds.content_sha256()
        msg = str(e.value)
        assert f"7 mask(s) of '{dataset_id}'" in msg and f"{sum(range(8))} pixel(s) off the palette" in msg
        assert all(f"{paths(root, f'm{k}')[1]} ({k} pixels)" in msg for k in range(1, 6)) and "and 2 more" in msg
        assert "m0" not in msg and "off_palette=ignore" in msg
        for policy in ("nearest", "ignore"):
            mapped = get_dataset(dataset_id, root, off_palette=policy)
            assert mapped.describe()["off_palette"]["pixels"] == sum(range(8))
            assert mapped.describe()["off_palette"]["masks"] == [f"m{k}" for k in range(1, 8)]


def test_skip_bad_leaves_dirty_masks_out_and_the_rest_is_not_refused(tmp_path):
    data = _suim_with_block(tmp_path / "suim")
    ds = get_dataset("suim", data, skip_bad=True)
    assert [s.name for s in ds.samples] == ["a"] and ds.skipped[0][0] == "b" and "10000 pixel(s)" in ds.skipped[0][1]
    assert ds.describe()["off_palette"]["pixels"] == 0


def test_real_suim_and_voc_samples_are_clean():
    for dataset_id, name, n in (("suim", "suim_sample", 8), ("suim-coarse", "suim_sample", 8),
                                ("voc-rgb", "voc_sample", 14)):
        ds = get_dataset(dataset_id, shared_data(name))
        assert len(ds) == n and ds.off_palette_pixels() == {}
        ds.content_sha256()  # not refused
        assert ds.describe()["off_palette"] == {"policy": "refuse", "rule": ds.off_palette_rule, "pixels": 0,
                                                "n_masks": 0, "masks": []}


def test_the_option_is_listed_and_refused_where_nothing_is_decoded_by_colour(tmp_path):
    console = Console(width=400, record=True)
    run_list(argparse.Namespace(), console)
    rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if line.count("│") > 3}
    for dataset_id in ("suim", "suim-coarse", "synthetic", "voc", "voc-rgb", "folder", "potsdam3"):
        assert "off_palette=refuse|nearest|ignore" in rows[dataset_id], dataset_id
    for dataset_id in ("cityscapes27", "ade20k", "camvid"):
        assert "off_palette" not in rows[dataset_id], dataset_id
    with pytest.raises(DatasetError, match=r"'camvid' takes no option\(s\) \['off_palette'\]"):
        get_dataset("camvid", tmp_path, off_palette="nearest")
    with pytest.raises(DatasetError, match=r"off_palette='closest'.*refuse\|nearest\|ignore"):
        get_dataset("suim", _suim_with_block(tmp_path / "suim"), off_palette="closest")


# --- synthetic generation on a full disk ----------------------------------------------------------------------------

def test_synthetic_generation_on_a_full_disk_is_one_line_and_a_rerun_completes(tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # a 256×192 mask BMP is 147 kB

    data = tmp_path / "cache" / "data"
    rc, err = _cli(tmp_path, "datasets", "check", "--dataset", "synthetic", preexec_fn=limit)
    assert rc == 2 and "Traceback" not in err and err.startswith("error: could not write")
    assert str(data / "synthetic-v1") in err and "File too large" in err and "SSL_SEGBENCH_CACHE" in err
    assert sorted(p.name for p in data.iterdir()) == ["synthetic-v1.lock"]  # no root, no temporary folder
    rc, err = _cli(tmp_path, "datasets", "check", "--dataset", "synthetic")
    assert rc == 0, err
    root = data / "synthetic-v1"
    assert (root / ".complete").is_file()
    for split, n in (("train_val", 120), ("TEST", 60)):
        assert len(list((root / split / "images").glob("*.jpg"))) == n
        assert len(list((root / split / "masks").glob("*.bmp"))) == n


def test_synthetic_generation_clears_what_a_killed_generator_left(tmp_path):
    from ssl_segbench.data.synthetic import generate_synthetic

    root = tmp_path / "synthetic"
    (tmp_path / "synthetic.tmp-killed" / "TEST").mkdir(parents=True)  # a generator killed while writing
    (root / "TEST" / "images").mkdir(parents=True)  # a root with no .complete marker
    generate_synthetic(root, n_train=2, n_test=1, size=(32, 16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic", "synthetic.lock"]
    assert sorted(p.name for p in (root / "TEST" / "images").iterdir()) == ["syn_test_00000.jpg"]
    assert get_dataset("synthetic", root, "train").off_palette_pixels() == {}  # generated masks are on the palette


def test_synthetic_generation_into_an_unwritable_place_names_it(tmp_path):
    (tmp_path / "blocker").write_text("a file where the cache's folder would go")
    rc, err = _cli(tmp_path, "datasets", "check", "--dataset", "synthetic",
                   env={"SSL_SEGBENCH_CACHE": str(tmp_path / "blocker" / "cache")})
    assert rc == 2 and "Traceback" not in err and str(tmp_path / "blocker" / "cache" / "data" / "synthetic-v1") in err


def test_the_scan_is_remembered_by_content_and_a_repainted_mask_is_read_again(tmp_path, monkeypatch):
    """A second dataset object over the same files answers from the cache without decoding a mask; repainting the
    block onto the palette changes the content digest, so the masks are decoded again and the split is clean."""
    from ssl_segbench.data.suim import SUIM

    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    data = _suim_with_block(tmp_path / "suim")
    first = get_dataset("suim", data, off_palette="ignore")
    assert first.off_palette_pixels() == {"b": 10000}
    reads = []
    real = SUIM._read_mask
    monkeypatch.setattr(SUIM, "_read_mask", lambda self, s: reads.append(s.name) or real(self, s))
    again = get_dataset("suim", data, off_palette="ignore")
    assert again.off_palette_pixels() == {"b": 10000} and reads == []
    repainted = np.zeros((SIDE, SIDE, 3), np.uint8)
    repainted[:, 64:] = 255
    write_rgb_mask(data / "TEST" / "masks" / "b.bmp", repainted)
    assert get_dataset("suim", data).off_palette_pixels() == {} and sorted(reads) == ["a", "b"]
