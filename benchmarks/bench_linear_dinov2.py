"""linear-dinov2's head-training loop against the bare backbone forward passes it needs (issue 25): iterations per
second of the protocol's own training (augmented crops built ahead, one backbone call per batch, head forward and
backward, AdamW step, checkpoints) and of the same number of bare `backbone_features` calls on one fixed batch of the
same size (timed before and after the loop), and the loop's time over its own forward calls' (timed inside it, so a
busy machine slows both alike). Issue 25's target is loop / bare ≤ 1.10. Also the loop's parts per iteration: its
forward call, the rest (head forward and backward over the crop-sized logits, AdamW, waits for crops), and the CPU
time that building one batch of crops costs on one thread (what the prefetch thread or a DataLoader worker spends; on a
2-core CPU it competes with the forward). A random-init ViT-S/16 (`random_vits16`, no weights) on the synthetic
dataset's 256×192 images (8 classes), 224 crops. Then the head step alone (`head_step`: BatchNorm + 1×1 conv, logits
resized to the crop, cross-entropy, backward, AdamW) at the reference's ADE20K size: 150 classes, batch 16, 512² crops
from ViT-S/14 tokens (37² × 384), which the loop adds to every forward. Last, `dinov2-ms`'s four layers: one backbone
call for all of them against one call per layer (the tokens are equal; best of 3). Printed, never asserted.

Usage: python benchmarks/bench_linear_dinov2.py [--batch 8] [--iterations 12] [--crop 224] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone", default="random_vits16")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SSL_SEGBENCH_CACHE"] = str(Path(tmp) / "cache")
        f = bench(args.backbone, args.batch, args.iterations, args.crop, args.device, Path(tmp))
        print(f"[linear-dinov2] {args.backbone} on {args.device}, batch {args.batch} of {args.crop}² crops, "
              f"{args.iterations} iterations: training loop {f['loop_it_s']:.2f} it/s, bare forward "
              f"{f['bare_it_s']:.2f} it/s (loop / bare {f['loop_over_bare']:.3f}, target <= 1.10); inside the loop the "
              f"forwards took {f['forward_seconds']:.2f} s of {f['loop_seconds']:.2f} s: loop / its forwards "
              f"{f['loop_over_forwards']:.3f}")
        print(f"[linear-dinov2] per iteration: bare forward {f['bare_ms']:.1f} ms, the loop's forward "
              f"{f['forward_ms']:.1f} ms, the rest of the loop {f['rest_ms']:.1f} ms; building one batch of crops "
              f"{f['crops_ms']:.1f} ms of one CPU thread")
        ms = head_step_ms(args.device)
        print(f"[linear-dinov2] the head step alone at ADE20K's size (150 classes, batch 16, 512² crops, 37² × 384 "
              f"tokens) on {args.device}: {ms:.0f} ms")
        one, four = four_layers_s(args.backbone, args.batch, args.crop, args.device)
        print(f"[linear-dinov2] dinov2-ms's last four layers, batch {args.batch} of {args.crop}²: one call "
              f"{one:.3f} s, a call per layer {four:.3f} s ({four / one:.2f}×)")


def bench(backbone_id: str, batch: int, iterations: int, crop: int, device: str, tmp: Path,
          image_size: tuple[int, int] = (256, 192)) -> dict:
    """One measurement: seconds and iterations per second of the loop and of the bare forwards, their ratios, the
    loop's parts per iteration (ms), the single-thread milliseconds of building one batch of crops, and on CUDA the
    peak GPU memory of the loop (torch.cuda.max_memory_allocated)."""
    import torch

    import ssl_segbench.protocols.linear_dinov2 as module
    from ssl_segbench.backbones import BackboneRef
    from ssl_segbench.data.synthetic import Synthetic, generate_synthetic
    from ssl_segbench.protocols import get_protocol
    from ssl_segbench.protocols.base import Context
    from ssl_segbench.protocols.linear_dinov2 import NO_LIMIT, _TrainCrops, backbone_features, trained_head

    ds = Synthetic(generate_synthetic(tmp / "syn", n_train=2 * batch, n_test=1, size=image_size), "train")
    ref = BackboneRef(backbone_id)
    proto = get_protocol("linear-dinov2", iterations=iterations, batch_size=batch, crop_size=crop,
                         img_scale={"*": [NO_LIMIT, crop]}, warmup_iters=1)
    ctx = Context(eval_set=ds, train_set=ds, features=None, seeds=[0], device=device, backbone_ref=ref,
                  batch_size=batch)
    backbone = ctx.backbone()
    x = torch.randn(batch, 3, crop, crop)
    backbone_features(ctx, backbone, x, [-1], "warm-up")  # first-call costs out of both timings

    def bare() -> float:
        t0 = time.perf_counter()
        for _ in range(iterations):
            backbone_features(ctx, backbone, x, [-1], "bench")
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    inside = []

    def timed(*a, **kw):  # the loop's own backbone calls, timed where they run
        t = time.perf_counter()
        out = backbone_features(*a, **kw)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        inside.append(time.perf_counter() - t)
        return out

    before = bare()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    module.backbone_features = timed
    try:
        t0 = time.perf_counter()
        trained_head(ctx, ds, proto.p, [-1], 0)
        loop = time.perf_counter() - t0
    finally:
        module.backbone_features = backbone_features
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    forward = (before + bare()) / 2  # timed before and after the loop: a busy machine hits both alike
    crops = _TrainCrops(ds, proto.p, 0, 0, backbone.spec.mean, backbone.spec.std)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the prefetch thread or a DataLoader worker
    try:
        t0 = time.perf_counter()
        for k in range(min(iterations, 10)):
            crops[k]
        crops_ms = 1000 * (time.perf_counter() - t0) / min(iterations, 10)
    finally:
        torch.set_num_threads(threads)
    return {"loop_seconds": loop, "loop_it_s": iterations / loop, "bare_it_s": iterations / forward,
            "loop_over_bare": loop / forward, "forward_seconds": sum(inside), "loop_over_forwards": loop / sum(inside),
            "bare_ms": 1000 * forward / iterations, "forward_ms": 1000 * sum(inside) / iterations,
            "rest_ms": 1000 * (loop - sum(inside)) / iterations, "crops_ms": crops_ms, "peak_gpu_bytes": peak}


def head_step_ms(device: str, classes: int = 150, batch: int = 16, crop: int = 512, grid: int = 37, dim: int = 384,
                 repeats: int = 3) -> float:
    """Milliseconds of one `head_step` on random tokens and labels of the given sizes (best of `repeats`, after one
    warm-up step)."""
    import torch

    from ssl_segbench.protocols.linear_dinov2 import Head, head_step

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, grid, grid, generator=g).to(device)
    y = torch.randint(0, classes, (batch, crop, crop), generator=g).to(device)
    head = Head(dim, classes, 0.0, 0.01).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    best = float("inf")
    for k in range(repeats + 1):
        t0 = time.perf_counter()
        head_step(head, opt, x, y, 255, "all-pixels")
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if k:
            best = min(best, time.perf_counter() - t0)
    return 1000 * best


def four_layers_s(backbone_id: str, batch: int, crop: int, device: str, repeats: int = 3) -> tuple[float, float]:
    """Seconds for the last four layers' tokens of one batch: one `Backbone.forward` with the list of layers, and one
    call per layer (best of `repeats` each; the two results are checked equal)."""
    import torch

    from ssl_segbench.backbones import BackboneRef

    backbone = BackboneRef(backbone_id).load(device)
    x = torch.randn(batch, 3, crop, crop, generator=torch.Generator().manual_seed(0)).to(device)
    layers = [-4, -3, -2, -1]

    def one():
        return backbone(x, layers)["tokens"]

    def each():
        return torch.cat([backbone(x, i)["tokens"] for i in layers], -1)

    best = {}
    with torch.inference_mode():
        if not torch.equal(one(), each()):
            raise SystemExit("the tokens of one call for four layers differ from one call per layer")
        for name, fn in (("one", one), ("each", each)):
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    return best["one"], best["each"]


if __name__ == "__main__":
    main()
