"""The GPU check: one command for a lent GPU machine (`make gpu-check`; sized to finish within 8 minutes, not yet timed
on a GPU), printing figures.

1. the tests that exercise CUDA paths (tests/test_cuda.py and the device-agnostic protocol tests, on the GPU);
2. extraction of a ViT-B/16 at 448² in bf16: the bare forward on pre-decoded tensors, the DataLoader alone (decode,
   resize, normalise in workers), and the harness end to end (decode → forward → fp16 cache), as images/s and ratios;
3. the protocol suite (and fs4, retrieval) vs one feature pass, per protocol with its own backbone passes apart from
   its own work (benchmarks/bench_extraction.py's [2], on the GPU): on the synthetic set, and on the SUIM sample with
   the shared DINOv2 where --shared has them;
4. k-means on 1M tokens of width 768: torch on the GPU (K = 27 and K = 500) and faiss on the CPU cores;
5. linear-dinov2's head training (benchmarks/bench_linear_dinov2.py): a few hundred iterations at batch 16 on 512
   crops of 640×480 synthetic images, bf16 backbone: iterations/s, the loop over its forward passes, peak GPU memory
   and the hours 40,000 iterations would take.

Figures are printed, never asserted. `--quick --device cpu` runs every part at toy sizes (a smoke test of this script).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CUDA_TESTS = ["tests/test_cuda.py", "tests/test_kmeans_backends.py", "tests/test_protocols.py",
              "tests/test_suite_one_pass.py"]


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def environment(device: str) -> None:
    import faiss
    import torch

    from ssl_segbench.features import loader_workers

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    print(f"[0] {name}; torch {torch.__version__}; faiss {faiss.__version__} with {faiss.get_num_gpus()} GPU(s); "
          f"{len(os.sched_getaffinity(0))} cores; DataLoader workers {loader_workers(device)}", flush=True)


def run_tests(timeout: int) -> None:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS],
                          cwd=HERE.parent, capture_output=True, text=True, timeout=timeout)
    tail = proc.stdout.strip().splitlines()[-15:]
    print(f"[1] CUDA test subset ({' '.join(CUDA_TESTS)}): exit {proc.returncode}, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    for line in tail:
        print("    " + line)


def bench_extraction(args, work: Path) -> None:
    import torch

    from ssl_segbench.backbones import BackboneRef
    from ssl_segbench.data import get_dataset
    from ssl_segbench.data.synthetic import generate_synthetic
    from ssl_segbench.features import _TorchView, extract, loader_workers
    from ssl_segbench.transforms import Transform

    dev = args.device
    t0 = time.perf_counter()
    root = generate_synthetic(work / "big", n_train=1, n_test=args.images, size=(640, 480), seed=11)
    ds = get_dataset("synthetic", root, "test")
    ds.content_sha256()
    gen = time.perf_counter() - t0
    ref = BackboneRef(args.backbone)
    model = ref.load(dev)
    t = Transform("square", args.size, ref.spec.patch_size)
    workers = loader_workers(dev)
    amp = dev.startswith("cuda")

    view = _TorchView(ds, t, ref.spec.mean, ref.spec.std, False)
    loader = torch.utils.data.DataLoader(view, batch_size=args.batch_size, num_workers=workers,
                                         pin_memory=amp, prefetch_factor=4 if workers else None)
    t0 = time.perf_counter()
    batches = [x.to(dev, non_blocking=True) for x, _, _, _ in loader]  # pre-decoded, on the device
    sync(dev)
    decode = time.perf_counter() - t0

    def bare() -> float:
        sync(dev)
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            for x in batches:
                model(x, -1, ("tokens",))
        sync(dev)
        return time.perf_counter() - t0

    bare()  # warm-up (kernels, allocator)
    b = min(bare() for _ in range(3))
    times = []
    for k in range(2):
        t0 = time.perf_counter()
        extract(ref, ds, t, facets=("tokens",), device=dev, batch_size=args.batch_size, num_workers=workers,
                root=work / f"cache-harness-{k}")
        times.append(time.perf_counter() - t0)
    h = min(times)
    n = len(ds)
    print(f"[2] extraction: {n} JPEGs 640×480 (generated in {gen:.0f} s) → {args.backbone} at {args.size}², "
          f"batch {args.batch_size}, {'bf16 autocast' if amp else 'fp32'}, {workers} workers", flush=True)
    print(f"    bare forward on pre-decoded tensors  {n / b:9.1f} img/s")
    print(f"    DataLoader alone (decode + resize)   {n / decode:9.1f} img/s")
    print(f"    harness end to end (→ fp16 cache)    {n / h:9.1f} img/s   harness / bare = {h / b:.3f}")


def bench_kmeans(args) -> None:
    import faiss
    import numpy as np

    from ssl_segbench.cluster import kmeans

    rng = np.random.default_rng(0)
    n, d = args.tokens, 768
    centres = rng.normal(size=(64, d)).astype(np.float32)
    x = centres[rng.integers(0, 64, size=n)] + rng.normal(size=(n, d)).astype(np.float32)
    print(f"[4] k-means on {n} tokens × {d} (every token fitted, one restart)", flush=True)
    runs = [("torch", args.device, 27, 100), ("torch", args.device, 500, 20)]
    if args.device.startswith("cuda") and faiss.get_num_gpus() > 0:
        runs.append(("faiss", args.device, 27, 100))
    runs.append(("faiss", "cpu", 27, 10))
    for backend, dev, k, niter in runs:
        t0 = time.perf_counter()
        kmeans(x, k, 0, niter, 1, False, None, backend, dev)
        sync(dev)
        s = time.perf_counter() - t0
        print(f"    {backend:5s} on {dev:5s} K={k:3d}: {niter} iterations in {s:7.2f} s = {1000 * s / niter:8.1f} "
              f"ms/iteration; 5 seeds × 5 restarts × 100 iterations (the protocols' default) ≈ "
              f"{25 * 100 * s / niter:.0f} s")


def bench_linear_dinov2(args, work: Path) -> None:
    from bench_linear_dinov2 import bench, head_step_ms

    f = bench(args.backbone, args.linear_batch, args.linear_iterations, args.linear_crop, args.device,
              work / "linear-dinov2", image_size=(640, 480))
    peak = "n/a (CPU)" if f["peak_gpu_bytes"] is None else f"{f['peak_gpu_bytes'] / 2**30:.2f} GiB"
    print(f"[5] linear-dinov2 head training: {args.backbone}, batch {args.linear_batch} of {args.linear_crop}² crops, "
          f"{args.linear_iterations} iterations", flush=True)
    print(f"    training loop {f['loop_it_s']:8.2f} iterations/s   bare forward {f['bare_it_s']:8.2f} iterations/s   "
          f"loop / bare = {f['loop_over_bare']:.3f} (target ≤ 1.10)   loop / its forwards = "
          f"{f['loop_over_forwards']:.3f}")
    print(f"    per iteration: bare forward {f['bare_ms']:.1f} ms, the loop's forward {f['forward_ms']:.1f} ms, the "
          f"rest {f['rest_ms']:.1f} ms; one batch of crops {f['crops_ms']:.1f} ms of one CPU thread")
    size = {"classes": 150, "batch": 16, "crop": 512} if not args.quick else {"classes": 4, "batch": 2, "crop": 64}
    print(f"    the head step alone ({size['classes']} classes, batch {size['batch']}, {size['crop']}² crops; ADE20K's "
          f"reference: 150, 16, 512²): {head_step_ms(args.device, **size, grid=size['crop'] // 14):.1f} ms")
    print(f"    peak GPU memory {peak}; 40,000 iterations ≈ {40000 / f['loop_it_s'] / 3600:.1f} h")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="toy sizes: checks that every part of the script runs")
    p.add_argument("--skip", default="", help="parts to leave out, e.g. 1,3")
    p.add_argument("--test-timeout", type=int, default=240)
    p.add_argument("--shared", default=str(HERE.parent / "shared"),
                   help="a folder with data/suim_sample and models/dinov2-small-imgfocus: part 3 then also runs the "
                        "suite on the SUIM sample (default: shared/ of this checkout)")
    args = p.parse_args()
    args.images, args.size, args.batch_size, args.tokens = (768, 448, 64, 1_000_000) if not args.quick else \
        (8, 64, 4, 5_000)
    args.backbone = "random_vitb16" if not args.quick else "random_vits16"
    args.linear_batch, args.linear_crop, args.linear_iterations = (16, 512, 300) if not args.quick else (2, 64, 3)
    skip = set(args.skip.split(","))
    sys.path.insert(0, str(HERE))
    environment(args.device)
    if "1" not in skip:
        run_tests(args.test_timeout)
    with tempfile.TemporaryDirectory(prefix="ssl-segbench-gpu-check-") as tmp:
        work = Path(tmp)
        os.environ["SSL_SEGBENCH_CACHE"] = str(work / "cache")
        if "2" not in skip:
            bench_extraction(args, work)
        if "3" not in skip:
            from bench_extraction import bench_suites

            bench_suites(Path(args.shared), work, args.device, "[3]")
        if "4" not in skip:
            bench_kmeans(args)
        if "5" not in skip:
            bench_linear_dinov2(args, work)


if __name__ == "__main__":
    main()
