"""`compare` pairs records that differ only in the backbone and tests differences; `show` draws a linked grid."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from ssl_segbench.cli import main
from ssl_segbench.compare import CompareError, compare_pair, pairs
from ssl_segbench.data import get_dataset
from ssl_segbench.figures import colourize
from ssl_segbench.transforms import Transform


@pytest.fixture(scope="module")
def two_backbones(small_synthetic, tmp_path_factory):
    res = tmp_path_factory.mktemp("res")
    for b in ("pixels", "random_vits16"):
        assert main(["run", "--backbone", b, "--dataset", "synthetic", "--data-root", str(small_synthetic),
                     "--size", "64", "--protocol", "kmeans,linear", "--seeds", "2", "--param", "linear.epochs=3",
                     "--results-dir", str(res)]) == 0
    return res


def test_compare_pairs_every_shared_setting_and_a_backbone_with_itself_is_no_difference(two_backbones, capsys):
    got = pairs(two_backbones, "pixels", "random_vits16")
    assert sorted(a.protocol["name"] for a, _ in got) == ["kmeans", "linear"]
    for a, b in got:
        assert a.identity["params"] == b.identity["params"] and a.backbone["id"] != b.backbone["id"]
        res = compare_pair(a, b, n_boot=200)
        mi = res["rows"][0]
        assert mi["what"] == "miou" and mi["delta"] == pytest.approx(mi["a"] - mi["b"])
        assert mi["ci"][0] <= mi["delta"] <= mi["ci"][1] and 0 <= mi["p"] <= 1
        assert len(res["rows"]) == 2 + 8  # mIoU, pixel accuracy, one row per class
        same = compare_pair(a, a, n_boot=100)
        assert all(r["delta"] == 0 for r in same["rows"] if r["a"] == r["a"])
    assert main(["compare", "pixels", "random_vits16", "--results-dir", str(two_backbones), "--n-boot", "100"]) == 0
    assert "IoU HD" in capsys.readouterr().out


def test_compare_says_what_is_missing(two_backbones, capsys):
    with pytest.raises(CompareError, match="backbones with records: pixels, random_vits16"):
        pairs(two_backbones, "pixels", "dino_vits16")
    assert main(["compare", "pixels", "nope", "--results-dir", str(two_backbones)]) == 2


def test_show_draws_the_grid_where_the_leaderboard_links_it(small_synthetic, two_backbones, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["show", "--backbone", "pixels", "--dataset", "synthetic", "--data-root", str(small_synthetic),
                 "--size", "64", "--protocol", "kmeans", "-n", "2"]) == 0
    png = tmp_path / "leaderboards" / "figures" / "synthetic" / "pixels__kmeans.png"
    with Image.open(png) as im:
        assert im.size[0] > 200 and im.size[1] > 150
        grid = np.asarray(im.convert("RGB"))
    # the panels are the data itself: row 0's ground-truth panel (8 px margins, 14 px captions, 64 px panels) is the
    # first image's labels in the dataset's palette, pixel for pixel
    ds = get_dataset("synthetic", small_synthetic)
    t = Transform("shorter", 64, 16)
    expected = colourize(t.labels(ds.load_mask(0), ds.ignore_index), ds.palette, ds.ignore_index)
    np.testing.assert_array_equal(grid[44:108, 80:144], expected)
    first = png.read_bytes()
    assert main(["leaderboard", "--results-dir", str(two_backbones), "--out", "leaderboards"]) == 0
    page = (tmp_path / "leaderboards" / "synthetic.md").read_text()
    assert "[pixels](figures/synthetic/pixels__kmeans.png)" in page
    assert (tmp_path / "leaderboards" / "site" / "figures" / "synthetic" / "pixels__kmeans.png").read_bytes() == first
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # drawn without matplotlib (no fonts, no font cache)
    assert main(["show", "--backbone", "pixels", "--dataset", "synthetic", "--data-root", str(small_synthetic),
                 "--size", "64", "--protocol", "kmeans", "-n", "2"]) == 0
    assert png.read_bytes() == first  # byte-stable
