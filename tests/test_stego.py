"""`stego` (PROTOCOLS.md §11): the correlation loss against a brute-force loop (values and gradients), the kNN table
against a brute-force cosine search, the five-crop geometry against hand-built boxes, a planted dataset where STEGO's
head finds the classes k-means on raw tokens misses, determinism, the final-step rule (the trained head never depends
on the evaluation labels) and CLI refusals."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_segbench.cluster import kmeans
from ssl_segbench.metrics import match, remap, scores
from ssl_segbench.protocols import stego
from ssl_segbench.setting import Setting
from ssl_segbench.transforms import five_crop_boxes


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the loss is many small ops, which extra threads on a shared machine only slow down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _bilinear(t: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """(C, h, w) map at normalised (x, y) in [−1, 1], align_corners=True, by hand."""
    h, w = t.shape[1:]
    px, py = (x + 1) / 2 * (w - 1), (y + 1) / 2 * (h - 1)
    x0, y0 = min(int(math.floor(px)), w - 1), min(int(math.floor(py)), h - 1)
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    ax, ay = px - x0, py - y0
    return ((1 - ax) * (1 - ay) * t[:, y0, x0] + ax * (1 - ay) * t[:, y0, x1] + (1 - ax) * ay * t[:, y1, x0]
            + ax * ay * t[:, y1, x1])


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.norm() * b.norm())


def _brute_pair(f1, f2, c1, c2, pts1, pts2, shift, pointwise):
    """Mean over images and point pairs of −clamp(C, 0)·(F − shift), every value computed one point pair at a time."""
    n, m = len(pts1[0]), len(pts2[0])
    fd = [[[float(_cos(_bilinear(f1[b], *pts1[b][i]), _bilinear(f2[b], *pts2[b][j]))) for j in range(m)]
           for i in range(n)] for b in range(len(f1))]
    if pointwise:
        level = sum(v for img in fd for row in img for v in row) / (len(fd) * n * m)
        centred = [[[v - sum(row) / m for v in row] for row in img] for img in fd]
        mean_c = sum(v for img in centred for row in img for v in row) / (len(fd) * n * m)
        fd = [[[v - mean_c + level for v in row] for row in img] for img in centred]
    total = 0
    for b in range(len(f1)):
        for i in range(n):
            for j in range(m):
                cd = _cos(_bilinear(c1[b], *pts1[b][i]), _bilinear(c2[b], *pts2[b][j]))
                total = total - torch.clamp(cd, min=0) * (fd[b][i][j] - shift)
    return total / (len(f1) * n * m)


@pytest.mark.parametrize("pointwise", [True, False])
def test_loss_matches_brute_force_values_and_gradients(pointwise):
    g = torch.Generator().manual_seed(0)
    b, s = 3, 3
    feats, feats_pos = torch.randn(b, 6, 4, 5, generator=g), torch.randn(b, 6, 4, 5, generator=g)
    code0, pos0 = torch.randn(b, 4, 4, 5, generator=g), torch.randn(b, 4, 4, 5, generator=g)
    coords1 = torch.rand(b, s, s, 2, generator=g) * 2 - 1
    coords2 = torch.rand(b, s, s, 2, generator=g) * 2 - 1
    perms = [torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])]
    p = stego.StegoParams(pos_intra_weight=0.7, pos_intra_shift=0.1, pos_inter_weight=0.3, pos_inter_shift=-0.05,
                          neg_inter_weight=0.5, neg_inter_shift=0.2, pointwise=pointwise)

    code, pos = code0.clone().requires_grad_(), pos0.clone().requires_grad_()
    ours = stego.stego_loss(feats, code, feats_pos, pos, coords1, coords2, perms, p)
    ours.backward()

    pts1 = [[tuple(float(v) for v in coords1[k].reshape(-1, 2)[i]) for i in range(s * s)] for k in range(b)]
    pts2 = [[tuple(float(v) for v in coords2[k].reshape(-1, 2)[i]) for i in range(s * s)] for k in range(b)]
    code_b, pos_b = code0.clone().requires_grad_(), pos0.clone().requires_grad_()
    ref = p.pos_intra_weight * _brute_pair(feats, feats, code_b, code_b, pts1, pts1, p.pos_intra_shift, pointwise)
    ref = ref + p.pos_inter_weight * _brute_pair(feats, feats_pos, code_b, pos_b, pts1, pts2, p.pos_inter_shift,
                                                 pointwise)
    negs = [_brute_pair(feats, feats[q], code_b, code_b[q], pts1, pts2, p.neg_inter_shift, pointwise) for q in perms]
    ref = ref + p.neg_inter_weight * sum(negs) / len(negs)
    ref.backward()
    assert abs(ours.item() - ref.item()) < 1e-5, (ours.item(), ref.item())
    assert torch.allclose(code.grad, code_b.grad, atol=1e-6)
    assert torch.allclose(pos.grad, pos_b.grad, atol=1e-6)
    assert float(code.grad.abs().sum()) > 0 and float(pos.grad.abs().sum()) > 0


def test_derangement_has_no_fixed_points_and_is_a_permutation():
    g = torch.Generator().manual_seed(1)
    for n in (2, 3, 7, 16):
        for _ in range(20):
            perm = stego.derangement(n, g)
            assert sorted(perm.tolist()) == list(range(n))
            assert not bool((perm == torch.arange(n)).any())


def test_knn_table_matches_brute_force_cosine_search():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(23, 5)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    table = stego.knn_table(x, 6)
    for i in range(len(x)):
        others = sorted((j for j in range(len(x)) if j != i), key=lambda j: (-float(x[i] @ x[j]), j))
        assert table[i].tolist() == others[:6]


def test_spatial_means_are_normalised_means():
    class Store:
        data = np.zeros((0, 3))

        def __len__(self):
            return 2

        def image(self, i):
            return np.arange(12, dtype=np.float32).reshape(2, 2, 3) * (i + 1)

    means = stego.spatial_means(Store())
    expected = np.array([4.5, 5.5, 6.5]) / np.linalg.norm([4.5, 5.5, 6.5])
    assert np.allclose(means[0], expected) and np.allclose(means[1], expected)


def test_five_crop_boxes_by_hand():
    # 10 × 7 at 0.5: crops 5 wide, 3 high; the centre's offsets (2.5, 2) round half to even as torchvision's
    assert five_crop_boxes(10, 7, 0.5) == [(0, 0, 5, 3), (5, 0, 10, 3), (0, 4, 5, 7), (5, 4, 10, 7), (2, 2, 7, 5)]
    assert five_crop_boxes(8, 8, 0.5) == [(0, 0, 4, 4), (4, 0, 8, 4), (0, 4, 4, 8), (4, 4, 8, 8), (2, 2, 6, 6)]


# ---------------------------------------------------------------- planted data


class _Store:
    """Token store over an (N, h, w, D) array (and, for training, labels)."""

    def __init__(self, x, y):
        self.x, self.y, self.data = x, y, x.reshape(-1, x.shape[-1])

    def __len__(self):
        return len(self.x)

    def image(self, i):
        return self.x[i]

    def labels(self, i):
        return self.y[i]


def _planted(seed, n=48, g=6, k=3, d=32):
    """Each image: two class regions; a token = 2·class direction + 4·the image's style direction (one of k) + noise.
    The style dominates, so spherical k-means with K = k clusters by style; within an image only the class varies."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(np.random.default_rng(99).normal(size=(d, d)))[0]
    y = np.zeros((n, g, g), np.int64)
    x = np.zeros((n, g, g, d), np.float32)
    for i in range(n):
        c1, c2 = rng.choice(k, 2, replace=False)
        cut = rng.integers(1, g)
        y[i, :, :cut], y[i, :, cut:] = c1, c2
        x[i] = 2 * basis[y[i]] + 4 * basis[k + rng.integers(k)] + 0.1 * rng.normal(size=(g, g, d))
    return _Store(x, y)


def _miou(pred, y, k):
    conf = np.zeros((k, k))
    np.add.at(conf, (y.ravel(), pred.ravel()), 1)
    return scores(remap(conf, match(conf, "hungarian-pixels"), k))["miou"]


def test_planted_classes_stego_beats_kmeans_on_raw_tokens():
    train, test, k = _planted(0), _planted(1), 3
    unit = train.data / np.linalg.norm(train.data, axis=1, keepdims=True)
    c = kmeans(unit, k, 0, 50, 3, True, None, "torch", "cpu")
    xs = test.data / np.linalg.norm(test.data, axis=1, keepdims=True)
    km = _miou((xs @ c.T).argmax(1).reshape(test.y.shape), test.y, k)
    # shifts at the planted features' mean cosine levels (intra/kNN pairs 0.92, random pairs 0.47), as STEGO's
    # shifts are tuned per dataset; 32-dim features: no channel dropout (it would drop a tenth of the signal)
    p = stego.StegoParams(feature_samples=6, steps=300, batch_size=8, knn_top=10, num_neighbors=3, lr=5e-3,
                          dropout=0.0, drop_loss_features=False, pos_intra_shift=0.92, pos_inter_shift=0.92,
                          neg_inter_shift=0.47)
    m, step = stego.fit(train, train, stego.knn_table(stego.spatial_means(train), p.knn_top), k, 255, p, 0, "cpu",
                        lambda n=1: None)
    assert step == p.steps
    code = m.code(torch.from_numpy(test.x), flip_average=False)
    ours = _miou(stego.cluster_scores(code, m.centroids).argmax(1).numpy(), test.y, k)
    assert km < 0.3, km  # k-means finds the styles
    assert ours > km + 0.15, (ours, km)


def test_fit_is_deterministic_for_a_seed():
    train, k = _planted(0, n=16), 3
    p = stego.StegoParams(feature_samples=3, steps=5, batch_size=4, knn_top=5, num_neighbors=2)
    nns = stego.knn_table(stego.spatial_means(train), p.knn_top)
    runs = [stego.fit(train, train, nns, k, 255, p, seed, "cpu", lambda n=1: None)[0] for seed in (4, 4, 5)]
    a, b, c = (r.head.state_dict() for r in runs)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)
    assert torch.equal(runs[0].centroids, runs[1].centroids) and torch.equal(runs[0].linear.weight,
                                                                           runs[1].linear.weight)


# ---------------------------------------------------------------- through the runner


def _scrambled_copy(src: Path, dst: Path) -> Path:
    """The dataset with its test masks rotated among the test images (same images, wrong labels)."""
    shutil.copytree(src, dst)
    masks = sorted((dst / "TEST" / "masks").iterdir())
    data = [m.read_bytes() for m in masks]
    for m, d in zip(masks, data[1:] + data[:1]):
        m.write_bytes(d)
    return dst


_TINY = {"size": 64, "train_res": 32, "steps": 6, "knn_top": 5, "num_neighbors": 2, "feature_samples": 3,
         "batch_size": 4, "neg_samples": 2}


def _heads(monkeypatch, tmp_path, data, **params):
    from ssl_segbench.api import evaluate

    fitted = []
    real = stego.fit

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        fitted.append(out)
        return out

    monkeypatch.setattr(stego, "fit", recording)
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    res = evaluate("pixels", "synthetic", data, protocols=("stego",), params={"stego": {**_TINY, **params}},
                   seeds=[0], write_records=False, device="cpu")
    return fitted, res


def _same_head(a, b) -> bool:
    sa, sb = a.head.state_dict(), b.head.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa) and torch.equal(a.centroids, b.centroids)


def test_cached_training_views_are_the_five_crops_resized_nearest(monkeypatch, tmp_path, small_synthetic):
    """The cached labels of the training views (cut by the same code as their images) equal each hand-cut corner
    and centre crop of the mask, shorter side → train_res by nearest neighbour, centre-cropped."""
    from PIL import Image

    from ssl_segbench.cache import ArrayStore
    from ssl_segbench.data import get_dataset

    _heads(monkeypatch, tmp_path, small_synthetic)
    (labels,) = [ArrayStore(m.parent) for m in (tmp_path / "cache" / "stego").rglob("meta.json")
                 if json.loads(m.read_text())["key"]["facet"] == "labels"]
    ds = get_dataset("synthetic", small_synthetic, "train")
    res = _TINY["train_res"]
    assert len(labels) == 5 * len(ds)
    for i in (0, 5):
        mask = ds.load_mask(i)
        h, w = mask.shape
        ch, cw = h // 2, w // 2
        corners = [(0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch), (round((w - cw) / 2), round((h - ch) / 2))]
        for v, (x, y) in enumerate(corners):
            crop = Image.fromarray(mask[y: y + ch, x: x + cw].astype(np.int32))
            scale = res / min(cw, ch)
            rw, rh = max(res, round(cw * scale)), max(res, round(ch * scale))
            big = np.asarray(crop.resize((rw, rh), Image.NEAREST))
            left, top = (rw - res) // 2, (rh - res) // 2
            assert np.array_equal(labels.labels(5 * i + v), big[top: top + res, left: left + res]), (i, v)


def test_final_step_rule_head_ignores_evaluation_labels(monkeypatch, tmp_path, small_synthetic):
    scrambled = _scrambled_copy(small_synthetic, tmp_path / "scrambled")
    final_a, res_a = _heads(monkeypatch, tmp_path / "a", small_synthetic)
    final_b, res_b = _heads(monkeypatch, tmp_path / "b", scrambled)
    assert _same_head(final_a[0][0], final_b[0][0]) and final_a[0][1] == final_b[0][1] == _TINY["steps"]
    assert torch.equal(final_a[0][0].linear.weight, final_b[0][0].linear.weight)  # the linear probe: train labels
    # the scores do read the evaluation labels: scrambling them changes the number, not the head
    assert res_a["stego"].miou != res_b["stego"].miou
    # the reference's selection reads them: with it the selected state follows the evaluation labels
    best_a, res_c = _heads(monkeypatch, tmp_path / "c", small_synthetic, selection="best-val", val_every=1)
    best_b, _ = _heads(monkeypatch, tmp_path / "d", scrambled, selection="best-val", val_every=1)
    assert best_a[0][1] != best_b[0][1] or not _same_head(best_a[0][0], best_b[0][0])
    # ... and is its own column, whose header says so
    final, best = (Setting.of_record(r["stego"].record).column for r in (res_a, res_c))
    assert final != best and "best-of-validation" in str(best) and "best-of-validation" not in str(final)


def _cli(tmp_path, *args):
    env = {**os.environ, "SSL_SEGBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ssl_segbench", *args], env=env, capture_output=True, text=True,
                          cwd=tmp_path)
    return proc.returncode, " ".join(proc.stderr.split())


def _run(tmp_path, data, *params):
    tiny = [a for key, v in _TINY.items() for a in ("--param", f"stego.{key}={v}")]
    return ["run", "--backbone", "pixels", "--dataset", "synthetic", "--data-root", str(data), "--protocol", "stego",
            "--seeds", "2", "--results-dir", str(tmp_path / "res"), *tiny,
            *(a for q in params for a in ("--param", q))]


def test_cli_record_is_deterministic_and_says_what_it_did(tmp_path, small_synthetic):
    records = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        rc, err = _cli(tmp_path / name, *_run(tmp_path / name, small_synthetic))
        assert rc == 0, err
        (path,) = (tmp_path / name / "res").rglob("*.json")
        records.append(json.loads(path.read_text()))
    a, b = records
    assert a["per_seed"] == b["per_seed"] and a["metrics"] == b["metrics"]
    seed0 = a["per_seed"][0]
    assert seed0["miou"] == seed0["cluster_miou"] and seed0["selected_step"] == _TINY["steps"]
    assert a["per_seed"][0]["miou"] != a["per_seed"][1]["miou"] or a["per_seed"][0]["linear_miou"] != \
        a["per_seed"][1]["linear_miou"]
    assert a["info"]["train_split"] == "train" and a["info"]["train_views"] == 5 * 16
    assert a["info"]["eval_views"] == 2 * 8 and a["info"]["selection"] == "final"
    kinds = {p["kind"] for p in a["provenance"]["passes"]}
    assert {"stego training views", "stego evaluation views"} <= kinds


@pytest.mark.parametrize("param, expected", [
    ("stego.batch_size=1", "batch_size must be >= 2"),
    ("stego.knn_top=80", "knn_top=80 neighbours, but the training set has 80 views"),
    ("stego.train_res=40", "train_res=40 is not a multiple of the backbone's patch size 16: set --param "
                           "stego.train_res=32 or 48"),
    ("stego.size=72", "size=72 is not a multiple of the backbone's patch size 16: set --param stego.size=64 or 80"),
    ("stego.resize=square", "resize must be 'shorter'"),
    ("stego.selection=best", "selection must be one of"),
    ("stego.num_neighbors=9", "num_neighbors (9) must be <= knn_top (5)"),
    ("stego.crop_ratio=1.5", "crop_ratio must be in"),
])
def test_cli_refuses_bad_params_writing_nothing(tmp_path, small_synthetic, param, expected):
    rc, err = _cli(tmp_path, *_run(tmp_path, small_synthetic, param))
    assert rc == 2 and "Traceback" not in err and expected in err, err
    assert not (tmp_path / "res").exists() or not list((tmp_path / "res").rglob("*.json"))
    cache = tmp_path / "cache"
    assert not [q for q in cache.rglob("meta.json") if "stego" in q.parts or "features" in q.parts]
    assert not list(cache.rglob("*.partial"))


def test_crf_and_linear_headline_through_the_shared_paths(monkeypatch, tmp_path, small_synthetic):
    """`--crf` refines both probes of every image through the shared CRF path and the record says so; `probe=linear`
    makes the linear probe (identity mapping, no cluster_to_class) the headline of the same trained head."""
    fitted, plain = _heads(monkeypatch, tmp_path / "plain", small_synthetic)
    from ssl_segbench.api import evaluate

    crf = evaluate("pixels", "synthetic", small_synthetic, protocols=("stego",), params={"stego": _TINY}, seeds=[0],
                   write_records=False, device="cpu", crf=True)["stego"].record
    assert crf.info["crf"]["images_refined"] == 2 * 8 and crf.info["crf"]["iterations"] == 10
    assert crf.per_seed[0]["cluster_miou"] != plain["stego"].record.per_seed[0]["cluster_miou"]
    _, lin = _heads(monkeypatch, tmp_path / "lin", small_synthetic, probe="linear")
    seed = lin["stego"].record.per_seed[0]
    assert seed["miou"] == seed["linear_miou"] == plain["stego"].record.per_seed[0]["linear_miou"]
    assert "cluster_to_class" not in seed
