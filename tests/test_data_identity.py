"""Issue case 1 (stale cache): a dataset is identified by what its files hold, so a changed mask or image under the same
name changes the record key and misses the cache, and unchanged files are never read twice to find that out."""
from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

import ssl_segbench.fingerprint as fingerprint
from ssl_segbench.cli import main
from ssl_segbench.data import get_dataset
from ssl_segbench.data.synthetic import generate_synthetic
from ssl_segbench.records import iter_records


def _cli(data, results, cache, *extra):
    """`ssl-segbench run` in a subprocess: kmeans on raw pixels, the quickest real pipeline."""
    cmd = [sys.executable, "-m", "ssl_segbench", "run", "--backbone", "pixels", "--dataset", "suim", "--data-root",
           str(data), "--size", "64", "--protocol", "kmeans", "--seeds", "2", "--results-dir", str(results), *extra]
    proc = subprocess.run(cmd, env={**os.environ, "SSL_SEGBENCH_CACHE": str(cache)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {rec.key: rec for _, rec in iter_records(results)}


def _repaint(mask_path, seed):
    """Write a different, valid SUIM mask (random palette colours in 8×8 blocks) under the same name."""
    w, h = Image.open(mask_path).size
    cls = np.random.default_rng(seed).integers(0, 8, (h // 8 + 1, w // 8 + 1))
    cls = np.kron(cls, np.ones((8, 8), dtype=np.int64))[:h, :w]
    bits = np.stack([(cls >> 2) & 1, (cls >> 1) & 1, cls & 1], -1).astype(np.uint8) * 255
    Image.fromarray(bits).save(mask_path)


def test_repainted_masks_change_the_key_miss_the_cache_and_score_like_a_fresh_cache(small_synthetic, tmp_path):
    data = shutil.copytree(small_synthetic, tmp_path / "suim")
    first = _cli(data, tmp_path / "res", tmp_path / "cache")
    (key1, rec1), = first.items()
    assert rec1.provenance["passes"][0]["computed"] and not rec1.provenance["cache_hit"]

    masks = sorted((data / "TEST" / "masks").iterdir())
    _repaint(masks[0], seed=1)  # one mask, same name
    second = _cli(data, tmp_path / "res", tmp_path / "cache")
    (key2,) = set(second) - {key1}
    rec2 = second[key2]
    assert rec2.identity["content_sha256"] != rec1.identity["content_sha256"]
    assert not rec2.provenance["cache_hit"] and rec2.provenance["passes"][0]["computed_here"]

    for i, m in enumerate(masks):  # now every mask, then recompute the old key's record in place
        _repaint(m, seed=10 + i)
    third = _cli(data, tmp_path / "res", tmp_path / "cache", "--overwrite", "always")
    (key3,) = set(third) - {key1, key2}
    fresh = _cli(data, tmp_path / "fresh-res", tmp_path / "fresh-cache")
    assert list(fresh) == [key3] and fresh[key3].metrics == third[key3].metrics  # no stale features or labels
    assert third[key3].metrics["miou"]["mean"] != rec1.metrics["miou"]["mean"]


def test_another_copy_with_the_same_names_is_the_same_data_only_when_the_bytes_are(small_synthetic, tmp_path):
    a = get_dataset("suim", small_synthetic)
    same = get_dataset("suim", shutil.copytree(small_synthetic, tmp_path / "copy"))
    assert same.content_sha256() == a.content_sha256()  # a copy elsewhere shares cache entries and records
    other = shutil.copytree(small_synthetic, tmp_path / "other")
    image = sorted((other / "TEST" / "images").iterdir())[3]
    Image.open(image).transpose(Image.FLIP_LEFT_RIGHT).save(image, quality=92)
    assert get_dataset("suim", other).content_sha256() != a.content_sha256()
    assert get_dataset("suim", small_synthetic, resize_masks=True).content_sha256() != a.content_sha256()


def test_a_thousand_unchanged_images_are_hashed_once_then_never_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    root = generate_synthetic(tmp_path / "data", n_train=1, n_test=1000, size=(32, 32), seed=5)
    reads = collections.Counter()
    real = fingerprint.sha256_file

    def counting(path):
        reads[os.path.abspath(path)] += 1
        return real(path)

    monkeypatch.setattr(fingerprint, "sha256_file", counting)
    args = ["run", "--backbone", "pixels", "--dataset", "suim", "--data-root", str(root), "--size", "32",
            "--protocol", "kmeans", "--seeds", "1", "--results-dir", str(tmp_path / "res")]
    assert main(args) == 0
    assert len(reads) == 2000 and max(reads.values()) == 1  # every image and mask of TEST read exactly once
    reads.clear()
    assert main([*args, "--overwrite", "always"]) == 0  # an unchanged rerun, record recomputed
    assert sum(reads.values()) == 0
    mask = root / "TEST" / "masks" / "syn_test_00007.bmp"
    _repaint(mask, seed=3)
    reads.clear()
    changed = get_dataset("suim", root).content_sha256()
    assert list(reads) == [os.path.abspath(mask)] and reads[os.path.abspath(mask)] == 1
    (_, rec), = iter_records(tmp_path / "res")
    assert changed != rec.identity["content_sha256"]
