"""`datus`: segment discovery on planted key affinities, 8-connected splitting, crop geometry, noise counted as wrong,
the protocol end to end (synthetic and the real SUIM sample)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from stores import PlantedDataset, store

from ssl_segbench.cache import RowWriter
from ssl_segbench.cli import main
from ssl_segbench.features import FeatureSet
from ssl_segbench.metrics import remap, scores, scores_from_stats
from ssl_segbench.protocols import Context, ProtocolError, get_protocol
from ssl_segbench.protocols.datus import (
    discover_segments,
    noise_excluded,
    noise_mapping,
    pixel_patches,
    segment_crop,
    split_components,
)
from ssl_segbench.records import iter_records
from ssl_segbench.transforms import Transform


def _canonical(seg: np.ndarray) -> list[int]:
    """Segment ids renumbered by first occurrence in raster order: equal lists mean equal partitions."""
    ids: dict[int, int] = {}
    return [ids.setdefault(int(v), len(ids)) for v in seg.ravel()]


def test_split_components_uses_8_connectivity():
    groups = np.array([[1, 0, 0, 1],
                       [0, 1, 0, 1],
                       [0, 0, 0, 0],
                       [1, 1, 0, 0]])
    # group 0 is one component (its cells touch through edges or corners); group 1 has three: the diagonal pair
    # (0,0)-(1,1), the column (0,3)-(1,3) and the bottom pair (3,0)-(3,1)
    expected = np.array([[1, 0, 0, 2],
                         [0, 1, 0, 2],
                         [0, 0, 0, 0],
                         [3, 3, 0, 0]])
    seg = split_components(groups)
    assert seg.max() == 3
    assert _canonical(seg) == _canonical(expected)


def _simplex_keys(classes: np.ndarray, n_dirs: int, noise: float = 0.01, seed: int = 0) -> np.ndarray:
    """Keys e_c − mean: the same class has affinity 1 − 1/n > 0, different classes −1/n < 0."""
    rng = np.random.default_rng(seed)
    dirs = np.eye(n_dirs, dtype=np.float32) - 1.0 / n_dirs
    return dirs[classes] + noise * rng.normal(size=(*classes.shape, n_dirs)).astype(np.float32)


def test_segment_discovery_recovers_planted_segments():
    planted = np.zeros((6, 6), dtype=int)
    planted[0:2, 0:2] = 1  # class 1 in two separate blobs
    planted[4:6, 3:6] = 1
    planted[0:3, 4:6] = 2
    keys = _simplex_keys(planted, 3)
    seg, positive = discover_segments(keys, seed=0)
    # Louvain groups = the 3 classes; class 1 splits into its 2 blobs: 4 segments
    expected = planted.copy()
    expected[4:6, 3:6] = 3
    assert _canonical(seg) == _canonical(expected)
    assert positive == pytest.approx(np.mean(planted.ravel()[:, None] == planted.ravel()[None, :]))


def test_common_key_component_makes_every_patch_noise_unless_centered():
    planted = np.zeros((6, 6), dtype=int)
    planted[:, 3:] = 1
    keys = _simplex_keys(planted, 2) + np.float32(5.0)  # a shared offset: every affinity positive
    seg, positive = discover_segments(keys)
    assert positive == 1.0 and seg.max() + 1 == 36  # complete graph: Louvain leaves every patch alone
    seg, _ = discover_segments(keys, center=True)  # attention-equivalent keys without the shared component
    assert _canonical(seg) == _canonical(planted)


def test_crop_maps_patches_back_to_the_original_image():
    # 8×4 image, shorter side 4 → scale 1, centre crop of columns 2..5, 2×2 patches of 2 px
    w, h = 8, 4
    img = Image.fromarray(np.stack([np.tile(np.arange(w), (h, 1)) * 10 + 5,
                                    np.tile(np.arange(h)[:, None], (1, w)) * 10 + 5,
                                    np.full((h, w), 200)], -1).astype(np.uint8))
    rows, cols = pixel_patches(Transform("shorter", 4, 2), w, h, (2, 2))
    assert rows.tolist() == [0, 0, 1, 1] and cols.tolist() == [-1, -1, 0, 0, 1, 1, -1, -1]
    seg = np.array([[False, True], [False, False]])
    crop = np.asarray(segment_crop(img, seg, rows, cols))
    # patch (0, 1) is x 4..5, y 0..1 of the original image
    assert crop.shape == (2, 2, 3) and crop[..., 0].tolist() == [[45, 55], [45, 55]]
    assert crop[..., 1].tolist() == [[5, 5], [15, 15]]
    # an L-shaped segment: bounding box of its patches, the patch outside the segment zeroed
    seg = np.array([[True, True], [False, True]])
    crop = np.asarray(segment_crop(img, seg, rows, cols))
    assert crop.shape == (4, 4, 3) and crop[2:, :2].max() == 0 and crop[:2, :2, 2].min() == 200
    # the image's RGB array, converted once for all its segments (segment_cls), crops the same pixels
    assert np.array_equal(np.asarray(segment_crop(np.asarray(img), seg, rows, cols)), crop)
    # square policy, downscaling 8×8 → 4×4: patch (1, 0) covers y 4..7, x 0..3
    rows, cols = pixel_patches(Transform("square", 4, 2), 8, 8, (2, 2))
    assert rows.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and cols.tolist() == rows.tolist()
    with pytest.raises(ProtocolError, match="patch grid"):
        pixel_patches(Transform("square", 4, 2), 8, 8, (3, 3))


def test_noise_counts_as_wrong_by_hand():
    # 2 classes, 2 clusters, last column = noise
    conf = np.array([[6, 1, 3],
                     [0, 5, 1]])
    mapping = noise_mapping(conf, "hungarian-pixels")
    main_sc, excl = scores(remap(conf, mapping, 2)), noise_excluded(conf, mapping)
    assert mapping.tolist() == [0, 1, -1]
    # noise pixels (3 + 1) are never correct: accuracy 11 / 16
    assert main_sc["pixel_acc"] == pytest.approx(11 / 16)
    # IoU = tp / (true + predicted − tp): class 0: 6 / (10 + 6 − 6), class 1: 5 / (6 + 6 − 5)
    assert main_sc["per_class_iou"] == pytest.approx([0.6, 5 / 7])
    assert main_sc["miou"] == pytest.approx((0.6 + 5 / 7) / 2)
    assert main_sc["mf1"] == pytest.approx((2 * 6 / 16 + 2 * 5 / 12) / 2)
    # the noise-excluded variant scores the same mapping on the 12 non-noise pixels
    assert excl["pixel_acc"] == pytest.approx(11 / 12)
    assert excl["per_class_iou"] == pytest.approx([6 / 7, 5 / 6])


def test_many_to_one_when_more_clusters_than_classes_by_hand():
    conf = np.array([[4, 3, 0, 2],
                     [0, 1, 5, 0]])  # 3 clusters + noise
    mapping = noise_mapping(conf, "many-to-one")
    main_sc, excl = scores(remap(conf, mapping, 2)), noise_excluded(conf, mapping)
    assert mapping.tolist() == [0, 0, 1, -1]
    assert main_sc["pixel_acc"] == pytest.approx(12 / 15) and excl["pixel_acc"] == pytest.approx(12 / 13)
    # class 0: tp 7, true 9, predicted 8; class 1: tp 5, true 6, predicted 5
    assert main_sc["per_class_iou"] == pytest.approx([7 / 10, 5 / 6])


class _MeanColour:
    """A stand-in backbone whose CLS is the crop's mean colour (so segment embeddings are known)."""

    spec = SimpleNamespace(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), patch_size=4, embed_dim=3)

    def __call__(self, x, layer, facets):
        assert layer == -1 and facets == ("cls",) and x.shape[1:] == (3, 224, 224)
        return {"cls": x.mean(dim=(2, 3))}


_COLOURS = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220]], dtype=np.uint8)


def _planted_ctx(tmp_path, n=6, noise_patches=False, save=None):
    """Class 0 fills the left half, classes 1 and 2 the right quarters (order varies); images 32×32, 8×8 patches of
    4 px. With `noise_patches` a 2×2-patch square inside class 0 has keys of its own: a 4-patch segment = noise."""
    rng = np.random.default_rng(0)
    keys, labels, images = [], [], []
    for i in range(n):
        g = np.zeros((8, 8), dtype=int)
        top, bottom = (1, 2) if rng.random() < 0.5 else (2, 1)
        g[:4, 4:], g[4:, 4:] = top, bottom
        key_class = g.copy()
        if noise_patches:
            key_class[:2, :2] = 3
        keys.append(_simplex_keys(key_class, 4, seed=i))
        labels.append(np.kron(g, np.ones((4, 4), dtype=np.int64)))
        images.append(np.kron(_COLOURS[g], np.ones((4, 4, 1), dtype=np.uint8)))
    fs = FeatureSet({"keys": store(tmp_path / "keys", keys)}, store(tmp_path / "labels", labels, np.uint8),
                    keys={})
    return Context(eval_set=PlantedDataset("abc", images=images), train_set=None, features=lambda ds, facets: fs,
                   seeds=[0, 1], transform=Transform("square", 32, 4), save_masks=save, _backbone=_MeanColour())


def test_protocol_recovers_planted_segments_exactly(tmp_path):
    res = get_protocol("datus").run(_planted_ctx(tmp_path))
    info = res.info
    assert info["k"] == 3 and info["matching"] == "hungarian-pixels"
    assert info["valid_segments"] == info["segments"] == 18 and info["noise_pixel_fraction"] == 0
    assert info["segment_embeddings"]["cache"] == "computed" and info["segment_embeddings"]["crops"] == 18
    for s in res.per_seed:
        assert s["miou"] == 1.0 and s["pixel_acc"] == 1.0 and s["mf1"] == 1.0
        assert s["noise_excluded"]["miou"] == 1.0


def test_protocol_counts_noise_pixels_wrong_and_saves_masks(tmp_path):
    # the planted simplex keys encode segments in the sign of raw K Kᵀ (the paper's rule); class 0 fills half of each
    # image, so centring the keys would move that half's keys towards zero and blur the planted noise square
    res = get_protocol("datus", key_centering="none").run(
        _planted_ctx(tmp_path, noise_patches=True, save=tmp_path / "masks"))
    info = res.info
    assert info["noise_segments"] == 6 and info["valid_segments"] == 18
    # per image 4 noise patches of 16 px out of 1024 px, all inside class 0 (512 px)
    assert info["noise_pixel_fraction"] == pytest.approx(64 / 1024)
    for s in res.per_seed:
        assert s["pixel_acc"] == pytest.approx(1 - 64 / 1024)
        assert s["per_class_iou"] == pytest.approx([448 / 512, 1.0, 1.0])
        assert s["noise_excluded"]["pixel_acc"] == 1.0 and s["noise_excluded"]["miou"] == 1.0
    saved = np.asarray(Image.open(tmp_path / "masks" / "img0.png"))
    assert saved.shape == (32, 32) and (saved[:8, :8] == 255).all()  # noise = ignore index
    assert set(np.unique(saved[8:])) <= {0, 1, 2} and len(list((tmp_path / "masks").iterdir())) == 6



def test_protocol_returns_per_image_stats_that_reproduce_each_seed(tmp_path):
    res = get_protocol("datus", key_centering="none").run(_planted_ctx(tmp_path, noise_patches=True))
    stats = res.image_stats
    assert stats.shape == (2, 6, 3, 3)  # seeds, images, classes, [tp, fp, fn]
    for j, s in enumerate(res.per_seed):
        sc = scores_from_stats(stats[j].sum(0))
        assert sc["miou"] == pytest.approx(s["miou"]) and sc["pixel_acc"] == pytest.approx(s["pixel_acc"])


def _keyed_labels(path, fs, ds, transform):
    """The planted labels again, under a cache key naming the dataset (so the CRF finds the images)."""
    labels = [np.asarray(fs.labels.labels(i)) for i in range(len(ds))]
    key = {"dataset": ds.id, "split": ds.split, "content_sha256": ds.content_sha256(),
           "transform": transform.to_dict()}
    w = RowWriter(path, key, [a.shape for a in labels], 1, np.uint8, False)
    for i, a in enumerate(labels):
        w.write(i, a.reshape(-1, 1))
    return w.commit({})


def test_protocol_with_crf_refines_the_pseudo_masks(tmp_path):
    pytest.importorskip("pydensecrf.densecrf")
    ctx = _planted_ctx(tmp_path, noise_patches=True, save=tmp_path / "masks")
    fs = ctx.features(None, ())
    keyed = FeatureSet({"keys": fs["keys"]}, _keyed_labels(tmp_path / "keyed", fs, ctx.eval_set, ctx.transform),
                       keys={})
    ctx.features = lambda ds, facets: keyed
    res = get_protocol("datus", key_centering="none", crf=True).run(ctx)
    assert res.info["crf"]["images_refined"] == 12  # 6 images × 2 seeds
    assert res.image_stats.shape == (2, 6, 3, 3)
    # the noise square lies inside one flat colour region of class 0: the CRF gives its pixels to class 0
    assert res.info["noise_pixel_fraction"] < 64 / 1024
    for j, s in enumerate(res.per_seed):
        assert s["pixel_acc"] > 1 - 64 / 1024
        assert scores_from_stats(res.image_stats[j].sum(0))["miou"] == pytest.approx(s["miou"])
    assert len(list((tmp_path / "masks").glob("*.png"))) == 6

def test_protocol_errors_name_the_fix(tmp_path):
    ctx = _planted_ctx(tmp_path / "a")
    with pytest.raises(ProtocolError, match="only 18 valid segments"):
        get_protocol("datus", k=20).run(ctx)
    with pytest.raises(ProtocolError, match="key_centering"):
        get_protocol("datus", key_centering="global").run(ctx)
    fs = ctx.features(None, ())
    shifted = FeatureSet({"keys": store(tmp_path / "shifted",
                                        [np.asarray(fs["keys"].image(i), np.float32) + 5 for i in range(6)])},
                         fs.labels, keys={})
    ctx.features = lambda ds, facets: shifted
    with pytest.raises(ProtocolError, match="key_centering=image-mean"):
        get_protocol("datus", key_centering="none").run(ctx)  # the paper's setting (preset `datus`)
    assert get_protocol("datus").run(ctx).per_seed[0]["miou"] == 1.0  # our default centres the keys


def _cli(tmp_path, data, *extra):
    return main(["run", "--backbone", "random_vits16", "--dataset", "synthetic", "--data-root", str(data),
                 "--size", "64", "--protocol", "datus", "--param", "datus.k=4", "--seeds", "2",
                 "--results-dir", str(tmp_path), *extra])


def test_cli_writes_record_masks_reuses_embeddings_and_is_deterministic(small_synthetic, tmp_path):
    assert _cli(tmp_path / "a", small_synthetic, "--save-masks", str(tmp_path / "masks")) == 0
    assert _cli(tmp_path / "b", small_synthetic) == 0
    (_, a), = iter_records(tmp_path / "a")
    (_, b), = iter_records(tmp_path / "b")
    assert a.protocol["name"] == "datus" and a.info["k"] == 4
    assert b.info["segment_embeddings"]["cache"] == "hit"  # the segment crops' CLS are cached with the features
    assert a.per_seed == b.per_seed
    assert all("noise_excluded" in s for s in a.per_seed)
    pngs = sorted((tmp_path / "masks" / "datus").glob("*.png"))
    assert [p.stem for p in pngs] == [f"syn_test_{i:05d}" for i in range(8)]


@pytest.mark.slow
def test_real_backbone_on_suim_sample_all_three(shared, tmp_path):
    # 8 images of 16×16 DINOv2 tokens = 2048 tokens: K=500 overclusters or Leopart's 200 CBFE / 149 foreground
    # clusters would leave a handful of tokens per cluster, so K is scaled down to keep ~20+ tokens per cluster.
    # DINOv2's keys share one dominant component (every K Kᵀ entry is positive): DatUS² works thanks to the default
    # key centering.
    masks = tmp_path / "masks"
    args = ["run", "--backbone", str(shared / "models" / "dinov2-small-imgfocus"), "--dataset", "suim",
            "--data-root", str(shared / "data" / "suim_sample"), "--results-dir", str(tmp_path / "res"),
            "--protocol", "overcluster,leopart-cd,datus", "--param", "overcluster.k=100",
            "--param", "leopart-cd.cbfe_k=50", "--param", "leopart-cd.k=20", "--save-masks", str(masks)]
    assert main(args) == 0
    recs = {r.protocol["name"]: r for _, r in iter_records(tmp_path / "res")}
    assert set(recs) == {"overcluster", "leopart-cd", "datus"}
    assert all(r.dataset["n_images"] == 8 for r in recs.values())
    for name in ("leopart-cd", "datus"):
        assert len(list((masks / name).glob("*.png"))) == 8
    # real features: overclustering with K = 100 beats chance by far
    assert recs["overcluster"].metrics["pixel_acc"]["mean"] > 0.6
    assert recs["datus"].info["valid_segments"] >= 8
