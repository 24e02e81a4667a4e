"""`overcluster`: many-to-one (majority) matching of K ≫ C clusters recovers planted classes exactly."""
from __future__ import annotations

import numpy as np
import pytest
from stores import PlantedDataset, feature_set

from ssl_segbench.cli import main
from ssl_segbench.metrics import many_to_one, match_and_score
from ssl_segbench.protocols import Context, ProtocolError, get_protocol
from ssl_segbench.records import iter_records


def _ctx(tmp_path, seeds, n=10, grid=8, patch=4, dim=16):
    """2×2 quadrants of the 4 classes per image; each token = its class centre + small noise; labels patch-aligned."""
    rng = np.random.default_rng(0)
    centres = np.random.default_rng(99).normal(size=(4, dim)).astype(np.float32)
    tokens, labels = [], []
    half = grid // 2
    for _ in range(n):
        c = rng.permutation(4)
        g = np.block([[np.full((half, half), c[0]), np.full((half, half), c[1])],
                      [np.full((half, half), c[2]), np.full((half, half), c[3])]])
        tokens.append(centres[g] + 0.05 * rng.normal(size=(grid, grid, dim)).astype(np.float32))
        lab = np.kron(g, np.ones((patch, patch), dtype=np.int64))
        lab[0, :] = 255
        labels.append(lab)
    fs = feature_set(tmp_path / "fs", tokens, labels)
    return Context(eval_set=PlantedDataset("abcd", n), train_set=None, features=lambda ds, facets: fs, seeds=seeds)


def test_overclustering_planted_classes_is_exact(tmp_path):
    res = get_protocol("overcluster", k=12).run(_ctx(tmp_path, [0, 1, 2]))
    assert res.info["k"] == 12 and res.info["points_per_cluster"] == round(640 / 12, 2)
    for s in res.per_seed:
        # 12 clusters over 4 well-separated classes: every cluster is pure, so majority voting is exact
        assert s["miou"] == 1.0 and s["pixel_acc"] == 1.0 and s["mf1"] == 1.0
        assert len(s["cluster_to_class"]) == 12 and s["classes_hit"] == 4
    assert np.asarray(res.confusions).shape == (3, 4, 12)


def test_many_to_one_mapping_by_hand():
    # rows: classes, columns: clusters
    conf = np.array([[5, 0, 2, 0],
                     [1, 4, 3, 0],
                     [0, 1, 0, 0]])
    assert many_to_one(conf).tolist() == [0, 1, 1, -1]  # cluster 3 has no labelled pixel
    sc, mapping = match_and_score(conf, "many-to-one")
    assert mapping.tolist() == [0, 1, 1, -1]
    # after mapping, class 0 is predicted by cluster 0 (column [5, 1, 0]) and class 1 by clusters 1 + 2
    # ([0 + 2, 4 + 3, 1 + 0]); nothing predicts class 2. IoU = tp / (true + predicted - tp):
    iou0 = 5 / (7 + 6 - 5)
    iou1 = 7 / (8 + 10 - 7)
    iou2 = 0 / (1 + 0 - 0)
    assert sc["per_class_iou"] == pytest.approx([iou0, iou1, iou2])
    assert sc["miou"] == pytest.approx((iou0 + iou1 + iou2) / 3)
    assert sc["pixel_acc"] == pytest.approx(12 / 16)


def test_parameters_and_errors(tmp_path):
    p = get_protocol("overcluster").params
    assert p["k"] == 500 and p["matching"] == "many-to-one"
    lp = get_protocol("overcluster:leopart").params
    assert (lp["resize"], lp["size"], lp["eval_size"], lp["pca_dim"], lp["upsample"]) == ("square", 448, 100, 50,
                                                                                        "nearest")
    assert lp["standardize"] and lp["matching"] == "many-to-one"
    with pytest.raises(ProtocolError, match="overcluster.k=100"):
        get_protocol("overcluster", k=1000).run(_ctx(tmp_path / "a", [0]))
    with pytest.raises(ProtocolError, match=r"matching must be one of \('many-to-one',\)"):
        get_protocol("overcluster", matching="hungarian-pixels")  # refused when made, before any work


def _cli(tmp_path, data, *extra):
    return main(["run", "--backbone", "random_vits16", "--dataset", "synthetic", "--data-root", str(data),
                 "--size", "64", "--protocol", "overcluster", "--param", "overcluster.k=20", "--seeds", "2",
                 "--results-dir", str(tmp_path), *extra])


def test_cli_writes_record_and_is_deterministic(small_synthetic, tmp_path):
    assert _cli(tmp_path / "a", small_synthetic, "--save-masks", str(tmp_path / "masks")) == 0
    assert _cli(tmp_path / "b", small_synthetic) == 0
    (_, a), = iter_records(tmp_path / "a")
    (_, b), = iter_records(tmp_path / "b")
    assert a.protocol["name"] == "overcluster" and a.protocol["params"]["k"] == 20
    assert a.info["k"] == 20 and a.dataset["n_images"] == 8
    assert a.per_seed == b.per_seed
    # --save-masks keeps the first seed's maps in class space: one palette PNG per image, class ids only
    from PIL import Image

    pngs = sorted((tmp_path / "masks" / "overcluster").glob("*.png"))
    assert [p.stem for p in pngs] == [f"syn_test_{i:05d}" for i in range(8)]
    assert all(set(np.unique(np.asarray(Image.open(p)))) <= set(range(8)) | {255} for p in pngs)
