"""Issue 19: retrieval's `k` and `memory_size` are recorded as they took effect. A k beyond what the memory bank can
hold is refused (before any extraction when the image count and patch grid already rule it out, after the bank is
built when the patches without a labelled pixel make the difference); a memory_size that leaves a train view no patch
is refused before any extraction; nothing is recorded. Through the CLI, with hand-counted bank sizes."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_refusals import _cli, _run_args

from ssl_segbench.data import get_dataset
from ssl_segbench.protocols import ProtocolError, get_protocol
from ssl_segbench.records import iter_records
from ssl_segbench.transforms import Transform


def _no_extraction(tmp_path):
    """No record, and no feature, label or retrieval entry at all (complete or partial) in the cache."""
    assert not (tmp_path / "res").exists() or not list((tmp_path / "res").rglob("*.json"))
    cache = tmp_path / "cache"
    assert not [p for p in cache.rglob("*") if p.parts[len(cache.parts)] in ("features", "labels", "retrieval")]


# small_synthetic: 16 train images; --size 64 with the 16-pixel patches of `pixels` gives a 4×4 grid: 256 patches.
@pytest.mark.parametrize("params, expected", [
    (["k=257"], "k=257 neighbours, but the memory bank of synthetic/train can hold at most 256 rows"),
    (["augment=2", "k=513"], "can hold at most 512 rows (16 train images × 2 augmented epochs: 512 patches)"),
    (["memory_size=48", "k=49"], "can hold at most 48 rows (16 train images: 256 patches, at most 3 per view"),
    (["memory_size=15"], "memory_size=15 gives each of the 16 train views no patch; set memory_size >= 16"),
    (["augment=2", "memory_size=31"], "memory_size=31 gives each of the 32 train views no patch"),
])
def test_what_the_train_patches_cannot_hold_is_refused_before_extraction(small_synthetic, tmp_path, params,
                                                                          expected):
    extra = [a for p in params for a in ("--param", f"retrieval.{p}")]
    rc, err = _cli(tmp_path, *_run_args(tmp_path, small_synthetic, "pixels", "retrieval", *extra))
    assert rc == 2 and "Traceback" not in err and expected in err, err
    _no_extraction(tmp_path)


def test_k_at_the_bank_size_runs_and_is_recorded_as_given(small_synthetic, tmp_path):
    rc, err = _cli(tmp_path, *_run_args(tmp_path, small_synthetic, "pixels", "retrieval", "--param", "retrieval.k=256"))
    assert rc == 0, err
    (_, rec), = iter_records(tmp_path / "res")
    assert rec.protocol["params"]["k"] == 256 and rec.per_seed[0]["memory_rows"] == 16 * 4 * 4


def _folder_with_an_unlabelled_patch(root):
    """A `folder` dataset of 32×32 images (2×2 patches of 16 pixels): 3 train images, 2 val images; the top-left patch
    of train image 0 is all ignore, so the bank holds 3 × 4 − 1 = 11 rows though 12 patches exist."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir()
        for i in range(n):
            mask = np.kron(rng.integers(0, 2, (2, 2)), np.ones((16, 16), np.int64)).astype(np.uint8)
            if split == "train" and i == 0:
                mask[:16, :16] = 255
            image = (rng.integers(0, 128, (32, 32, 3)) + 100 * (mask[..., None] == 1)).astype(np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"{split}{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{split}{i}.png")
    (root / "classes.yaml").write_text("names: [a, b]\n")
    return root


def test_k_beyond_the_labelled_patches_is_refused_after_the_bank_and_nothing_is_recorded(tmp_path):
    root = _folder_with_an_unlabelled_patch(tmp_path / "folder")
    masks = tmp_path / "masks"

    def run(k):
        return _cli(tmp_path, "run", "--backbone", "pixels", "--dataset", "folder", "--data-root", str(root),
                    "--size", "32", "--protocol", "retrieval", "--seeds", "1", "--param", f"retrieval.k={k}",
                    "--param", "retrieval.train_split=train", "--results-dir", str(tmp_path / "res"),
                    "--save-masks", str(masks))

    rc, err = run(13)  # more than the 12 patches: known from the image count and the grid alone
    assert rc == 2 and "k=13 neighbours" in err and "can hold at most 12 rows" in err, err
    _no_extraction(tmp_path)
    rc, err = run(12)  # 12 patches, but one has no labelled pixel: known once the bank is built
    assert rc == 2 and "Traceback" not in err, err
    assert "k=12 neighbours, but the memory bank of folder/train holds 11 rows" in err and "N <= 11" in err, err
    assert not (tmp_path / "res").exists() or not list((tmp_path / "res").rglob("*.json"))
    assert not masks.exists() or not [p for p in masks.rglob("*") if p.is_file()]
    rc, err = run(11)
    assert rc == 0, err
    (_, rec), = iter_records(tmp_path / "res")
    assert rec.protocol["params"]["k"] == 11 and rec.per_seed[0]["memory_rows"] == 11
    assert sorted(p.name for p in (masks / "retrieval").iterdir()) == ["val0.png", "val1.png"]


def test_the_bound_under_pad_counts_each_images_own_grid(small_synthetic):
    """256×192 images under `pad` at 64: the shorter side becomes 64, the longer 85, padded to 96: a 4×6 grid of 24
    patches each, 16 × 24 = 384 in all (more than the 4×4 grid of a square image would give)."""
    train = get_dataset("synthetic", small_synthetic, "train")
    test = get_dataset("synthetic", small_synthetic, "test")
    pad = Transform("pad", 64, 16)
    get_protocol("retrieval", k=384).check_data(test, train, pad)
    with pytest.raises(ProtocolError, match=r"k=385 neighbours, .* at most 384 rows \(16 train images: 384 patches"):
        get_protocol("retrieval", k=385).check_data(test, train, pad)


def test_no_train_split_is_refused_before_extraction(small_synthetic, tmp_path):
    """A root holding only the test images (read as split `test`) has no train split to fill the memory bank: refused
    while the run is planned, before any backbone pass."""
    import shutil

    only_test = tmp_path / "only-test"
    for sub in ("images", "masks"):
        shutil.copytree(small_synthetic / "TEST" / sub, only_test / sub)
    rc, err = _cli(tmp_path, "run", "--backbone", "pixels", "--dataset", "suim", "--data-root", str(only_test),
                   "--size", "64", "--protocol", "retrieval", "--seeds", "1", "--results-dir", str(tmp_path / "res"))
    assert rc == 2 and "Traceback" not in err, err
    assert "suim has no train split here (looked for: default)" in err and "retrieval.train_split=NAME" in err
    _no_extraction(tmp_path)
