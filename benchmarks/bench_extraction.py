"""Benchmarks printed as ratios (never asserted in tests).

1. harness feature extraction (decode, transform, DataLoader, forward, fp16 memmap write) vs the bare backbone forward
   on the same, pre-transformed tensors: the harness should cost under 10% extra;
2. a protocol on cached features vs a cold run (extraction + protocol);
3. peak resident memory of extraction at two dataset sizes, in fresh processes: it should not grow with the number of
   images beyond the page cache of the memory-mapped output.

Usage: python benchmarks/bench_extraction.py [--images 256] [--size 160] [--backbone random_vits16]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _dataset(root: Path, n: int):
    from ssl_segbench.data import get_dataset
    from ssl_segbench.data.synthetic import generate_synthetic

    generate_synthetic(root, n_train=1, n_test=n, seed=7)
    return get_dataset("synthetic", root, "test")


def bench_throughput(args, work: Path) -> None:
    import torch

    from ssl_segbench.backbones import BackboneRef
    from ssl_segbench.features import extract
    from ssl_segbench.transforms import Transform

    torch.set_num_threads(os.cpu_count() or 1)
    ds = _dataset(work / f"data{args.images}", args.images)
    ref = BackboneRef(args.backbone)
    t = Transform("shorter", args.size, ref.spec.patch_size)
    model = ref.load("cpu")
    tensors = torch.stack([t.image(ds.load_image(i), ref.spec.mean, ref.spec.std) for i in range(len(ds))])

    def forward_only():
        with torch.inference_mode():
            for s in range(0, len(tensors), args.batch_size):
                model(tensors[s: s + args.batch_size], -1, ("tokens",))

    def harness_run(k):
        extract(ref, ds, t, batch_size=args.batch_size, root=work / f"cache-throughput-{k}")

    forward_only()  # warm-up
    bare, harness, load = float("inf"), float("inf"), float("inf")
    for k in range(args.repeats):  # interleaved, best of each: background load hits both alike
        t0 = time.perf_counter()
        forward_only()
        bare = min(bare, time.perf_counter() - t0)
        t0 = time.perf_counter()
        harness_run(k)
        harness = min(harness, time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref.load("cpu")  # the one-time model construction that extract() includes and the bare forward does not
        load = min(load, time.perf_counter() - t0)
    print(f"[1] extraction, {len(ds)} images at {args.size}px, {args.backbone}, batch {args.batch_size}, "
          f"best of {args.repeats}")
    print(f"    bare forward  {len(ds) / bare:8.1f} img/s   ({bare:.1f} s)")
    print(f"    harness       {len(ds) / harness:8.1f} img/s   ({harness:.1f} s)")
    print(f"    harness / bare time = {harness / bare:.3f} end to end; {(harness - load) / bare:.3f} per image, "
          f"without the one-time model load ({load:.2f} s)  (target < 1.10)")

    from ssl_segbench.protocols import Context, get_protocol

    def run_kmeans(cache):
        ctx = Context(eval_set=ds, train_set=None, seeds=[0, 1, 2, 3, 4],
                      features=lambda d, f: extract(ref, d, t, -1, f, "cpu", args.batch_size, 0, root=cache))
        t0 = time.perf_counter()
        get_protocol("kmeans").run(ctx)
        return time.perf_counter() - t0

    cold = run_kmeans(work / "cache-cold")
    warm = run_kmeans(work / "cache-cold")
    print("[2] kmeans (5 seeds) on the same images")
    print(f"    cold (extract + protocol) {cold:.1f} s, cached {warm:.1f} s: cached / cold = {warm / cold:.3f}")


def _peak_child(n: int, work: Path, args) -> dict:
    """Extraction of n images in a fresh process; returns its resident memory before and at most during extraction
    (VmRSS sampled every 5 ms: the high-water mark of the process is set by imports, not by extraction) and the cache
    size."""
    code = f"""
import json, sys, threading, time, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from bench_extraction import _dataset
from pathlib import Path
from ssl_segbench.backbones import BackboneRef
from ssl_segbench.features import extract
from ssl_segbench.transforms import Transform
ds = _dataset(Path({str(work)!r}) / "mem{n}", {n})
ref = BackboneRef({args.backbone!r})
ref.load("cpu")  # the model's own memory is not extraction's
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
before, peak, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.005)
t = threading.Thread(target=sample)
t.start()
fs = extract(ref, ds, Transform("shorter", {args.size}, ref.spec.patch_size), batch_size={args.batch_size},
             root=Path({str(work)!r}) / "cache-mem{n}")
done.set()
t.join()
cache = fs["tokens"].data.nbytes + fs.labels.data.nbytes
print(json.dumps({{"before_kb": before, "peak_kb": peak[0], "cache_bytes": cache}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_memory(args, work: Path) -> None:
    small, large = args.images // 4, args.images
    for n in (small, large):  # generated here, so the child's high-water mark is imports, model and extraction only
        _dataset(work / f"mem{n}", n)
    a, b = _peak_child(small, work, args), _peak_child(large, work, args)
    print("[3] resident memory during extraction, fresh process, model loaded (mapped output pages included)")
    for n, r in ((small, a), (large, b)):
        print(f"    {n:5d} images: peak {r['peak_kb'] / 1024:7.1f} MiB (before extraction "
              f"{r['before_kb'] / 1024:7.1f} MiB, +{(r['peak_kb'] - r['before_kb']) / 1024:.1f}), "
              f"token + label cache {r['cache_bytes'] / 2**20:6.1f} MiB")
    growth = (b["peak_kb"] - a["peak_kb"]) / 1024
    cache_growth = (b["cache_bytes"] - a["cache_bytes"]) / 2**20
    print(f"    peak growth {growth:.1f} MiB for {large - small} more images vs cache growth {cache_growth:.1f} MiB "
          f"(ratio {growth / max(cache_growth, 1e-9):.2f}; ≤ 1 means nothing but the cache grows)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--backbone", default="random_vits16")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions; the best of each is reported")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ssl-segbench-bench-") as tmp:
        work = Path(tmp)
        bench_throughput(args, work)
        bench_memory(args, work)


if __name__ == "__main__":
    main()
