"""Feature cache: correct contents, keyed by what determines them, reused without the backbone, never half-written."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_segbench.backbones import BackboneRef
from ssl_segbench.data import get_dataset
from ssl_segbench.features import extract
from ssl_segbench.transforms import Transform


def test_stored_tokens_and_labels_equal_direct_computation(small_synthetic, tmp_path):
    ds = get_dataset("synthetic", small_synthetic, "test")
    ref = BackboneRef("pixels")
    t = Transform("shorter", 64, 16)
    fs = extract(ref, ds, t, root=tmp_path, batch_size=3)
    assert fs["tokens"].data.shape == (len(ds) * 16, 768) and fs["tokens"].data.dtype == np.float16
    for i in (0, 5):
        x = t.image(ds.load_image(i), ref.spec.mean, ref.spec.std)
        direct = torch.nn.functional.unfold(x[None], 16, stride=16)[0].T.reshape(4, 4, 768).numpy()
        np.testing.assert_allclose(fs["tokens"].image(i), direct, atol=2e-3, rtol=1e-3)
        np.testing.assert_array_equal(fs.labels.labels(i), t.labels(ds.load_mask(i), ds.ignore_index))


def test_second_extraction_never_loads_the_backbone(small_synthetic, tmp_path, monkeypatch):
    ds = get_dataset("synthetic", small_synthetic, "test")
    ref = BackboneRef("random_vits16")
    t = Transform("shorter", 32, 16)
    first = extract(ref, ds, t, facets=("tokens", "cls", "attn"), root=tmp_path)
    assert not first.cache_hit
    monkeypatch.setattr(BackboneRef, "load", lambda *a, **k: pytest.fail("backbone loaded on a cache hit"))
    again = extract(BackboneRef("random_vits16"), ds, t, facets=("tokens", "attn"), root=tmp_path)
    assert again.cache_hit
    np.testing.assert_array_equal(np.asarray(again["tokens"].data), np.asarray(first["tokens"].data))
    assert first["cls"].image(2).shape == (384,) and first["attn"].image(2).shape == (2, 2, 6)
    # attention over patches sums to at most 1 (the CLS token's share of its own row is excluded)
    assert (np.asarray(first["attn"].data, dtype=np.float32).reshape(len(ds), 4, 6).sum(1) <= 1.01).all()


def test_key_changes_with_transform_and_layer(small_synthetic, tmp_path):
    ds = get_dataset("synthetic", small_synthetic, "test")
    ref = BackboneRef("random_vits16")
    a = extract(ref, ds, Transform("shorter", 32, 16), root=tmp_path)
    b = extract(ref, ds, Transform("square", 32, 16), root=tmp_path)
    c = extract(ref, ds, Transform("shorter", 32, 16), layer=5, root=tmp_path)
    assert len({a["tokens"].path, b["tokens"].path, c["tokens"].path}) == 3
    assert not (b.cache_hit or c.cache_hit)


def test_crash_mid_extraction_leaves_no_valid_looking_entry_and_resumes(small_synthetic, tmp_path, monkeypatch):
    import json


    ds = get_dataset("synthetic", small_synthetic, "test")
    t = Transform("shorter", 32, 16)
    reference = extract(BackboneRef("random_vits16"), ds, t, root=tmp_path / "clean", batch_size=2)
    monkeypatch.setenv("SSL_SEGBENCH_CHECKPOINT_SECONDS", "0")  # checkpoint after every batch
    original = type(ds).load_image

    def flaky(self, i):
        if i == 5:
            raise RuntimeError("simulated crash")
        return original(self, i)

    monkeypatch.setattr(type(ds), "load_image", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(BackboneRef("random_vits16"), ds, t, root=tmp_path / "c", batch_size=2)
    assert not [p for p in (tmp_path / "c").rglob("meta.json")]  # nothing looks complete
    partial = next((tmp_path / "c").rglob("*.partial"))
    assert json.loads((partial / "progress.json").read_text())["done"] == 4  # batches [0,1] and [2,3] are safe
    monkeypatch.setattr(type(ds), "load_image", original)
    fs = extract(BackboneRef("random_vits16"), ds, t, root=tmp_path / "c", batch_size=2)
    assert not fs.cache_hit and fs["tokens"].meta["resumed_from"] == 4
    np.testing.assert_array_equal(np.asarray(fs["tokens"].data), np.asarray(reference["tokens"].data))
    np.testing.assert_array_equal(np.asarray(fs.labels.data), np.asarray(reference.labels.data))
    assert not list((tmp_path / "c").rglob("*.partial"))


def test_variable_size_images_with_pad_policy(tmp_path):
    from PIL import Image

    root = tmp_path / "folder"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text("names: [bg, fg]\n")
    for i, (w, h) in enumerate([(40, 32), (64, 32), (32, 50)]):
        Image.new("RGB", (w, h), (i * 40, 0, 0)).save(root / "images" / f"im{i}.png")
        Image.fromarray(np.ones((h, w), dtype=np.uint8)).save(root / "masks" / f"im{i}.png")
    ds = get_dataset("folder", root)
    fs = extract(BackboneRef("pixels"), ds, Transform("pad", 32, 16), root=tmp_path / "cache")
    assert [fs["tokens"].image(i).shape[:2] for i in range(3)] == [(2, 3), (2, 4), (4, 2)]
    assert fs.labels.labels(0).shape == (32, 48) and (fs.labels.labels(0)[:, 40:] == 255).all()
