"""MaskDistill recovers planted objects, classes and labels; caches its masks between stages; runs end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from stores import feature_set, store

from ssl_segbench.data.base import SegmentationDataset
from ssl_segbench.features import FeatureSet
from ssl_segbench.metrics import remap, scores
from ssl_segbench.protocols import Context, ProtocolError, get_protocol
from ssl_segbench.protocols.base import Predictions, Scoring, count_confusions
from ssl_segbench.protocols.maskdistill import (
    _head,
    box_to_original,
    cluster_embeddings,
    mass_threshold,
    match_labels,
    object_mask,
)
from ssl_segbench.protocols.training import cached_steps, conv_head_scorer, train_head
from ssl_segbench.records import iter_records
from ssl_segbench.registry import BackboneSpec
from ssl_segbench.transforms import Transform

# --- step 1: the object mask -------------------------------------------------------------------------------------


def test_mass_threshold_keeps_the_top_of_the_mass():
    a = np.array([0.1, 0.5, 0.1, 0.3])
    assert mass_threshold(a, 0.5).tolist() == [False, True, False, False]
    assert mass_threshold(a, 0.6).tolist() == [False, True, False, True]


def _planted_maps(seed=0, h=12, w=16, heads=6):
    """An L-shaped object, a distractor blob with object-like keys but not touching it, and a background whose keys
    point the other way. Heads 0-4 attend to the object; head 5 (which the recipe must ignore) to the distractor."""
    rng = np.random.default_rng(seed)
    obj = np.zeros((h, w), dtype=bool)
    obj[3:9, 4:7] = True
    obj[7:9, 7:11] = True
    distractor = np.zeros((h, w), dtype=bool)
    distractor[1:3, 13:15] = True
    d = 24
    v = rng.normal(size=d)
    v /= np.linalg.norm(v)
    keys = np.where((obj | distractor)[..., None], 3.0 * v, -3.0 * v) + 0.3 * rng.normal(size=(h, w, d))
    attn = np.full((h, w, heads), 1e-3)
    attn[obj, :5] = rng.uniform(0.5, 1.0, size=(obj.sum(), 5))
    attn[5, 5, :5] = 2.0  # the most attended patch: the source
    attn[distractor, 5] = 10.0
    attn /= attn.sum((0, 1), keepdims=True)  # a softmax row per head
    return attn.astype(np.float32), keys.astype(np.float32), obj


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_object_mask_is_exactly_the_planted_object(seed):
    attn, keys, obj = _planted_maps(seed)
    assert np.array_equal(object_mask(attn, keys), obj)
    assert np.array_equal(object_mask(attn, keys, proposals="topk-in-mass"), obj)


def test_more_heads_than_the_attention_has_are_refused_not_clamped():
    """On a 6-head map heads=7 would silently average the same 6 heads as heads=6, one result under two columns: it
    is refused naming both counts, while every head count the map has is taken."""
    attn, keys, obj = _planted_maps(0)
    assert np.array_equal(object_mask(attn, keys, heads=6), obj)
    with pytest.raises(ProtocolError, match=r"heads=7, but the backbone's CLS attention has 6 heads.*N <= 6"):
        object_mask(attn, keys, heads=7)


def test_object_mask_with_diagonal_connectivity_joins_a_diagonal_neighbour():
    attn, keys, obj = _planted_maps(0)
    keys[9, 11] = keys[8, 10]  # object-like key touching the object only at a corner
    assert not object_mask(attn, keys)[9, 11]
    assert object_mask(attn, keys, connectivity=8)[9, 11]


def test_centring_keys_recovers_the_object_when_keys_share_a_large_offset():
    attn, keys, obj = _planted_maps(0)
    offset = 20.0 * np.random.default_rng(5).normal(size=keys.shape[-1]).astype(np.float32)
    assert object_mask(attn, keys + offset).all()  # every affinity positive: the faithful recipe takes everything
    assert np.array_equal(object_mask(attn, keys + offset, center_keys=True), obj)


def test_boxes_map_back_to_the_original_image():
    pad = Transform("pad", 640, 16)  # 500x375 → 853x640, padded to 864x640
    assert pad.output_size(500, 375) == (640, 864)
    assert box_to_original((0, 0, 39, 53), pad, 500, 375) == (0, 0, 500, 375)  # padding clipped away
    assert box_to_original((4, 10, 7, 19), pad, 500, 375) == (94, 38, 188, 75)
    shorter = Transform("shorter", 224, 16)  # 300x200 → 336x224, centre crop from x = 56
    assert box_to_original((0, 0, 13, 13), shorter, 300, 200) == (50, 0, 250, 200)
    square = Transform("square", 64, 16)
    assert box_to_original((1, 0, 2, 1), square, 128, 256) == (0, 64, 64, 192)


# --- step 3 and 4: clustering and matching -----------------------------------------------------------------------


@pytest.mark.parametrize("whiten", ["std", "pca"])
def test_mask_clustering_recovers_planted_classes(whiten):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6))
    truth = np.repeat(np.arange(4), 25)
    emb = centres[truth] + 0.15 * rng.normal(size=(100, 6))
    emb[:, 0] *= 50.0  # one loud dimension the whitening must tame
    ids = cluster_embeddings(emb, 4, seed=1234, whiten_mode=whiten)
    pairs = set(zip(truth.tolist(), ids.tolist()))
    assert len(pairs) == 4 and len({c for _, c in pairs}) == 4  # a bijection: every class is one cluster


def test_matching_fixes_background_and_matches_objects():
    conf = np.array([[90, 5, 0, 5],   # background
                     [2, 0, 40, 1],   # class 1 ← label 2
                     [3, 30, 0, 0],   # class 2 ← label 1
                     [0, 0, 2, 20]])  # class 3 ← label 3
    assert match_labels(conf, "hungarian", 0).tolist() == [0, 2, 1, 3]
    assert match_labels(conf, "many-to-one", 0).tolist() == [0, 2, 1, 3]
    assert match_labels(conf, "hungarian", None).tolist() == [0, 2, 1, 3]
    mostly_bg = np.array([[90, 50], [10, 5]])
    assert match_labels(mostly_bg, "many-to-one", 0).tolist() == [0, 0]
    assert match_labels(mostly_bg, "hungarian", 0).tolist() == [0, 1]


# --- step 5: distillation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["distill-linear", "distill-conv"])
def test_distilled_head_beats_chance_on_noisy_pseudo_labels(tmp_path, kind):
    """Tokens carry their class; the pseudo labels are the truth with 40 % of the patches replaced at random."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)).astype(np.float32)

    def make(n):
        tokens, truth, noisy = [], [], []
        for _ in range(n):
            g = np.kron(rng.permutation(4).reshape(2, 2), np.ones((3, 3), dtype=np.int64))  # quadrants
            tokens.append(centres[g] + 0.3 * rng.normal(size=(6, 6, 16)).astype(np.float32))
            truth.append(np.kron(g, np.ones((4, 4), dtype=np.int64)))
            flip = rng.random(g.shape) < 0.4
            noisy.append(np.kron(np.where(flip, rng.integers(0, 4, size=g.shape), g), np.ones((4, 4), dtype=np.int64)))
        return tokens, truth, noisy

    tr_tok, tr_truth, tr_noisy = make(24)
    ev_tok, ev_truth, _ = make(8)
    train = feature_set(tmp_path / "train", tr_tok, tr_noisy)
    ev = feature_set(tmp_path / "eval", ev_tok, ev_truth)
    p = get_protocol("maskdistill", epochs=40, lr=0.1, lr_step=30, batch_size=8, train_size=24, conv_hidden=32).p
    head = train_head(lambda d: _head(kind, d, 4, p.conv_hidden), train["tokens"].data.shape[1],
                      cached_steps(train["tokens"], train.labels.labels, p), -1, p, 0, "cpu", lambda n=1: None)
    (conf,), _ = count_confusions(Predictions(ev["tokens"], ev.labels, [conv_head_scorer(head)], 4, "bilinear", None,
                                              Scoring()), 4, 255)
    noisy_acc = np.mean([(a == b).mean() for a, b in zip(tr_noisy, tr_truth)])
    sc = scores(remap(conf, match_labels(conf, "hungarian", None), 4))
    assert noisy_acc < 0.75  # the labels it learnt from were ~70 % right; chance is 25 %
    assert sc["pixel_acc"] > 0.9 and sc["miou"] > 0.8


# --- the whole protocol on planted scenes ------------------------------------------------------------------------

COLOURS = np.array([[128, 128, 128], [230, 30, 30], [30, 200, 40], [40, 60, 230]], dtype=np.uint8)


class _Scenes(SegmentationDataset):
    """Images of 96x64 px (a 4x6 grid of 16 px patches at Transform('pad', 64, 16), scale 1): a grey background (class
    0) and one rectangle of patches in class 1, 2 or 3's colour."""

    id = "scenes"
    class_names = ("background", "red", "green", "blue")
    ignore_index = 255

    def __init__(self, split, n, seed):
        self.split, self._n = split, n
        rng = np.random.default_rng(seed)
        self.objects = []
        for i in range(n):
            r, c = int(rng.integers(0, 2)), int(rng.integers(0, 3))
            self.objects.append((1 + i % 3, r, c, r + 1 + int(rng.integers(0, 2)), c + 2 + int(rng.integers(0, 2))))

    def __len__(self):
        return self._n

    def content_sha256(self):
        return self.split

    def image_size(self, i):
        return 96, 64

    def grid(self, i):
        cls, r0, c0, r1, c1 = self.objects[i]
        g = np.zeros((4, 6), dtype=np.int64)
        g[r0: r1 + 1, c0: c1 + 1] = cls
        return g

    def load_image(self, i):
        return Image.fromarray(COLOURS[np.kron(self.grid(i), np.ones((16, 16), dtype=np.int64))])


def _scene_features(tmp_path, ds: _Scenes) -> FeatureSet:
    shared = np.random.default_rng(0)  # the same key direction and class centres in every split
    v = shared.normal(size=8)
    centres = shared.normal(size=(4, 12)).astype(np.float32)
    rng = np.random.default_rng(len(ds))
    attn, keys, tokens, labels = [], [], [], []
    for i in range(len(ds)):
        g = ds.grid(i)
        fg = g > 0
        a = np.where(fg[..., None], 1.0, 0.01) * np.ones((4, 6, 6))
        a[tuple(np.argwhere(fg)[0])] = 3.0
        attn.append((a / a.sum((0, 1), keepdims=True)).astype(np.float32))
        keys.append((np.where(fg[..., None], v, -v) + 0.1 * rng.normal(size=(4, 6, 8))).astype(np.float32))
        tokens.append(centres[g] + 0.1 * rng.normal(size=(4, 6, 12)).astype(np.float32))
        labels.append(np.kron(g, np.ones((16, 16), dtype=np.int64)))
    root = tmp_path / ds.split
    return FeatureSet({"attn": store(root / "attn", attn), "keys": store(root / "keys", keys),
                       "tokens": store(root / "tokens", tokens)}, store(root / "labels", labels, np.uint8),
                      keys={})


class _MeanColour(torch.nn.Module):
    """A stand-in backbone whose CLS token is the crop's mean (normalised) colour."""

    spec = BackboneSpec(id="mean-colour", loader="builtin", repo_id="test", revision="1", patch_size=16, embed_dim=3,
                        num_prefix_tokens=1, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), method="test", paper=None,
                        license="test")

    def forward(self, x, layer=-1, facets=("cls",)):
        return {"cls": x.mean((2, 3))}


class _Ref:
    spec, source, revision = _MeanColour.spec, "test:mean-colour", "1"

    def __init__(self):
        self.loads = 0

    def load(self, device="cpu"):
        self.loads += 1
        return _MeanColour()


def _scene_sets(tmp_path):
    ev, tr = _Scenes("val", 12, 1), _Scenes("train", 24, 2)
    return ev, tr, {"val": _scene_features(tmp_path, ev), "train": _scene_features(tmp_path, tr)}


def _scene_ctx(scene_sets, save_masks=None, with_train=True):
    ev, tr, sets = scene_sets
    return Context(eval_set=ev, train_set=tr if with_train else None, features=lambda ds, facets: sets[ds.split],
                   seeds=[0, 1], backbone_ref=_Ref(), transform=Transform("pad", 64, 16), save_masks=save_masks)


def test_pseudo_masks_recover_planted_scenes_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    scene_sets = _scene_sets(tmp_path / "f")
    ctx = _scene_ctx(scene_sets, save_masks=tmp_path / "masks")
    res = get_protocol("maskdistill").run(ctx)
    for s in res.per_seed:
        assert s["miou"] == 1.0 and s["pixel_acc"] == 1.0
        assert s["cluster_to_class"][0] == 0 and sorted(s["cluster_to_class"]) == [0, 1, 2, 3]
    info = res.info
    assert info["k"] == 3 and info["fit_set"] == "train+val" and info["n_masks"] == {"eval": 12, "train": 24}
    assert info["pseudo_cache_hit"] == {"eval": False, "train": False}
    saved = sorted((tmp_path / "masks").glob("*.png"))
    assert len(saved) == 12
    assert np.array_equal(np.asarray(Image.open(saved[0])), np.kron(ctx.eval_set.grid(0), np.ones((16, 16))))

    # a distillation stage reuses the cached masks and embeddings: no backbone pass at all
    ctx2 = _scene_ctx(scene_sets)
    res2 = get_protocol("maskdistill:distill-linear", epochs=15, lr=0.2, batch_size=8, train_size=32).run(ctx2)
    assert res2.info["pseudo_cache_hit"] == {"eval": True, "train": True}
    assert ctx2.backbone_ref.loads == 0
    assert res2.info["train_split"] == "train"
    assert all(s["miou"] > 0.9 for s in res2.per_seed)


def test_without_a_train_split_the_head_trains_on_eval_images_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    ctx = _scene_ctx(_scene_sets(tmp_path), with_train=False)
    res = get_protocol("maskdistill:distill-conv", epochs=2, conv_hidden=8).run(ctx)
    assert "same images" in res.info["train_split"] and res.info["fit_set"] == "val"


def test_bad_parameters_are_named():
    with pytest.raises(ProtocolError, match="stage must be one of"):
        get_protocol("maskdistill", stage="distill").run(None)
    with pytest.raises(ProtocolError, match="whiten must be one of"):
        get_protocol("maskdistill", whiten="zca").run(None)


# --- end to end --------------------------------------------------------------------------------------------------


def _records(root):
    return dict(iter_records(root))


def test_end_to_end_on_synthetic_writes_records_and_masks(small_synthetic, tmp_path, monkeypatch):
    from ssl_segbench.cli import main

    def run(res, *extra):
        return main(["run", "--backbone", "random_vits16", "--dataset", "synthetic", "--data-root",
                     str(small_synthetic), "--size", "64", "--results-dir", str(res), *extra])

    assert run(tmp_path / "a", "--protocol", "maskdistill,maskdistill:distill-linear", "--param",
               "maskdistill.epochs=3", "--save-masks", str(tmp_path / "masks")) == 0
    recs = list(_records(tmp_path / "a").values())
    assert sorted(r.protocol["params"]["stage"] for r in recs) == ["distill-linear", "pseudo"]
    distilled = next(r for r in recs if r.protocol["params"]["stage"] == "distill-linear")
    assert set(distilled.info["pseudo_cache_hit"].values()) == {True}  # the first stage's masks were reused
    pngs = sorted((tmp_path / "masks" / "maskdistill").glob("*.png"))
    assert [p.stem for p in pngs] == [f"syn_test_{i:05d}" for i in range(8)]
    assert len(list((tmp_path / "masks" / "maskdistill" / "distill-linear").glob("*.png"))) == 8
    pseudo = next(r for r in recs if r.protocol["params"]["stage"] == "pseudo")
    assert 0 < pseudo.metrics["miou"]["mean"] <= 1

    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "fresh-cache"))  # recompute everything: deterministic
    assert run(tmp_path / "b", "--protocol", "maskdistill", "--param", "maskdistill.epochs=3") == 0
    (again,) = _records(tmp_path / "b").values()
    assert set(again.info["pseudo_cache_hit"].values()) == {False}
    assert again.per_seed == pseudo.per_seed


def test_real_backbone_on_the_voc_sample(shared, tmp_path):
    from ssl_segbench.cli import main

    res = tmp_path / "res"
    assert main(["run", "--backbone", str(shared / "models" / "dinov2-small-imgfocus"), "--dataset", "voc-rgb",
                 "--data-root", str(shared / "data" / "voc_sample"), "--split", "all", "--size", "224",
                 "--protocol", "maskdistill", "--param", "maskdistill.crop_size=112", "--param",
                 "maskdistill.center_keys=true", "--results-dir", str(res)]) == 0
    (rec,) = _records(res).values()
    assert rec.info["n_masks"] == {"eval": 14} and rec.info["k_effective"] == 14
    assert 0 < rec.info["mask_area"]["eval"] < 0.9  # an object, not the whole image
    assert rec.metrics["pixel_acc"]["mean"] > 0.5  # background outside the masks is mostly right
