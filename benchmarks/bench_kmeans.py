"""k-means inside a run against the same fit standalone (issue 24): the kmeans protocol on the SUIM sample with the
shared DINOv2 (K=8, 5 seeds × 5 restarts × 100 iterations), each `cluster.kmeans` call timed inside the run, then the
same points fitted by faiss directly with 1 and with 2 OpenMP threads. Printed as a ratio, never asserted.

Usage: python benchmarks/bench_kmeans.py [--shared ../shared]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    args = p.parse_args()
    shared = Path(args.shared)
    model, data = shared / "models" / "dinov2-small-imgfocus", shared / "data" / "suim_sample"
    if not (model.is_dir() and data.is_dir()):
        print(f"[kmeans] skipped: {model} or {data} is missing")
        return

    import faiss

    import ssl_segbench.protocols.clustering as clustering
    from ssl_segbench.runner import RunOptions, run

    fitted, seconds = [], []
    inner = clustering.kmeans

    def timed(x, k, seed, *rest, **kw):
        t0 = time.perf_counter()
        out = inner(x, k, seed, *rest, **kw)
        seconds.append(time.perf_counter() - t0)
        fitted.append((np.array(x), k, seed))
        return out

    clustering.kmeans = timed
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SSL_SEGBENCH_CACHE"] = str(Path(tmp) / "cache")
        opts = RunOptions(backbone=str(model), dataset="suim", data_root=str(data), protocols=("kmeans",),
                          params={}, device="cpu", results_dir=Path(tmp) / "res", write_records=False)
        run(opts)  # fills the feature cache
        fitted.clear()
        seconds.clear()
        run(opts)
    clustering.kmeans = inner
    x, k = fitted[0][0], fitted[0][1]
    inside = sum(seconds)

    def standalone(threads: int) -> float:
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            for _, _, seed in fitted:  # the protocol's defaults: spherical, niter 100, nredo 5, every point
                faiss.Kmeans(x.shape[1], k, niter=100, nredo=5, seed=seed, spherical=True, verbose=False,
                             max_points_per_centroid=len(x) // k + 1, min_points_per_centroid=1).train(x)
            return time.perf_counter() - t0
        finally:
            faiss.omp_set_num_threads(before)

    one, two = min(standalone(1) for _ in range(2)), min(standalone(2) for _ in range(2))
    print(f"[kmeans] K={k} on {len(x)} tokens × {x.shape[1]}, {len(fitted)} seeds (5 restarts × 100 iterations each)")
    print(f"    inside a run                  {inside:7.2f} s")
    print(f"    standalone, 1 thread          {one:7.2f} s")
    print(f"    standalone, 2 threads         {two:7.2f} s")
    print(f"    inside / standalone 1 thread = {inside / one:.2f}")


if __name__ == "__main__":
    main()
