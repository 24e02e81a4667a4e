"""`datasets check`: counts, class histogram, offending files and exit codes."""
import argparse
import io
import re

import numpy as np
import pytest
import yaml
from fixtures_data import write_image, write_labels, write_rgb_mask
from rich.console import Console

from ssl_segbench.data import get_dataset
from ssl_segbench.data.check import add_datasets_parser, check_dataset, parse_options, run_list

LABELS = np.array([[0, 1, 2], [2, 1, 255]])  # per image: ground 1, car 2, sky 2 pixels, 1 ignored


def console():
    return Console(file=io.StringIO(), width=250, color_system=None)


def text(c):
    return c.file.getvalue()


def row(out, first, *cells):
    """True if a table row starts with `first` and continues with `cells`."""
    pattern = r"\s*│\s*".join(re.escape(str(x)) for x in (first, *cells))
    return re.search(pattern, out) is not None


@pytest.fixture
def folder_root(tmp_path):
    (tmp_path / "classes.yaml").write_text(yaml.safe_dump({"names": ["ground", "car", "sky"]}))
    for name in ("a", "b"):
        write_image(tmp_path / "images" / f"{name}.png", *LABELS.shape)
        write_labels(tmp_path / "masks" / f"{name}.png", LABELS)
    return tmp_path


def cli(argv, c):
    parser = argparse.ArgumentParser()
    add_datasets_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args, c)


def test_clean_dataset_passes_with_histogram(folder_root):
    c = console()
    assert check_dataset(get_dataset("folder", folder_root), c) == 0
    out = text(c)
    assert row(out, "0", "ground", "2", "20.00", "2") and row(out, "1", "car", "4", "40.00", "2")
    assert row(out, "2", "sky", "4", "40.00", "2") and row(out, "255", "(ignore)", "2")
    assert row(out, "images", "2") and "OK" in out


def test_bad_files_fail_and_are_listed(folder_root):
    (folder_root / "images" / "a.png").write_bytes(b"\x89PNG broken")
    write_labels(folder_root / "masks" / "b.png", np.full_like(LABELS, 7))
    c = console()
    assert check_dataset(get_dataset("folder", folder_root), c) == 1
    out = text(c)
    assert "a.png" in out and "cannot read image" in out
    assert "b.png" in out and "[7]" in out and "FAILED" in out


def test_mask_of_other_size_fails_unless_resizing_is_asked_for(tmp_path):
    write_image(tmp_path / "images" / "a.jpg", 4, 4)
    write_rgb_mask(tmp_path / "masks" / "a.bmp", np.zeros((2, 2, 3), np.uint8))
    c = console()
    assert check_dataset(get_dataset("suim", tmp_path), c) == 1
    out = text(c)
    assert "a.bmp" in out and "a.jpg" in out and "resize_masks=true" in out and "FAILED" in out
    c = console()
    assert check_dataset(get_dataset("suim", tmp_path, resize_masks=True), c) == 0
    out = text(c)
    assert row(out, "masks resized", "1") and "a.bmp" in out and row(out, "0", "BW", "16")


def test_suim_masks_with_off_palette_pixels_are_reported(tmp_path):
    write_image(tmp_path / "images" / "a.jpg", 4, 4)
    write_image(tmp_path / "images" / "b.jpg", 4, 4)
    clean = np.zeros((4, 4, 3), np.uint8)
    clean[:, 2:] = (250, 5, 250)  # JPEG-like noise around magenta: near the palette
    write_rgb_mask(tmp_path / "masks" / "a.bmp", clean)
    muddy = clean.copy()
    muddy[0, :3] = (128, 90, 200)  # three pixels nowhere near a palette colour
    write_rgb_mask(tmp_path / "masks" / "b.bmp", muddy)
    c = console()
    assert check_dataset(get_dataset("suim", tmp_path), c) == 1  # the default refuses them: a problem
    out = text(c)
    assert row(out, "problems", "1") and "b.bmp" in out and "has 3 pixel(s)" in out and "off_palette=nearest" in out
    assert "a.bmp" not in out.split("problems")[-1]
    # 8 magenta (RI) pixels per mask; b's three muddy ones (one of them on magenta) read at 128 are magenta again
    for policy, ri, ignored in (("nearest", 18, 0), ("ignore", 15, 3)):  # a warning with the count, not a failure
        c = console()
        assert check_dataset(get_dataset("suim", tmp_path, off_palette=policy), c) == 0
        out = text(c)
        assert row(out, "masks with warnings", "1") and "b.bmp" in out and "3 pixel(s)" in out
        assert f"off_palette={policy}" in out and "a.bmp" not in out.split("mask warnings")[1]
        assert row(out, "5", "RI", str(ri)) and row(out, "255", "(ignore)", str(ignored))


def test_cli_exit_codes(folder_root):
    c = console()
    assert cli(["datasets", "check", "--dataset", "folder", "--data-root", str(folder_root)], c) == 0
    (folder_root / "masks" / "b.png").unlink()
    c = console()
    assert cli(["datasets", "check", "--dataset", "folder", "--data-root", str(folder_root)], c) == 2
    assert "b.png has no mask" in text(c).replace("\n", "")
    c = console()
    assert cli(["datasets", "check", "--dataset", "folder", "--data-root", str(folder_root), "--skip-bad"], c) == 0
    assert row(text(c), "skipped (skip_bad)", "1") and "b.png" in text(c)
    c = console()
    assert cli(["datasets", "check", "--dataset", "folder", "--data-root", str(folder_root / "nowhere")], c) == 2
    assert "does not exist" in text(c)


def test_cli_passes_options_and_lists_datasets(folder_root, tmp_path):
    other = tmp_path / "elsewhere.yaml"
    other.write_text(yaml.safe_dump({"names": ["x", "y", "z", "w"]}))
    c = console()
    assert cli(["datasets", "check", "--dataset", "folder", "--data-root", str(folder_root), "-o", f"classes={other}"],
               c) == 0
    assert row(text(c), "3", "w", "0")
    assert parse_options(["skip-bad=true", "n=3", "p=a/b.txt"]) == {"skip_bad": True, "n": 3, "p": "a/b.txt"}
    c = console()
    assert run_list(argparse.Namespace(), c) == 0  # `ssl-segbench list datasets`
    assert "cocostuff27-things12" in text(c) and "hf:<org>/<name>" in text(c) and "default root" in text(c)


def test_labels_a_decoder_lets_through_outside_the_class_range_fail(folder_root):
    from ssl_segbench.data.folder import Folder

    class Sloppy(Folder):
        id = "sloppy"

        def decode_mask(self, raw, sample):
            return np.full(LABELS.shape, 5)

    c = console()
    assert check_dataset(Sloppy(folder_root), c) == 1
    assert "label values [5] outside 0..2" in text(c).replace("\n", "")
