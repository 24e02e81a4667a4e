"""The thread policy of faiss k-means (`cluster.faiss_fit_threads`): a small fit runs on one OpenMP thread, chosen from
the problem's size alone, and that changes no number (the same centroids bit for bit, the same records); faiss's
thread count is restored after every fit, also after a failed one; the seeds' one-thread fits run side by side
(`cluster.kmeans_seeds`) and give the same centroids as one after another."""
from __future__ import annotations

import json
import os
import threading

import faiss
import numpy as np
import pytest
import torch

from ssl_segbench import cluster
from ssl_segbench.cli import main
from ssl_segbench.cluster import ONE_THREAD_WORK, faiss_fit_threads, kmeans, kmeans_seeds
from ssl_segbench.records import iter_records


@pytest.fixture
def two_threads():
    """faiss set to 2 OpenMP threads (whatever this machine has) for the test, restored after it."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture
def fit_threads(monkeypatch):
    """The OpenMP thread count of each faiss k-means fit, read inside faiss's own train call."""
    seen = []
    train = faiss.Kmeans.train

    def spy(self, *args, **kwargs):
        seen.append(faiss.omp_get_max_threads())
        return train(self, *args, **kwargs)

    monkeypatch.setattr(faiss.Kmeans, "train", spy)
    return seen


def _blobs(n: int = 4000, d: int = 48, k: int = 8, seed: int = 0) -> np.ndarray:
    """Overlapping Gaussian clusters: restarts land in different optima and boundary points flip cluster when a
    distance changes in its last bits, so a thread-dependent sum would show in the centroids."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)).astype(np.float32)
    return (centres[rng.integers(0, k, n)] + 1.5 * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("spherical, max_points_per_centroid", [(True, None), (False, 256)])
def test_policy_gives_the_same_centroids_as_every_thread(spherical, max_points_per_centroid, two_threads,
                                                         fit_threads, monkeypatch):
    """The kmeans protocol's default (spherical, every point) and Leopart's (Euclidean, faiss's subsampling to 256
    points per centroid): the fit at 1 thread (the policy) and at 2 (the policy off) give the same bytes."""
    x = _blobs()
    if spherical:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert len(x) * x.shape[1] * 8 < ONE_THREAD_WORK  # a small problem: the policy applies

    def fit(seed):
        return kmeans(x, 8, seed, 20, 2, spherical, max_points_per_centroid)

    on = [fit(seed) for seed in (0, 1)]
    monkeypatch.setattr(cluster, "ONE_THREAD_WORK", 0)  # the policy off: faiss's own setting, 2 threads
    off = [fit(seed) for seed in (0, 1)]
    assert fit_threads == [1, 1, 2, 2]
    for a, b in zip(on, off):
        assert a.tobytes() == b.tobytes()
    assert on[0].tobytes() != on[1].tobytes()  # not a trivial problem: another seed finds other centroids


def _numbers(res) -> dict[str, str]:
    """record key → its numbers (metrics, per-seed values, confusion matrices, protocol info) as canonical JSON."""
    return {r.key: json.dumps({"metrics": r.metrics, "per_seed": r.per_seed, "info": r.info,
                               "confusions": r.to_json().get("confusions")}, sort_keys=True)
            for _, r in iter_records(res)}


def test_policy_changes_no_record(small_synthetic, tmp_path, two_threads, fit_threads, monkeypatch):
    """kmeans and overclustering through the CLI, with the policy (every fit on 1 thread) and without it (2 threads):
    the same record keys and the same numbers."""
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))

    def run(res):
        assert main(["run", "--backbone", "pixels", "--dataset", "synthetic", "--data-root", str(small_synthetic),
                     "--size", "64", "--protocol", "kmeans,overcluster", "--param", "overcluster.k=12", "--seeds", "2",
                     "--results-dir", str(tmp_path / res)]) == 0
        return _numbers(tmp_path / res)

    on = run("on")
    monkeypatch.setattr(cluster, "ONE_THREAD_WORK", 0)
    off = run("off")
    assert fit_threads == [1] * 4 + [2] * 4  # 2 protocols × 2 seeds, each way
    assert len(on) == 2 and on == off
    for numbers in on.values():  # seeds that disagree: the clustering is not trivial
        values = json.loads(numbers)["per_seed"]
        assert values[0]["miou"] != values[1]["miou"]


def test_thread_count_is_restored_after_a_fit_and_after_an_error(two_threads, fit_threads, monkeypatch):
    x = _blobs(n=500, d=8)
    kmeans(x, 4, 0, 5, 1, False, None)
    assert fit_threads == [1] and faiss.omp_get_max_threads() == 2

    def fail(self, *args, **kwargs):
        assert faiss.omp_get_max_threads() == 1
        raise RuntimeError("faiss failed")

    monkeypatch.setattr(faiss.Kmeans, "train", fail)
    with pytest.raises(RuntimeError, match="faiss failed"):
        kmeans(x, 4, 0, 5, 1, False, None)
    assert faiss.omp_get_max_threads() == 2


@pytest.mark.parametrize("faiss_threads, cores", [(1, 1), (2, 2), (3, 64)])
def test_policy_is_a_function_of_the_problem_only(faiss_threads, cores, fit_threads, monkeypatch):
    """The same thread choice under any faiss, torch and core count; the boundary at ONE_THREAD_WORK = 2**27
    multiply-adds per Lloyd iteration; a subsampled fit counts the points faiss keeps (k × max_points_per_centroid)."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    before = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(faiss_threads)
    torch.set_num_threads(faiss_threads)
    try:
        assert ONE_THREAD_WORK == 2 ** 27
        assert faiss_fit_threads(2048, 384, 8) == 1  # the case: 6.3 M
        assert faiss_fit_threads(2 ** 14, 64, 2 ** 7 - 1) == 1  # one cluster short of the boundary
        assert faiss_fit_threads(2 ** 14, 64, 2 ** 7) is None  # at it: faiss's own setting
        assert faiss_fit_threads(11_760, 384, 500) is None  # overclustering the synthetic set: 2.3 G
        rng = np.random.default_rng(0)
        big = rng.normal(size=(2 ** 14, 64)).astype(np.float32)
        kmeans(big, 2 ** 7, 0, 1, 1, False, None)  # every point: at the boundary
        kmeans(big, 2 ** 7, 0, 1, 1, False, 64)  # faiss keeps 128 × 64 points: a quarter of the work
        assert fit_threads == [faiss_threads, 1]
        assert faiss.omp_get_max_threads() == faiss_threads
    finally:
        faiss.omp_set_num_threads(before[0])
        torch.set_num_threads(before[1])


def test_seeds_fit_side_by_side_give_the_serial_centroids_in_seed_order(two_threads, monkeypatch):
    """Five seeds of a one-thread problem: fitted on two Python threads at once (two faiss fits in flight together),
    each seed's centroids are the bytes of its fit alone, returned in seed order; a problem above the threshold runs
    its seeds one after another on the calling thread."""
    x = _blobs()
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    seeds = [4, 0, 3, 1, 2]
    alone = [kmeans(x, 8, s, 20, 2, True, None) for s in seeds]
    threads, calls, lock, train = set(), [0], threading.Lock(), faiss.Kmeans.train
    both = threading.Barrier(2, timeout=30)  # the first two fits wait for each other: only fits in flight together pass

    def spy(self, *args, **kwargs):
        with lock:
            threads.add(threading.get_ident())
            calls[0] += 1
            first_two = calls[0] <= 2
        if first_two:
            both.wait()
        return train(self, *args, **kwargs)

    monkeypatch.setattr(faiss.Kmeans, "train", spy)
    done = []
    side_by_side = kmeans_seeds(x, 8, seeds, 20, 2, True, None, done=lambda: done.append(1))
    assert [c.tobytes() for c in side_by_side] == [c.tobytes() for c in alone]
    assert len({c.tobytes() for c in alone}) > 1  # the seeds disagree: order matters
    assert len(threads) == 2 and threading.get_ident() not in threads and len(done) == 5
    threads.clear()
    calls[0] = 2  # no more waiting
    monkeypatch.setattr(cluster, "ONE_THREAD_WORK", 0)  # every problem above the threshold: one after another
    assert [c.tobytes() for c in kmeans_seeds(x, 8, seeds, 20, 2, True, None)] == [c.tobytes() for c in alone]
    assert threads == {threading.get_ident()}
