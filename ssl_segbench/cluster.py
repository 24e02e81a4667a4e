"""Feature preprocessing, k-means (faiss, or torch on a GPU without faiss-gpu) and nearest-centroid scoring shared by
the clustering protocols."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .cache import ArrayStore
from .errors import SegbenchError
from .faiss_blas import faiss


def subsample_rows(x: np.ndarray, max_rows: int | None, rng: int | np.random.Generator = 0) -> np.ndarray:
    """`x` itself, or `max_rows` of its rows drawn uniformly without replacement and kept in order (a memory map is
    read in order): the one row subsampling. `rng` is a seed or a Generator, which then advances."""
    if max_rows is None or len(x) <= max_rows:
        return x
    return x[np.sort(np.random.default_rng(rng).choice(len(x), size=max_rows, replace=False))]


def sample_rows(store: ArrayStore, max_rows: int | None, seed: int) -> np.ndarray:
    """All rows of a token entry as float32, or `max_rows` of them (`subsample_rows`)."""
    return np.asarray(subsample_rows(store.data, max_rows, seed), dtype=np.float32)


@dataclass
class Preprocess:
    """Token preprocessing: optional standardisation (StandardScaler), optional PCA, optional L2 normalisation."""

    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    pca: faiss.PCAMatrix | None = None
    l2: bool = False

    @classmethod
    def fit(cls, x: np.ndarray, standardize: bool, pca_dim: int | None, l2: bool) -> "Preprocess":
        p = cls(l2=l2)
        if standardize:
            p.mean = x.mean(0)
            std = x.std(0)
            p.scale = np.where(std > 0, std, 1.0).astype(np.float32)
        if pca_dim:
            if pca_dim > x.shape[1]:
                raise SegbenchError(f"PCA to {pca_dim} dimensions from features of width {x.shape[1]}: set the "
                                    f"protocol's pca_dim to at most {x.shape[1]} (--param PROTOCOL.pca_dim=N)")
            y = p._standardize(x)
            p.pca = faiss.PCAMatrix(y.shape[1], pca_dim)
            p.pca.train(np.ascontiguousarray(y))
        return p

    def _standardize(self, x: np.ndarray) -> np.ndarray:
        return x if self.mean is None else (x - self.mean) / self.scale

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(n, D) → (n, D') float32."""
        y = np.ascontiguousarray(self._standardize(np.asarray(x, dtype=np.float32)), dtype=np.float32)
        if self.pca is not None:
            y = self.pca.apply(y)
        if self.l2:
            y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(y, dtype=np.float32)


KMEANS_BACKENDS = ("auto", "faiss", "torch")
_EPS = 1.0 / 1024  # relative perturbation when an empty cluster takes over half of another (faiss's value)
# Work of one Lloyd iteration (points × dimensions × clusters) below which a faiss fit runs on one OpenMP thread. Such
# an iteration takes at most about 15 ms on one core; split between threads, each of its few parallel steps ends in a
# barrier that, on a busy machine, waits a scheduler slice for a thread that is not running: K=8 on 2,048 tokens of 384
# dimensions took 16× longer per iteration with 2 threads than with 1 on a loaded 2-core machine. faiss's centroids
# are the same bytes for any thread count (tests/test_kmeans_threads.py), so the policy moves no number.
ONE_THREAD_WORK = 1 << 27


def faiss_fit_threads(n: int, d: int, k: int) -> int | None:
    """OpenMP threads for a faiss k-means fit of n points of d dimensions into k clusters, from the problem alone: 1
    below `ONE_THREAD_WORK`, else None (faiss's own setting: every core)."""
    return 1 if n * d * k < ONE_THREAD_WORK else None


@contextmanager
def faiss_threads(n: int | None):
    """faiss's OpenMP thread count (the calling thread's) set to `n` inside the block and restored after it, also after
    an exception; None leaves it as it is."""
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def kmeans_backend(requested: str, device: str) -> str:
    """The k-means implementation a run uses: 'auto' is faiss wherever faiss can run on `device` (always on the CPU;
    on a GPU only with a GPU build of faiss), else torch on `device`. The two give slightly different centroids for
    one seed, so the resolved name is a parameter of the record."""
    if requested != "auto":
        return requested
    if not device.startswith("cuda"):
        return "faiss"
    return "faiss" if faiss.get_num_gpus() > 0 else "torch"


def kmeans(x: np.ndarray, k: int, seed: int, niter: int, nredo: int, spherical: bool,
           max_points_per_centroid: int | None, backend: str = "faiss", device: str = "cpu") -> np.ndarray:
    """k-means centroids (k, D), the best of `nredo` restarts of `niter` Lloyd iterations. `max_points_per_centroid`
    caps the points used at k × that many, drawn uniformly; None fits on every given point (faiss's own default of
    256 silently subsamples; Leopart's preset keeps it). `backend` 'faiss' (on the GPU when faiss has one and
    `device` is CUDA), 'torch' (`torch_kmeans` on `device`) or 'auto' (`kmeans_backend`). A fit on the CPU runs on
    `faiss_fit_threads` OpenMP threads."""
    if len(x) < k:
        raise SegbenchError(f"k-means with k={k} needs at least {k} points, got {len(x)}: lower k")
    x = np.ascontiguousarray(x, dtype=np.float32)
    backend = kmeans_backend(backend, device)
    if backend == "torch":
        return torch_kmeans(x, k, seed, niter, nredo, spherical, max_points_per_centroid, device)
    if backend != "faiss":
        raise SegbenchError(f"kmeans_backend must be one of {KMEANS_BACKENDS}, got {backend!r}")
    # min_points_per_centroid only gates faiss's raw stderr line "WARNING clustering N points to K centroids: please
    # provide at least ..." (the centroids are the same); a fit on fewer than k points is refused above
    gpu = device.startswith("cuda") and faiss.get_num_gpus() > 0
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, seed=seed, spherical=spherical, verbose=False,
                      max_points_per_centroid=max_points_per_centroid or (len(x) // k + 1), min_points_per_centroid=1,
                      gpu=gpu)
    fitted = min(len(x), k * max_points_per_centroid) if max_points_per_centroid else len(x)
    with faiss_threads(None if gpu else faiss_fit_threads(fitted, x.shape[1], k)):
        km.train(x)
    return km.centroids.copy()


def kmeans_seeds(x: np.ndarray, k: int, seeds: list[int], niter: int, nredo: int, spherical: bool,
                 max_points_per_centroid: int | None, backend: str = "faiss", device: str = "cpu",
                 done: Callable[[], None] = lambda: None) -> list[np.ndarray]:
    """`kmeans` once per seed, in seed order. Fits that `faiss_fit_threads` puts on one thread run side by side, as
    many as faiss may use OpenMP threads (faiss releases the GIL), so the cores the policy leaves idle fit the other
    seeds; each is the same single-threaded computation as alone, so the centroids are the same bytes
    (tests/test_kmeans_threads.py). Larger fits, torch and GPU fits run one after another, each on every core. `done`
    is called once per finished fit."""
    def fit(seed: int) -> np.ndarray:
        c = kmeans(x, k, seed, niter, nredo, spherical, max_points_per_centroid, backend, device)
        done()
        return c

    fitted = min(len(x), k * max_points_per_centroid) if max_points_per_centroid else len(x)
    workers = min(len(seeds), faiss.omp_get_max_threads())
    if (workers < 2 or kmeans_backend(backend, device) != "faiss" or device.startswith("cuda")
            or faiss_fit_threads(fitted, x.shape[1], k) != 1):
        return [fit(s) for s in seeds]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fit, seeds))


def torch_kmeans(x: np.ndarray, k: int, seed: int, niter: int, nredo: int, spherical: bool,
                 max_points_per_centroid: int | None, device: str = "cpu") -> np.ndarray:
    """faiss's algorithm in torch, for GPUs without a GPU build of faiss: subsample to k × max_points_per_centroid
    points, initialise each restart with k distinct random points, `niter` Lloyd steps (an empty cluster takes over
    half of the largest one, both perturbed by ±1/1024, as faiss does; spherical: centroids renormalised), keep the
    restart with the best objective of its last assignment. Sums go through a one-hot matrix product, which is
    deterministic on the GPU (atomic scatter-adds are not), so a seed gives the same centroids every time."""
    rng = np.random.default_rng(seed)
    if max_points_per_centroid:
        x = subsample_rows(x, k * max_points_per_centroid, rng)
    xt = torch.from_numpy(x).to(device)
    best, best_obj = None, None
    for _ in range(nredo):
        c = xt[torch.from_numpy(rng.choice(len(xt), size=k, replace=False)).to(device)].clone()
        for _ in range(niter):
            labels, obj = nearest(xt, c, spherical)
            c = update_centroids(xt, labels, k, spherical)
        labels, obj = nearest(xt, c, spherical)
        if best is None or (obj > best_obj if spherical else obj < best_obj):
            best, best_obj = c, obj
    return best.cpu().numpy().astype(np.float32)


def nearest(x: torch.Tensor, c: torch.Tensor, spherical: bool, chunk: int | None = None) -> tuple[torch.Tensor,
                                                                                                   float]:
    """Each row's centroid (largest inner product for spherical k-means, else smallest Euclidean distance) and the
    k-means objective (sum of those inner products, or of squared distances), in chunks of rows that bound the
    (rows × k) score matrix. No rows (an image without foreground tokens in leopart-cd) give no labels."""
    chunk = chunk or max(1, (1 << 25) // max(len(c), 1))
    bias = _bias(c, spherical)
    labels, obj = [torch.zeros(0, dtype=torch.long, device=x.device)], 0.0
    for start in range(0, len(x), chunk):
        xs = x[start: start + chunk]
        best, lab = (xs @ c.T + bias).max(1)
        labels.append(lab)
        obj += float(best.double().sum()) if spherical else float(((xs * xs).sum(1) - 2 * best).double().sum())
    return torch.cat(labels), obj


def assign(x: np.ndarray, centroids: np.ndarray, spherical: bool, device: str = "cpu") -> np.ndarray:
    """(n, D) rows → (n,) index of each row's nearest centroid (`nearest`), computed on `device`."""
    def on(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)

    return nearest(on(x), on(centroids), spherical)[0].cpu().numpy()


def _bias(c: torch.Tensor, spherical: bool) -> torch.Tensor:
    """Per-centroid term of the score x·c + bias whose argmax is the nearest centroid: 0 for spherical k-means (largest
    inner product, as faiss assigns), −½|c|² otherwise (x·c − ½|c|² = −½‖x − c‖² + ½|x|²)."""
    return torch.zeros(len(c), dtype=c.dtype, device=c.device) if spherical else -0.5 * (c * c).sum(1)


def segment_sums(x: torch.Tensor, seg: torch.Tensor, n_seg: int) -> torch.Tensor:
    """(n, d) rows summed per segment id `seg` (n,) in [0, n_seg) → (n_seg, d), through one-hot matrix products in
    chunks of rows: deterministic on the GPU, where atomic scatter-adds are not."""
    sums = torch.zeros(n_seg, x.shape[1], dtype=x.dtype, device=x.device)
    chunk = max(1, (1 << 25) // max(n_seg, 1))
    for start in range(0, len(x), chunk):
        lab = seg[start: start + chunk]
        onehot = torch.zeros(len(lab), n_seg, dtype=x.dtype, device=x.device)
        onehot[torch.arange(len(lab), device=x.device), lab] = 1
        sums += onehot.T @ x[start: start + chunk]
    return sums


def update_centroids(x: torch.Tensor, labels: torch.Tensor, k: int, spherical: bool) -> torch.Tensor:
    """Centroids as the means of their points; empty clusters split the largest (faiss's rule); spherical: unit norm."""
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    c = segment_sums(x, labels, k) / counts.clamp(min=1)[:, None]
    sign = torch.where(torch.arange(x.shape[1], device=x.device) % 2 == 0, 1.0, -1.0).to(x.dtype)
    for e in torch.nonzero(counts == 0).flatten().tolist():
        j = int(counts.argmax())
        c[e] = c[j] * (1 + sign * _EPS)
        c[j] = c[j] * (1 - sign * _EPS)
        counts[e] = torch.floor(counts[j] / 2)
        counts[j] -= counts[e]
    if spherical:
        c = c / c.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return c


def centroid_scores(centroids: np.ndarray, spherical: bool, scale: float = 1.0):
    """Scoring function (B, h, w, D) tokens → (B, k, h, w) scores, on the tokens' device: the inner product x·c for
    spherical k-means (the cosine for unit vectors), else (x·c − ½|c|²) / scale, which is −½‖x − c‖² / scale up to a
    per-pixel constant. argmax is the nearest centroid either way, the scores can be upsampled, and `scale` (a
    positive number) only sets their sharpness for a softmax."""
    c = torch.from_numpy(centroids)
    bias = _bias(c, spherical)
    factor = 1.0 if spherical else 1.0 / scale
    on: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def score(x: torch.Tensor) -> torch.Tensor:
        b, h, w, d = x.shape
        if str(x.device) not in on:
            on[str(x.device)] = (c.to(x.device), bias.to(x.device))
        cc, bb = on[str(x.device)]
        s = factor * (x.reshape(-1, d) @ cc.T + bb)
        return s.reshape(b, h, w, len(cc)).permute(0, 3, 1, 2)

    return score
