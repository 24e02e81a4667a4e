"""`leopart-cd`: the co-occurrence graph by hand, infomap on planted communities, the noisy foreground, CBFE, and the
protocol end to end."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from stores import PlantedDataset, store

from ssl_segbench.cache import RowWriter
from ssl_segbench.cli import main
from ssl_segbench.features import FeatureSet
from ssl_segbench.metrics import scores_from_stats
from ssl_segbench.protocols import Context, ProtocolError, get_protocol
from ssl_segbench.protocols.leopart_cd import (
    CD_HPARAMS,
    cbfe_threshold,
    cluster_precisions,
    communities,
    cooccurrence_matrix,
    graph_edges,
    noisy_foreground,
)
from ssl_segbench.records import iter_records
from ssl_segbench.transforms import Transform


def test_cooccurrence_matrix_by_hand():
    # distances [1, 2] × angles i·π/4 give each axial offset (±1 and ±2 along rows and columns) once and each
    # diagonal offset (±1, ±1) twice (at distance 2 the diagonals round to (±1, ±1) again).
    img1 = np.array([[0, 0, 1],
                     [0, 2, 1]])
    # unordered neighbour pairs of img1 (multiplicity): 0-1: (0,1)(0,2) h1, (0,0)(0,2) h2, (1,0)(1,2) h2,
    # (0,1)(1,2) diagonal ×2 → 5; 0-2: (1,0)(1,1) h1, (0,1)(1,1) v1, (0,0)(1,1) diagonal ×2 → 4;
    # 1-2: (1,1)(1,2) h1, (0,2)(1,1) diagonal ×2 → 3. Rows normalised: [0, 5/9, 4/9], [5/8, 0, 3/8], [4/7, 3/7, 0].
    img2 = np.array([[0, 2]])  # one 0-2 pair: rows [0, 0, 1], [0, 0, 0], [1, 0, 0]
    img3 = np.ones((2, 2), dtype=int)  # cluster 1 alone: no pair, but the image contains cluster 1
    a = cooccurrence_matrix([img1, img2, img3], 3)
    # every cluster occurs in 2 images
    expected = np.array([[0, 5 / 9, 4 / 9 + 1], [5 / 8, 0, 3 / 8], [4 / 7 + 1, 3 / 7, 0]]) / 2
    np.testing.assert_allclose(a, expected)
    # a cluster that never occurs has a zero row, not NaN
    assert np.all(cooccurrence_matrix([img1], 4)[3] == 0)


def test_graph_edges_keep_both_directions_above_threshold():
    a = np.array([[0, 5 / 18, 13 / 18], [5 / 16, 0, 3 / 16], [11 / 14, 3 / 14, 0]])
    edges = graph_edges(a, 0.2)
    assert [(s, t) for s, t, _ in edges] == [(0, 1), (0, 2)]  # 1-2 drops: a_12 = 3/16 < 0.2
    assert [w for *_, w in edges] == pytest.approx([5 / 18, 13 / 18])  # min of the two directions


def test_infomap_recovers_planted_communities_from_cooccurrence():
    rng = np.random.default_rng(0)
    planted = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    maps = []
    for n in range(30):
        m = np.kron(rng.choice(planted[n % 3], size=(6, 6)), np.ones((2, 2), dtype=int))
        if n % 5 == 0:  # a thin strip of another community: weak links across communities
            m[-1, :] = planted[(n + 1) % 3][0]
        maps.append(m)
    edges = graph_edges(cooccurrence_matrix(maps, 9), 0.02)
    assert any(s // 3 != t // 3 for s, t, _ in edges)  # the planted structure is not just disconnected pieces
    for seed in range(1, 11):
        assert communities(edges, 9, 1.0, 3, seed).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_clusters_without_edges_keep_their_own_label():
    merged = communities([(0, 1, 0.5), (1, 2, 0.5), (0, 2, 0.5)], 5, 1.0, 2, 1)
    assert merged.tolist() == [0, 0, 0, 1, 2]
    assert communities([], 3, 1.0, 2, 1).tolist() == [0, 1, 2]


def test_noisy_foreground_keeps_mass_and_drops_small_components():
    attn = np.full((8, 8, 2), 0.001, dtype=np.float32)
    attn[2:5, 2:5] = 10.0  # a 3×3 blob
    attn[7, 7] = 10.0  # an isolated patch: a component of 1 ≤ 2 patches
    fg = noisy_foreground(attn, kernel=1, mass=0.99)
    expected = np.zeros((8, 8), dtype=bool)
    expected[2:5, 2:5] = True
    np.testing.assert_array_equal(fg, expected)
    # with the isolated patch kept (drop_upto 0) it is foreground too
    assert noisy_foreground(attn, kernel=1, mass=0.99, drop_upto=0)[7, 7]
    # Leopart's settings on a smooth bump: the peak is foreground, the far corner is not, and the kept patches hold
    # at least 65 % of the attention
    yy, xx = np.mgrid[0:12, 0:12]
    bump = np.exp(-((yy - 4) ** 2 + (xx - 6) ** 2) / 8.0)[..., None].repeat(3, -1).astype(np.float32)
    fg = noisy_foreground(bump)
    assert fg[4, 6] and not fg[11, 0] and bump[..., 0][fg].sum() / bump[..., 0].sum() >= 0.6


def test_cluster_precisions_and_label_free_thresholds():
    cm1 = np.array([[0, 0], [1, 2]])
    fg1 = np.array([[True, False], [True, True]])
    cm2 = np.array([[1, 1], [1, 1]])
    fg2 = np.zeros((2, 2), dtype=bool)
    precs = cluster_precisions([cm1, cm2], [fg1, fg2], 4, [(4, 4), (2, 2)])
    # cluster 0: 1/2 in image 1; cluster 1: 1 in image 1, 0 in image 2; cluster 2: 1; cluster 3 never occurs
    np.testing.assert_allclose(precs[:3], [0.5, 0.5, 1.0])
    assert np.isnan(precs[3])
    assert cbfe_threshold(precs, 0.5) == 0.5
    bimodal = np.array([0.05, 0.1, 0.12, 0.15, 0.8, 0.85, 0.9, np.nan])
    t = cbfe_threshold(bimodal, "otsu")
    assert 0.15 < t < 0.8
    with pytest.raises(ProtocolError, match="cbfe_threshold"):
        cbfe_threshold(precs, "oracle")


def _planted(tmp_path, n=12, grid=8, patch=4, dim=16, empty=()):
    """Background (class 0, low attention) with the three object classes as 2×2-patch squares (high attention);
    the images in `empty` are background only."""
    rng = np.random.default_rng(1)
    centres = np.random.default_rng(7).normal(size=(4, dim)).astype(np.float32) * 3
    tokens, attn, labels = [], [], []
    for i in range(n):
        g = np.zeros((grid, grid), dtype=np.int64)
        for c, (r, col) in zip((1, 2, 3), [(0, 0), (0, 5), (5, 2)] if i not in empty else []):
            dr, dc = rng.integers(0, 2, size=2)
            g[r + dr: r + dr + 2, col + dc: col + dc + 2] = c
        tokens.append(centres[g] + 0.05 * rng.normal(size=(grid, grid, dim)).astype(np.float32))
        attn.append(np.where(g > 0, 1.0, 0.02)[..., None].repeat(3, -1).astype(np.float32))
        labels.append(np.kron(g, np.ones((patch, patch), dtype=np.int64)))
    fs = FeatureSet({"tokens": store(tmp_path / "tokens", tokens), "attn": store(tmp_path / "attn", attn)},
                    store(tmp_path / "labels", labels, np.uint8), keys={})
    return fs


def _ctx(fs, seeds, save=None):
    return Context(eval_set=PlantedDataset(CLASSES, 12), train_set=None, features=lambda ds, facets: fs, seeds=seeds,
                   save_masks=save)


def test_protocol_recovers_planted_objects_without_merging(tmp_path):
    fs = _planted(tmp_path)
    # weight threshold above any co-occurrence: no edge, every cluster keeps its label (3 objects + background)
    proto = get_protocol("leopart-cd", k=3, markov_time=1.0, weight_threshold=2.0, cbfe_k=8, pca_dim=8,
                         eval_size=None)
    res = proto.run(_ctx(fs, [0, 1], save=tmp_path / "masks"))
    info = res.info
    assert info["cbfe"]["eval"]["threshold"] == 0.5 and info["graph"]["edges"] == 0
    assert "eval only" in info["fit_splits"] and "with labels" in info["cd_hparams"]["found_with_labels"]
    assert info["preferred_modules"] == 3 and info["infomap_seeds"] == [1, 2]
    for s in res.per_seed:
        assert s["merged_labels"] == 4 and s["miou"] == 1.0 and s["pixel_acc"] == 1.0
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == sorted(f"img{i}.png" for i in range(12))


def test_an_image_without_foreground_is_all_background(tmp_path):
    """CBFE can leave an image with no foreground token (seen on the synthetic set with random_vits16): the image is
    predicted background everywhere, the others as before."""
    fs = _planted(tmp_path, empty=(0,))
    res = get_protocol("leopart-cd", k=3, markov_time=1.0, weight_threshold=2.0, cbfe_k=8, pca_dim=8,
                       eval_size=None).run(_ctx(fs, [0]))
    s = res.per_seed[0]
    assert s["merged_labels"] == 4 and s["miou"] == 1.0 and s["pixel_acc"] == 1.0
    assert np.asarray(res.confusions[0])[0].sum() > np.asarray(res.confusions[0])[1].sum()  # image 0: background


def test_fewer_merged_labels_than_classes_count_as_wrong(tmp_path):
    fs = _planted(tmp_path)
    res = get_protocol("leopart-cd", k=2, markov_time=1.0, weight_threshold=2.0, cbfe_k=8, pca_dim=8,
                       eval_size=None).run(_ctx(fs, [0]))
    s = res.per_seed[0]
    # 2 foreground clusters + background = 3 labels for 4 classes: one class is never predicted
    assert s["merged_labels"] == 3 and 0.0 in s["per_class_iou"] and s["miou"] < 1.0



def test_protocol_returns_per_image_stats_that_reproduce_each_seed(tmp_path):
    fs = _planted(tmp_path)
    for eval_size in (None, 16):
        res = get_protocol("leopart-cd", k=2, markov_time=1.0, weight_threshold=2.0, cbfe_k=8, pca_dim=8,
                           eval_size=eval_size).run(_ctx(fs, [0, 1]))
        stats = res.image_stats
        assert stats.shape == (2, 12, 4, 3)  # seeds, images, classes, [tp, fp, fn]
        for j, s in enumerate(res.per_seed):
            sc = scores_from_stats(stats[j].sum(0))
            assert sc["miou"] == pytest.approx(s["miou"]) and sc["pixel_acc"] == pytest.approx(s["pixel_acc"])


CLASSES = ("bg", "a", "b", "c")


class _PlantedImages(PlantedDataset):
    """The planted scenes as images too: each class a flat colour (for the CRF)."""

    def __init__(self, labels):
        super().__init__(CLASSES, len(labels))
        self.labels = labels

    def load_image(self, i):
        from PIL import Image

        colours = np.array([[128, 128, 128], [220, 30, 30], [30, 220, 30], [30, 30, 220]], dtype=np.uint8)
        return Image.fromarray(colours[self.labels[i]])


def test_protocol_with_crf_completes_and_records_it(tmp_path):
    pytest.importorskip("pydensecrf.densecrf")
    fs = _planted(tmp_path)
    labels = [np.asarray(fs.labels.labels(i)) for i in range(12)]
    ds = _PlantedImages(labels)
    key = {"dataset": ds.id, "split": ds.split, "content_sha256": ds.content_sha256(),
           "transform": Transform("square", 32, 4).to_dict()}
    w = RowWriter(tmp_path / "keyed", key, [a.shape for a in labels], 1, np.uint8, False)
    for i, a in enumerate(labels):
        w.write(i, a.reshape(-1, 1))
    keyed = FeatureSet({"tokens": fs["tokens"], "attn": fs["attn"]}, w.commit({}), keys={})
    ctx = Context(eval_set=ds, train_set=None, features=lambda d, facets: keyed, seeds=[0, 1])
    res = get_protocol("leopart-cd", k=3, markov_time=1.0, weight_threshold=2.0, cbfe_k=8, pca_dim=8,
                       eval_size=16, crf=True).run(ctx)
    assert res.info["crf"]["images_refined"] == 24  # 12 images × 2 seeds
    assert res.image_stats.shape == (2, 12, 4, 3)
    for j, s in enumerate(res.per_seed):
        assert s["miou"] > 0.9  # flat colour regions that agree with the planted labels: the CRF keeps them
        assert scores_from_stats(res.image_stats[j].sum(0))["miou"] == pytest.approx(s["miou"])

def test_hyperparameters_follow_the_backbone_and_say_they_used_labels():
    def hp(dim, patch, **params):
        ref = SimpleNamespace(spec=SimpleNamespace(embed_dim=dim, patch_size=patch))
        ctx = Context(eval_set=PlantedDataset(CLASSES, 1), train_set=None, features=None, seeds=[0], backbone_ref=ref)
        return get_protocol("leopart-cd", **params)._cd_hparams(ctx)

    vals, info = hp(768, 8)
    assert vals == CD_HPARAMS["vitb8"] == {"k": 109, "markov_time": 0.4, "weight_threshold": 0.07}
    assert info["cd_hparams"]["same_width_and_patch_as_source"] is True
    vals, info = hp(384, 14, k=20)
    assert vals == {"k": 20, "markov_time": 2.0, "weight_threshold": 0.09}
    assert info["cd_hparams"]["same_width_and_patch_as_source"] is False
    assert "optuna" in info["cd_hparams"]["found_with_labels"]
    assert get_protocol("leopart-cd:vits16").params["k"] == 149
    assert get_protocol("leopart-cd:leopart").params["size"] == 448
    with pytest.raises(ProtocolError, match="no backbone"):
        get_protocol("leopart-cd").run(Context(eval_set=PlantedDataset(CLASSES, 1), train_set=None, features=None,
                                               seeds=[0]))


def _cli(tmp_path, data, *extra):
    return main(["run", "--backbone", "random_vits16", "--dataset", "synthetic", "--data-root", str(data),
                 "--size", "64", "--protocol", "leopart-cd", "--param", "leopart-cd.cbfe_k=20",
                 "--param", "leopart-cd.k=10", "--seeds", "3", "--results-dir", str(tmp_path), *extra])


def test_cli_writes_record_masks_and_is_deterministic(small_synthetic, tmp_path):
    assert _cli(tmp_path / "a", small_synthetic, "--save-masks", str(tmp_path / "masks")) == 0
    assert _cli(tmp_path / "b", small_synthetic) == 0
    (_, a), = iter_records(tmp_path / "a")
    (_, b), = iter_records(tmp_path / "b")
    assert a.protocol["name"] == "leopart-cd" and len(a.per_seed) == 3
    assert a.info["fit_splits"] == "test + train" and a.info["cd_hparams"]["k"] == 10
    assert a.per_seed == b.per_seed
    pngs = sorted((tmp_path / "masks" / "leopart-cd").glob("*.png"))
    assert len(pngs) == a.dataset["n_images"] == 8
