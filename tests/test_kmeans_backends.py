"""The torch k-means (for GPUs without faiss-gpu) against brute force and faiss; backend resolution and its record."""
from __future__ import annotations

import itertools

import faiss
import numpy as np
import pytest
import torch

from ssl_segbench.cluster import assign, kmeans, kmeans_backend, nearest, torch_kmeans


def _mixture(seed: int, k: int = 6, n_per: int = 300, dim: int = 8, spread: float = 0.15, unit: bool = False):
    """Points around k well separated centres (optionally on the unit sphere), with their true cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 2.0
    if unit:
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = np.repeat(np.arange(k), n_per)
    x = centres[truth] + spread * rng.normal(size=(len(truth), dim)) / np.sqrt(dim)
    if unit:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), truth, centres.astype(np.float32)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labelings are the same partition (equal up to renaming the clusters)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_nearest_matches_brute_force_distances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 7)).astype(np.float32)
    c = rng.normal(size=(9, 7)).astype(np.float32)
    d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    lab, obj = nearest(torch.from_numpy(x), torch.from_numpy(c), spherical=False, chunk=37)  # chunks that do not
    np.testing.assert_array_equal(lab.numpy(), d2.argmin(1))                                # divide the rows
    assert obj == pytest.approx(float(d2.min(1).sum()), rel=1e-5)
    ip = x @ c.T
    lab, obj = nearest(torch.from_numpy(x), torch.from_numpy(c), spherical=True)
    np.testing.assert_array_equal(lab.numpy(), ip.argmax(1))
    assert obj == pytest.approx(float(ip.max(1).sum()), rel=1e-5)
    np.testing.assert_array_equal(assign(x, c, False), d2.argmin(1))


def test_nearest_of_no_rows_is_no_labels():
    """An image without foreground tokens (leopart-cd assigns each image's foreground alone): no labels, objective 0,
    and the image's map keeps its background label; the rows of other calls are labelled as before."""
    c = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
    for spherical in (False, True):
        lab, obj = nearest(torch.zeros(0, 7), torch.from_numpy(c), spherical)
        assert lab.dtype == torch.int64 and lab.shape == (0,) and obj == 0.0
    m, fg = np.full((2, 3), 4), np.zeros((2, 3), dtype=bool)
    m[fg] = assign(np.zeros((0, 7), dtype=np.float32), c, False)
    np.testing.assert_array_equal(m, np.full((2, 3), 4))
    np.testing.assert_array_equal(assign(c[[2, 0]] + 0.01, c, False), [2, 0])


@pytest.mark.parametrize("spherical", [False, True])
def test_torch_kmeans_finds_planted_clusters_as_faiss_does(spherical):
    """Three clusters and 20 restarts (a random start hits all three with probability 2/9, so the best restart finds
    them): both backends return the planted partition, the torch centres are its cluster means."""
    x, truth, centres = _mixture(1, k=3, unit=spherical)
    for seed in (0, 3):
        ct = torch_kmeans(x, 3, seed, niter=30, nredo=20, spherical=spherical, max_points_per_centroid=None)
        cf = kmeans(x, 3, seed, niter=30, nredo=20, spherical=spherical, max_points_per_centroid=None)
        lt, lf = assign(x, ct, spherical), assign(x, cf, spherical)
        assert _same_partition(lt, truth)
        assert _same_partition(lf, truth)
        # each fitted centre is the mean of its true cluster (renormalised when spherical)
        for j in range(3):
            mean = x[lt == j].mean(0)
            if spherical:
                mean /= np.linalg.norm(mean)
                assert np.linalg.norm(ct[j]) == pytest.approx(1.0, abs=1e-5)
            np.testing.assert_allclose(ct[j], mean, atol=1e-5)


def test_torch_kmeans_restarts_keep_the_best_objective():
    """On data with many local optima, more restarts never give a worse objective, and the best of 8 restarts is
    within 2% of the optimum that an exhaustive set of initialisations over a small sample finds."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(240, 2)).astype(np.float32)

    def objective(c):
        return float(((x[:, None] - c[None]) ** 2).sum(-1).min(1).sum())

    one = objective(torch_kmeans(x, 4, 0, niter=40, nredo=1, spherical=False, max_points_per_centroid=None))
    eight = objective(torch_kmeans(x, 4, 0, niter=40, nredo=8, spherical=False, max_points_per_centroid=None))
    assert eight <= one + 1e-6
    best = np.inf
    xt = torch.from_numpy(x)
    from ssl_segbench.cluster import update_centroids
    for init in itertools.combinations(range(0, 240, 20), 4):  # 495 initialisations, Lloyd to convergence
        c = xt[list(init)].clone()
        for _ in range(40):
            c = update_centroids(xt, nearest(xt, c, False)[0], 4, False)
        best = min(best, objective(c.numpy()))
    assert eight <= best * 1.02


def test_torch_kmeans_is_deterministic_and_the_seed_matters():
    x, _, _ = _mixture(2, k=10, spread=1.5)
    a = torch_kmeans(x, 10, 7, niter=10, nredo=1, spherical=False, max_points_per_centroid=None)
    b = torch_kmeans(x, 10, 7, niter=10, nredo=1, spherical=False, max_points_per_centroid=None)
    c = torch_kmeans(x, 10, 8, niter=10, nredo=1, spherical=False, max_points_per_centroid=None)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_empty_clusters_split_the_largest_instead_of_going_nan():
    """Three distinct points, each repeated, and k=5: duplicate initial centres leave clusters empty; each empty one
    takes over half of the largest (faiss's rule), so every centre stays finite and sits on a data point (a centre
    left empty would be the zero vector or NaN, far from all of them), and every point ends at distance 0."""
    base = np.array([[5.0, 5.0], [15.0, 5.0], [5.0, 15.0]], dtype=np.float32)
    x = np.repeat(base, [50, 30, 20], axis=0)
    for seed in range(3):
        c = torch_kmeans(x, 5, seed, niter=20, nredo=1, spherical=False, max_points_per_centroid=None)
        assert np.isfinite(c).all()
        assert np.linalg.norm(c[:, None] - base[None], axis=-1).min(1).max() < 0.1
        assert ((x[:, None] - c[None]) ** 2).sum(-1).min(1).max() < 1e-3


def test_max_points_per_centroid_subsamples_the_fit():
    """1000 points at A, 10 at B, k=2. Uncapped, one centre lands on B. Capped at one point per centroid, the fit sees
    2 points drawn uniformly, almost surely both at A: no centre anywhere near B."""
    a, b = np.zeros(3, np.float32), np.full(3, 5.0, np.float32)
    x = np.concatenate([np.tile(a, (1000, 1)), np.tile(b, (10, 1))])
    for seed in range(5):
        full = torch_kmeans(x, 2, seed, niter=10, nredo=3, spherical=False, max_points_per_centroid=None)
        capped = torch_kmeans(x, 2, seed, niter=10, nredo=3, spherical=False, max_points_per_centroid=1)
        assert np.linalg.norm(full - b, axis=1).min() < 1e-4
        assert np.linalg.norm(capped - b, axis=1).min() > 4.0


def test_backend_resolution(monkeypatch):
    assert kmeans_backend("auto", "cpu") == "faiss"
    assert kmeans_backend("torch", "cpu") == "torch"
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert kmeans_backend("auto", "cuda") == "torch"
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    assert kmeans_backend("auto", "cuda:0") == "faiss"
    assert kmeans_backend("faiss", "cuda") == "faiss"


def test_the_backend_is_a_parameter_of_the_record(small_synthetic, tmp_path):
    """'auto' is resolved before the record's identity is formed: a CPU run records faiss; asking for torch gives
    another column (other centroids for one seed), labelled as such."""
    from ssl_segbench.cli import main
    from ssl_segbench.records import iter_records

    res = tmp_path / "res"
    for extra in ([], ["--param", "kmeans.kmeans_backend=torch"]):
        assert main(["run", "--backbone", "pixels", "--dataset", "synthetic", "--data-root", str(small_synthetic),
                     "--size", "64", "--protocol", "kmeans", "--seeds", "1", "--results-dir", str(res), *extra]) == 0
    records = sorted((r for _, r in iter_records(res)), key=lambda r: r.protocol["params"]["kmeans_backend"])
    assert [r.protocol["params"]["kmeans_backend"] for r in records] == ["faiss", "torch"]
    assert records[0].setting.column.id != records[1].setting.column.id
    assert "torch k-means" in records[1].setting.column.label and "k-means" not in records[0].setting.column.label
