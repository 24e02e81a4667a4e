"""The one backbone pass (`features.embed`) and the backbone's part of every cache key (`features.backbone_key`): every
caller's refusal of a non-finite output names the first bad item and leaves nothing cached, and the main feature key
is the one every existing cache was written under."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from stores import PlantedDataset

from ssl_segbench.backbones import BackboneError, BackboneSpec
from ssl_segbench.cache import Entry
from ssl_segbench.data import get_dataset
from ssl_segbench.features import extract, feature_key
from ssl_segbench.protocols import get_protocol
from ssl_segbench.protocols.base import Context
from ssl_segbench.protocols.linear import augmented_steps
from ssl_segbench.protocols.maskdistill import _embed_crops
from ssl_segbench.protocols.retrieval import augmented_views
from ssl_segbench.transforms import Transform

SPEC = BackboneSpec(id="nan-at", loader="builtin", repo_id="test", revision="1", patch_size=16, embed_dim=4,
                    num_prefix_tokens=1, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), method="test", paper=None,
                    license="test")


class _BadAt(torch.nn.Module):
    """A stand-in backbone: zero tokens and CLS, except one value of the `bad`-th image it is given (counted across
    calls), which is `value` (NaN by default)."""

    source = "test:bad-at"

    def __init__(self, bad: int, value: float = float("nan"), spec=SPEC):
        super().__init__()
        self.spec, self.bad, self.value, self.seen = spec, bad, value, 0

    def forward(self, x, layer=-1, facets=("tokens",)):
        b, _, h, w = x.shape
        p, d = self.spec.patch_size, self.spec.embed_dim
        out = {f: torch.zeros(b, h // p, w // p, d) if f == "tokens" else torch.zeros(b, d) for f in facets}
        if self.seen <= self.bad < self.seen + b:
            for v in out.values():
                v[self.bad - self.seen].view(-1)[-1] = self.value
        self.seen += b
        return out


class _Ref:
    spec, source, revision = SPEC, "test:bad-at", "1"

    def __init__(self, backbone):
        self.backbone = backbone

    def load(self, device="cpu"):
        return self.backbone


def _nothing_cached(root):
    assert not list(root.rglob("meta.json")), "a complete entry was left"
    assert not list(root.rglob("*.partial")), "a partial entry was left"


def _refused(message: str, named: str, other: str, facet: str, layer: int):
    """The one refusal format: backbone id and source, what was wrong, facet, layer, the bad item, the fix."""
    said = f"backbone 'nan-at' (test:bad-at) gave NaN or infinite values for facet '{facet}' of layer {layer} on "
    assert said in message, message
    assert named in message and other not in message, message
    assert "nothing was cached" in message and "re-download" in message


def test_feature_key_is_the_key_every_existing_cache_was_written_under():
    spec = SimpleNamespace(id="vit", mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    ref = SimpleNamespace(spec=spec, source="hf:org/vit", revision="abc123")
    ds = PlantedDataset(("a", "b"), n=3, split="val")
    key = feature_key(ref, ds, Transform("shorter", 64, 16), -2, "keys", "bf16-autocast")
    expected = {"kind": "features", "version": 2, "backbone": "vit", "source": "hf:org/vit", "revision": "abc123",
                "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "dataset": "planted", "split": "val",
                "content_sha256": "planted-val", "n_images": 3,
                "transform": {"policy": "shorter", "size": 64, "patch_size": 16}, "layer": -2, "facet": "keys",
                "dtype": "float16", "precision": "bf16-autocast"}
    assert json.dumps(key, sort_keys=True) == json.dumps(expected, sort_keys=True)
    # the entry's directory name, as the code before backbone_key gave it
    assert Entry.at(Path("/c"), "features", "vit", "planted", "val", key).path.name == "val-07464d1abcf07116ae8f567a"


@pytest.mark.parametrize("value, why", [(float("nan"), "NaN or infinite values"),
                                        (1e6, "values beyond float16's range")])
def test_main_pass_names_the_first_bad_image_and_caches_nothing(small_synthetic, tmp_path, value, why):
    ds = get_dataset("synthetic", small_synthetic, "test")
    with pytest.raises(BackboneError) as e:
        extract(_Ref(_BadAt(4, value)), ds, Transform("shorter", 32, 16), root=tmp_path, batch_size=3)
    message = str(e.value)
    assert why in message and f"image '{ds.samples[4].name}'" in message and ds.samples[3].name not in message
    if value != value:  # NaN
        _refused(message, f"image '{ds.samples[4].name}'", ds.samples[5].name, "tokens", -1)
    _nothing_cached(tmp_path)


def test_retrieval_augmented_views_name_the_bad_crop_and_cache_nothing(small_synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    ds = get_dataset("synthetic", small_synthetic, "train")
    backbone = _BadAt(3)
    ctx = Context(eval_set=ds, train_set=ds, features=None, seeds=[0], backbone_ref=_Ref(backbone),
                  transform=Transform("square", 32, 16), batch_size=2, _backbone=backbone)
    with pytest.raises(BackboneError) as e:
        augmented_views(ctx, ds, get_protocol("retrieval", augment=1).p)
    _refused(str(e.value), f"the augmented crop of image '{ds.samples[3].name}' of synthetic/train (retrieval, "
             "epoch 0)", ds.samples[2].name, "tokens", -1)
    _nothing_cached(tmp_path / "cache")


def test_linear_augmented_steps_name_the_bad_crop(small_synthetic):
    ds = get_dataset("synthetic", small_synthetic, "train")
    backbone = _BadAt(5)
    ctx = Context(eval_set=ds, train_set=ds, features=None, seeds=[0], transform=Transform("square", 32, 16),
                  batch_size=2, _backbone=backbone)
    p = get_protocol("linear", batch_size=4).p
    order = np.random.default_rng(7).permutation(len(ds))
    with pytest.raises(BackboneError) as e:
        list(augmented_steps(ctx, ds, p, seed=0)(0, np.random.default_rng(7)))
    _refused(str(e.value), f"the augmented crop of image '{ds.samples[order[5]].name}'", ds.samples[order[4]].name,
             "tokens", -1)


def test_datus_crop_embeddings_name_the_bad_segment_and_cache_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    spec = BackboneSpec(**{**SPEC.__dict__, "patch_size": 4})
    images = [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(3)]
    segs = [np.repeat([[0] * 4 + [1] * 4], 8, axis=0) for _ in images]  # left half segment 0, right half 1
    valid = [np.array([0, 1])] * 3  # crop rows: image 0 → 0, 1; image 1 → 2, 3; image 2 → 4, 5
    backbone = _BadAt(3, spec=spec)
    ctx = Context(eval_set=PlantedDataset(("a", "b"), images=images), train_set=None, features=None, seeds=[0],
                  backbone_ref=_Ref(backbone), transform=Transform("square", 32, 4), batch_size=2,
                  _backbone=backbone)
    fs = SimpleNamespace(keys={"keys": "keys-entry"})
    with pytest.raises(BackboneError) as e:
        get_protocol("datus")._embeddings(ctx, fs, segs, valid)
    _refused(str(e.value), "the crop of segment 1 of image 'img1' of planted/val", "img2", "cls", -1)
    _nothing_cached(tmp_path / "cache")


def test_maskdistill_crop_embeddings_name_the_bad_image_and_cache_nothing(tmp_path):
    ds = PlantedDataset(("a", "b"), images=[np.full((40, 40, 3), 50 * i, np.uint8) for i in range(4)])
    boxes = np.array([[0, 0, 32, 32], [0, 0, 20, 20], [0, 0, 30, 30], [0, 0, 8, 40]])  # padded: 32², 32², 32², 48x16
    entry = Entry.at(tmp_path, "pseudo", "maskdistill-embeddings", ds.id, ds.split, {"test": 1})
    backbone = _BadAt(2)  # batches (by padded shape, then image): [0, 1], [2], [3]
    with pytest.raises(BackboneError) as e:
        _embed_crops(entry, ds, boxes, lambda: backbone, SPEC, get_protocol("maskdistill", crop_size=None).p, "cpu", 2)
    _refused(str(e.value), "the mask crop of image 'img2' of planted/val", "img1", "cls", -1)
    _nothing_cached(tmp_path)
