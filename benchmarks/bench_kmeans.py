"""k-means inside a run against the same fit standalone (issue 24): the kmeans protocol on the SUIM sample with the
shared DINOv2 (K=8, 5 seeds × 5 restarts × at most 100 iterations), the protocol's fits of all seeds timed inside the
run (`cluster.kmeans_seeds`: one-thread fits side by side), then the same points fitted by faiss directly, one seed
after another, with 1 and with 2 OpenMP threads. Printed as a ratio, never asserted.

Usage: python benchmarks/bench_kmeans.py [--shared ../shared]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def standalone(faiss, x: np.ndarray, k: int, seeds: list[int], threads: int) -> float:
    """Seconds of the protocol's fits (spherical, niter 100, nredo 5, every point) by faiss directly, one seed after
    another on `threads` OpenMP threads."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        for seed in seeds:
            faiss.Kmeans(x.shape[1], k, niter=100, nredo=5, seed=seed, spherical=True, verbose=False,
                         max_points_per_centroid=len(x) // k + 1, min_points_per_centroid=1).train(x)
        return time.perf_counter() - t0
    finally:
        faiss.omp_set_num_threads(before)


def own_kernel(path: str, k: str, seeds: str) -> None:
    """`standalone` on one thread with faiss imported directly (OpenBLAS's own kernel); prints seconds and kernel."""
    import faiss  # before the package: not pinned

    from ssl_segbench.faiss_blas import blas_config
    x = np.load(path)
    sec = min(standalone(faiss, x, int(k), [int(s) for s in seeds.split(",")], 1) for _ in range(2))
    print(f"{sec}\t{blas_config().rsplit(' ', 1)[-1]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    p.add_argument("--own-kernel", nargs=3, metavar=("NPY", "K", "SEEDS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.own_kernel:
        own_kernel(*args.own_kernel)
        return
    shared = Path(args.shared)
    model, data = shared / "models" / "dinov2-small-imgfocus", shared / "data" / "suim_sample"
    if not (model.is_dir() and data.is_dir()):
        print(f"[kmeans] skipped: {model} or {data} is missing")
        return

    import ssl_segbench.protocols.clustering as clustering
    from ssl_segbench.faiss_blas import blas_config, faiss  # faiss as a run loads it
    from ssl_segbench.runner import RunOptions, run

    fitted, seconds = [], []
    inner = clustering.kmeans_seeds

    def timed(x, k, seeds, *rest, **kw):
        t0 = time.perf_counter()
        out = inner(x, k, seeds, *rest, **kw)
        seconds.append(time.perf_counter() - t0)
        fitted.extend((np.array(x), k, seed) for seed in seeds)
        return out

    clustering.kmeans_seeds = timed
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SSL_SEGBENCH_CACHE"] = str(Path(tmp) / "cache")
        opts = RunOptions(backbone=str(model), dataset="suim", data_root=str(data), protocols=("kmeans",),
                          params={}, device="cpu", results_dir=Path(tmp) / "res", write_records=False)
        run(opts)  # fills the feature cache
        fitted.clear()
        seconds.clear()
        run(opts)
    clustering.kmeans_seeds = inner
    x, k = fitted[0][0], fitted[0][1]
    inside = sum(seconds)

    seeds = [seed for _, _, seed in fitted]
    one, two = (min(standalone(faiss, x, k, seeds, t) for _ in range(2)) for t in (1, 2))
    with tempfile.TemporaryDirectory() as tmp:  # OpenBLAS's own kernel: faiss imported directly, in a fresh process
        np.save(Path(tmp) / "x.npy", x)
        own = subprocess.run([sys.executable, __file__, "--own-kernel", str(Path(tmp) / "x.npy"), str(k),
                              ",".join(map(str, seeds))], capture_output=True, text=True, check=True).stdout.split("\t")
    print(f"[kmeans] K={k} on {len(x)} tokens × {x.shape[1]}, {len(fitted)} seeds (5 restarts × at most 100 "
          f"iterations each), faiss's OpenBLAS: {blas_config()}")
    print(f"    inside a run                  {inside:7.2f} s")
    print(f"    standalone, 1 thread          {one:7.2f} s")
    print(f"    standalone, 2 threads         {two:7.2f} s")
    print(f"    inside / standalone 1 thread = {inside / one:.2f}")
    print(f"    standalone, 1 thread, faiss's OpenBLAS on its own kernel ({own[1].strip()}): {float(own[0]):.2f} s = "
          f"{float(own[0]) / one:.2f} × the pinned kernel's (faiss_blas.py)")


if __name__ == "__main__":
    main()
