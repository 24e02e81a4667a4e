"""Protocols recover planted answers."""
from __future__ import annotations

import numpy as np
import pytest
from stores import PlantedDataset, feature_set

from ssl_segbench.protocols import Context, ProtocolError, get_protocol


def _planted(tmp_path, name, n, seed, dim=16, noise=0.05, grid=8, patch=4):
    """Images of 2×2 quadrants of classes; each token = its class centre + noise; labels aligned to patches."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(4, dim)).astype(np.float32)
    tokens, labels = [], []
    for _ in range(n):
        cls = rng.permutation(4)
        half = grid // 2
        g = np.block([[np.full((half, half), cls[0]), np.full((half, half), cls[1])],
                      [np.full((half, half), cls[2]), np.full((half, half), cls[3])]])
        tokens.append(centres[g] + noise * rng.normal(size=(grid, grid, dim)).astype(np.float32))
        lab = np.kron(g, np.ones((patch, patch), dtype=np.int64))
        lab[0, :] = 255
        labels.append(lab)
    return feature_set(tmp_path / name, tokens, labels)


def _ctx(tmp_path, seeds, with_train=True):
    ev, tr = PlantedDataset("abcd", 10, "val"), PlantedDataset("abcd", 20, "train")
    sets = {"val": _planted(tmp_path, "val", 10, 1), "train": _planted(tmp_path, "train", 20, 2)}
    return Context(eval_set=ev, train_set=tr if with_train else None,
                   features=lambda ds, facets: sets[ds.split], seeds=seeds)


def test_kmeans_recovers_planted_clusters_exactly(tmp_path):
    res = get_protocol("kmeans").run(_ctx(tmp_path, [0, 1, 2]))
    for s in res.per_seed:
        assert s["miou"] == 1.0 and s["pixel_acc"] == 1.0
        assert sorted(s["cluster_to_class"]) == [0, 1, 2, 3]


def test_kmeans_leopart_preset_recovers_planted_clusters(tmp_path):
    proto = get_protocol("kmeans:leopart", pca_dim=8)
    assert proto.params["matching"] == "hungarian-iou" and proto.params["standardize"]
    res = proto.run(_ctx(tmp_path, [0]))
    assert res.per_seed[0]["miou"] > 0.95


def test_kmeans_on_noise_is_near_chance(tmp_path):
    rng = np.random.default_rng(0)
    tokens = [rng.normal(size=(8, 8, 16)).astype(np.float32) for _ in range(10)]
    labels = [np.kron(rng.integers(0, 4, size=(8, 8)), np.ones((4, 4), dtype=np.int64)) for _ in range(10)]
    fs = feature_set(tmp_path / "noise", tokens, labels)
    ctx = Context(eval_set=PlantedDataset("abcd", 10), train_set=None, features=lambda ds, f: fs, seeds=[0])
    assert get_protocol("kmeans").run(ctx).per_seed[0]["miou"] < 0.3


def test_linear_probe_learns_planted_classes(tmp_path):
    # 20 images are one SGD step per epoch: give the probe enough steps
    res = get_protocol("linear", epochs=60, lr=0.1, lr_step=50).run(_ctx(tmp_path, [0]))
    assert res.per_seed[0]["miou"] > 0.95
    assert res.info["train_split"] == "train"


def test_linear_probe_without_train_split_says_so(tmp_path):
    res = get_protocol("linear", epochs=2).run(_ctx(tmp_path, [0], with_train=False))
    assert "same images" in res.info["train_split"]


def test_same_seed_same_numbers(tmp_path):
    a = get_protocol("kmeans", k=6).run(_ctx(tmp_path / "a", [3]))
    b = get_protocol("kmeans", k=6).run(_ctx(tmp_path / "b", [3]))
    assert a.per_seed == b.per_seed


def test_bad_parameters_are_named():
    with pytest.raises(ProtocolError, match="unknown parameter.*'kk'"):
        get_protocol("kmeans", kk=3)
    with pytest.raises(ProtocolError, match=r"kmeans: matching must be one of \('hungarian-pixels', 'hungarian-iou'\)"):
        get_protocol("kmeans", matching="many-to-one").run(None)  # many-to-one is the overcluster protocol
    with pytest.raises(ProtocolError, match="no preset 'nope'"):
        get_protocol("kmeans:nope")
    with pytest.raises(ProtocolError, match="Known: datus, fs4, kmeans, leopart-cd, linear"):
        get_protocol("kmeanz")


def test_saved_label_map_keeps_labels_and_palette(tmp_path):
    from PIL import Image

    from ssl_segbench.protocols.base import save_label_map

    lab = np.array([[0, 1], [2, 255]])
    save_label_map(tmp_path / "m.png", lab, np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.uint8))
    im = Image.open(tmp_path / "m.png")
    assert im.mode == "P" and np.asarray(im).tolist() == lab.tolist()
    assert np.asarray(im.convert("RGB")).tolist() == [[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [0, 0, 0]]]
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]


def test_every_shipped_preset_is_valid_and_a_stray_preset_key_is_refused(monkeypatch):
    from ssl_segbench.protocols import PROTOCOLS

    for name, cls in PROTOCOLS.items():
        for preset in (None, *cls.presets):
            proto = get_protocol(name if preset is None else f"{name}:{preset}")  # validates every value
            assert set(proto.params) == set(cls.all_defaults())
    monkeypatch.setitem(PROTOCOLS["kmeans"].presets, "typo", {"nredo": 3, "nred0": 3})
    with pytest.raises(ProtocolError, match=r"preset 'typo' sets \['nred0'\], which are not parameters"):
        get_protocol("kmeans:typo")


@pytest.mark.parametrize("overrides, message", [
    ({"k": 0}, "k must be > 0"), ({"k": 2.5}, "k must be int or null"), ({"niter": True}, "niter must be int"),
    ({"crf": "yes"}, "crf must be bool or dict"), ({"crf": {"iterations": 5, "sxy": 1}}, "unknown field"),
    ({"crf_temperature": 0}, "crf_temperature must be > 0"), ({"resize": "crop"}, "resize must be one of"),
])
def test_bad_values_are_refused_when_the_protocol_is_made(overrides, message):
    with pytest.raises(ProtocolError, match=message):
        get_protocol("kmeans", **overrides)


@pytest.mark.parametrize("upsample,eval_size", [("nearest", None), ("nearest", 10), ("bilinear", None)])
def test_batched_prediction_equals_a_per_pixel_reference(tmp_path, upsample, eval_size):
    """The prediction stream scores images in batches of equal shapes; its confusions, per-image confusions and label
    maps must equal a brute-force per-pixel loop: nearest upsampling = the nearest centroid of the token each label
    pixel falls in; bilinear = the argmax of the per-image upsampled scores. Grids of three sizes interleave (so
    batches break on shape) and ignore pixels are planted."""
    import torch
    import torch.nn.functional as F

    from ssl_segbench.cluster import centroid_scores
    from ssl_segbench.metrics import confusion
    from ssl_segbench.protocols.base import Predictions, Scoring, count_confusions

    rng = np.random.default_rng(5)
    grids = [(3, 4), (3, 4), (5, 2), (3, 4), (4, 4), (4, 4)]
    tokens = [rng.normal(size=(h, w, 6)).astype(np.float16).astype(np.float32) for h, w in grids]
    labels = [rng.integers(0, 4, size=(4 * h, 3 * w)) for h, w in grids]
    for lab in labels:
        lab[rng.random(lab.shape) < 0.1] = 255
    cents = rng.normal(size=(5, 6)).astype(np.float32)
    fs = feature_set(tmp_path / "fs", tokens, labels)
    seen = {}
    stream = Predictions(fs["tokens"], fs.labels, [centroid_scores(cents, spherical=False)], 5, upsample, eval_size,
                         Scoring())
    (conf,), per_image = count_confusions(stream, 4, 255, on_labels=lambda i, j, lab: seen.__setitem__(i, lab))

    expected = np.zeros((4, 5), np.int64)
    for i, (t, lab) in enumerate(zip(tokens, labels)):
        if eval_size:
            r = np.arange(eval_size) * lab.shape[0] // eval_size
            c = np.arange(eval_size) * lab.shape[1] // eval_size
            lab = lab[r][:, c]
        hh, ww = lab.shape
        if upsample == "nearest":
            dist = ((t[:, :, None, :] - cents[None, None]) ** 2).sum(-1)  # (h, w, 5)
            near = dist.argmin(-1)
            pred = np.empty((hh, ww), np.int64)
            for y in range(hh):
                for x in range(ww):
                    pred[y, x] = near[y * t.shape[0] // hh, x * t.shape[1] // ww]
        else:
            s = torch.from_numpy(t @ cents.T - 0.5 * (cents ** 2).sum(1)).permute(2, 0, 1)[None]
            pred = F.interpolate(s, size=(hh, ww), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
        np.testing.assert_array_equal(seen[i], pred)
        one = confusion(lab, pred, 4, 5, 255)
        idx, counts = per_image[0][i]
        np.testing.assert_array_equal(np.bincount(idx, counts, minlength=one.size).reshape(one.shape), one)
        expected += one
    np.testing.assert_array_equal(conf, expected)

