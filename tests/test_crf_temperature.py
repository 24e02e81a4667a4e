"""Issue case 5: CRF unaries come from calibrated probabilities, softmax(scores / crf_temperature), with the
temperature recorded. Cosine scores at the default 0.5 are STEGO's log_softmax(2·cos); Euclidean k-means scores are
measured on unit-RMS features, so the Leopart preset's unaries are not one-hot (which made its CRF a no-op).

The CRF itself is replaced by a recorder here (the unaries are what is under test); the real CRF is tested in
test_crf.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from stores import PlantedDataset, store

import ssl_segbench.cluster as cluster
import ssl_segbench.crf as crf
import ssl_segbench.protocols.base as base
from ssl_segbench.cache import RowWriter
from ssl_segbench.features import FeatureSet
from ssl_segbench.protocols import Context, get_protocol
from ssl_segbench.records import SCHEMA, Record
from ssl_segbench.transforms import Transform


@pytest.fixture
def recorder(monkeypatch):
    """Capture the probabilities every CRF call receives; return the argmax as its 'refined' labels."""
    seen = []
    monkeypatch.setenv("SSL_SEGBENCH_CRF_WORKERS", "0")  # in this process, so the recorder is the one called
    monkeypatch.setattr(base, "require_crf", lambda: None)

    def fake(image, probs, params=None):
        seen.append(np.asarray(probs, dtype=np.float64))
        return np.asarray(probs).argmax(0).astype(np.int64)

    monkeypatch.setattr(crf, "crf_refine", fake)
    return seen


@pytest.fixture
def raw_scores(monkeypatch):
    """The scores each centroid scoring function returns, per call, as the protocol computes them."""
    seen = []
    real = cluster.centroid_scores

    def wrapped(*a, **k):
        fn = real(*a, **k)

        def score(x):
            s = fn(x)
            seen.extend(s.clone())  # one (K, h, w) per image of the batch
            return s

        return score

    monkeypatch.setattr("ssl_segbench.protocols.clustering.centroid_scores", wrapped)
    return seen


def _ctx(tmp_path, scale=1.0, n=4, grid=4, patch=4, dim=8):
    """Planted tokens: two classes in the left and right halves, class centres 3 apart plus noise (× `scale`)."""
    rng = np.random.default_rng(0)
    centres = np.stack([np.zeros(dim), np.full(dim, 3.0 / np.sqrt(dim))]).astype(np.float32)
    tokens, labels, images = [], [], []
    for _ in range(n):
        g = np.zeros((grid, grid), dtype=np.int64)
        g[:, grid // 2:] = 1
        tokens.append(scale * (centres[g] + rng.normal(0, 0.6, (grid, grid, dim))).astype(np.float32))
        labels.append(np.kron(g, np.ones((patch, patch), dtype=np.int64)))
        images.append(np.kron(g[..., None] * 200, np.ones((patch, patch, 3), dtype=np.int64)).astype(np.uint8))
    fs = FeatureSet({"tokens": store(tmp_path / "planted" / "tokens", tokens)}, None, keys={})
    key = {"dataset": "planted", "split": "val", "content_sha256": "planted-val",  # the images the CRF compares with
           "transform": Transform("square", grid * patch, patch).to_dict()}
    w = RowWriter(tmp_path / "planted" / "keyed-labels", key, [lab.shape for lab in labels], 1, np.uint8, False)
    for i, lab in enumerate(labels):
        w.write(i, lab.reshape(-1, 1))
    fs = FeatureSet(fs.facets, w.commit({}), keys={})
    return Context(eval_set=PlantedDataset("ab", images=images), train_set=None, features=lambda ds, f: fs,
                   seeds=[0])


def _softmax_of_upsampled(scores: torch.Tensor, size, temperature: float) -> np.ndarray:
    up = F.interpolate(scores[None].double(), size=size, mode="bilinear", align_corners=False)[0]
    return torch.softmax(up / temperature, 0).numpy()


def test_cosine_unaries_are_stego_softmax_of_twice_the_cosine(tmp_path, recorder, raw_scores):
    res = get_protocol("kmeans", k=2, crf=True).run(_ctx(tmp_path / "default"))
    assert len(recorder) == len(raw_scores) == 4
    for probs, s in zip(recorder, raw_scores):
        np.testing.assert_allclose(probs, _softmax_of_upsampled(s, probs.shape[1:], 0.5), rtol=1e-5, atol=1e-6)
    assert raw_scores[0].abs().max() <= 1.0 + 1e-5  # the scores are cosines
    info = res.info["crf"]
    assert info["crf_temperature"] == 0.5 and info["score_types"] == ["cosine similarity to centroids"]
    # another temperature is another unary: proportionally sharper
    recorder.clear()
    raw_scores.clear()
    get_protocol("kmeans", k=2, crf=True, crf_temperature=0.1).run(_ctx(tmp_path / "sharper"))
    np.testing.assert_allclose(recorder[0], _softmax_of_upsampled(raw_scores[0], recorder[0].shape[1:], 0.1),
                               rtol=1e-5, atol=1e-6)


def test_euclidean_unaries_are_as_soft_as_cosine_ones_whatever_the_feature_scale(tmp_path, recorder, raw_scores):
    """Leopart's preset clusters standardised PCA-50 features with Euclidean k-means. Softmax of raw squared
    distances (the old unaries: 2x·c − |c|² at temperature 1) is one-hot on such features, so the CRF could not move
    a label; on unit-RMS features at the temperature of cosine scores the unaries are about as soft as cosine ones on
    the same data, and they do not depend on the features' scale."""
    kw = dict(k=2, crf=True, standardize=True, pca_dim=50, l2_normalize=False, spherical=False)
    sharpness = {}
    for scale in (1.0, 40.0):
        recorder.clear()
        raw_scores.clear()
        res = get_protocol("kmeans", **kw).run(_ctx(tmp_path / f"euclid-{scale}", scale=scale, dim=64))
        sharpness[scale] = np.stack(recorder).max(1).mean()
        s = res.info["score_scale"]
        assert s > 0 and "unit mean squared norm" in res.info["crf"]["score_types"][0]
        old = torch.softmax(torch.stack([2 * s * r for r in raw_scores]), 1).numpy()  # 2x·c − |c|², temperature 1
        assert old.max(1).mean() > 0.9999  # one-hot: the CRF had nothing to smooth
    recorder.clear()
    get_protocol("kmeans", k=2, crf=True).run(_ctx(tmp_path / "cosine", dim=64))
    cosine = np.stack(recorder).max(1).mean()
    assert sharpness[1.0] == pytest.approx(sharpness[40.0], abs=1e-4)
    assert 0.5 < cosine < 0.95 and 0.5 < sharpness[1.0] < 0.95


def test_the_temperature_is_part_of_the_column():
    def rec(**params):
        p = get_protocol("kmeans", crf=True, **params).params
        p.update(resize="shorter", size=224)
        ident = {"backbone": "b", "source": "b", "revision": None, "dataset": "d", "split": "val", "protocol": "kmeans",
                 "version": "1", "params": p, "layer": -1, "seeds": [0]}
        m = {"mean": 0.5, "std": 0.0, "per_seed": [0.5]}
        return Record(SCHEMA, "k", ident, {"id": "b", "revision_resolved": None}, {"n_images": 1},
                      {"name": "kmeans", "version": "1", "preset": None, "params": p}, [0], {"miou": m})

    a, b = rec(), rec(crf_temperature=1.0)
    assert "CRF T=0.5" in a.setting.column.label and "CRF T=1" in b.setting.column.label
    assert a.setting.column.id != b.setting.column.id
