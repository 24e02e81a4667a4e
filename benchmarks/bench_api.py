"""What evaluating an in-memory model every epoch costs: `ssl_segbench.evaluate(model, cache=False)` (state-dict
digest, dataset digest, decode, transform, forward, temporary feature entries, k-means with one seed, scoring) against
the bare forward pass of the same model on the same, pre-transformed images. Printed as a ratio, never asserted.

Usage: python benchmarks/bench_api.py [--images 64] [--size 160] [--arch vit_small_patch16_224] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--arch", default="vit_small_patch16_224", help="timm architecture, random weights")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions; the best of each is reported")
    args = p.parse_args()

    import timm
    import torch

    import ssl_segbench
    from ssl_segbench.data import get_dataset
    from ssl_segbench.data.synthetic import generate_synthetic
    from ssl_segbench.transforms import Transform

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = timm.create_model(args.arch, pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    with tempfile.TemporaryDirectory(prefix="ssl-segbench-bench-api-") as work:
        root = generate_synthetic(Path(work) / "data", n_train=1, n_test=args.images, seed=7)
        ds = get_dataset("synthetic", root, "test")
        cfg = model.pretrained_cfg
        t = Transform("shorter", args.size, model.patch_embed.patch_size[0])
        tensors = torch.stack([t.image(ds.load_image(i), cfg["mean"], cfg["std"]) for i in range(len(ds))])

        def bare():
            with torch.inference_mode():
                for s in range(0, len(tensors), args.batch_size):
                    model.forward_features(tensors[s: s + args.batch_size])

        def api():
            ssl_segbench.evaluate(model, dataset="synthetic", data_root=root, split="test", protocols=["kmeans"],
                                  seeds=1, size=args.size, device="cpu", batch_size=args.batch_size, cache=False,
                                  write_records=False)

        bare()  # warm-up
        best_bare, best_api = float("inf"), float("inf")
        for _ in range(args.repeats):  # interleaved, best of each: background load hits both alike
            t0 = time.perf_counter()
            bare()
            best_bare = min(best_bare, time.perf_counter() - t0)
            t0 = time.perf_counter()
            api()
            best_api = min(best_api, time.perf_counter() - t0)
    print(f"[api] evaluate(model, cache=False), kmeans 1 seed, {len(ds)} images at {args.size}px, {args.arch}, batch "
          f"{args.batch_size}, best of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"    bare forward            {best_bare:.2f} s")
    print(f"    evaluate(cache=False)   {best_api:.2f} s")
    print(f"    evaluate / bare = {best_api / best_bare:.3f}  (the rest: digests, decoding, k-means, scoring)")


if __name__ == "__main__":
    main()
