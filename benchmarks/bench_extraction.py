"""Benchmarks printed as ratios (never asserted in tests).

1. harness feature extraction (decode, transform, DataLoader, forward, fp16 memmap write) vs the bare backbone forward
   on the same, pre-transformed tensors, the model loaded once as in a run;
2. the whole protocol suite vs one feature pass, per protocol, its own backbone passes (crops) apart from its own
   work (scoring, graph, masks, fit; `breakdown`, from the seconds records keep in their info), with fs4 and retrieval
   timed in the same run: on the SUIM sample with the shared DINOv2 (when ../shared is there) and on the synthetic
   set with the random ViT;
3. peak resident memory of extraction at two dataset sizes, in fresh processes: it should not grow with the number of
   images beyond the page cache of the memory-mapped output.

Usage: python benchmarks/bench_extraction.py [--images 256] [--size 160] [--backbone random_vits16] [--only 1,2,3]
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

    from ssl_segbench.features import _TorchView

    view = _TorchView(ds, t, ref.spec.mean, ref.spec.std, True)
    t0 = time.perf_counter()
    for i in range(len(ds)):  # what the harness does besides the forward: decode + transform image and mask
        view[i]
    decode = time.perf_counter() - t0
    forward_only()  # warm-up
    harness_run("warm-up")  # the model is loaded by then, once, as in a run (BackboneRef keeps it)
    bare, harness = float("inf"), float("inf")
    for k in range(args.repeats):  # interleaved, best of each: background load hits both alike
        t0 = time.perf_counter()
        forward_only()
        bare = min(bare, time.perf_counter() - t0)
        t0 = time.perf_counter()
        harness_run(k)
        harness = min(harness, time.perf_counter() - t0)
    print(f"[1] extraction, {len(ds)} images at {args.size}px, {args.backbone}, batch {args.batch_size}, "
          f"best of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"    bare forward  {len(ds) / bare:8.1f} img/s   ({bare:.2f} s)")
    print(f"    harness       {len(ds) / harness:8.1f} img/s   ({harness:.2f} s)")
    print(f"    harness / bare = {harness / bare:.3f}  (target ≤ 1.05)")
    print(f"    decoding + transforming images and masks alone, one thread: {decode:.2f} s = {decode / bare:.3f} of "
          "the bare forward (on a CPU it competes with the forward for the same cores)")


SUITE = ("kmeans", "linear", "overcluster", "leopart-cd", "datus", "maskdistill")
EXTRA = ("fs4", "retrieval")  # timed in the same run, listed apart: issue 24's suite ratio is SUITE's
SUIM_EXTRA = ("fs4",)  # the SUIM sample has no train split for retrieval's memory bank
SMALL = {"overcluster": {"k": 100}, "leopart-cd": {"cbfe_k": 50, "k": 20}}  # the samples are a few images


def breakdown(record) -> dict[str, float]:
    """A record's wall seconds split by what its info and passes say ran (seconds the protocols record themselves):
    `crops` its own backbone passes computed in this run (DatUS² segment crops, MaskDistill mask crops), `scoring`
    the Predictions streams (scoring functions, upsampling, argmax), `graph` graph work (DatUS² per-image Louvain
    segment discovery, leopart-cd co-occurrence graph and infomap), `masks` MaskDistill's object masks, and `fit`
    the rest: clustering, training, matching, reading the cache."""
    info, computed = record.info, any(p["computed"] for p in record.provenance["passes"] if p["kind"] != "features")
    out = {"crops": 0.0, "scoring": float(record.provenance.get("scoring_seconds", 0.0)), "graph": 0.0, "masks": 0.0}
    if computed and "segment_embeddings" in info:
        out["crops"] += float(info["segment_embeddings"]["seconds"])
    if "segment_discovery_seconds" in info:
        out["graph"] += float(info["segment_discovery_seconds"])
    if "seconds" in info.get("graph", {}):
        out["graph"] += float(info["graph"]["seconds"])
    for name, sec in info.get("pseudo_seconds", {}).items():
        if not info["pseudo_cache_hit"][name]:
            out["crops"] += float(sec["embed"])
            out["masks"] += float(sec["masks"])
    out["fit"] = max(0.0, float(record.provenance["wall_seconds"]) - sum(out.values()))
    return out


def warm_imports(protocols: tuple[str, ...]) -> None:
    """What a process imports once, the first time a protocol needs it: the protocols' optional packages and torch's
    compiler machinery, which torch imports when the first optimizer is made. Imported before anything is timed, as
    the model is loaded first, so the ratios compare compute with compute."""
    import torch._dynamo  # noqa: F401

    from ssl_segbench.extras import require
    from ssl_segbench.protocols import protocol_class

    for name in protocols:
        for module in protocol_class(name).requires:
            require(module, f"protocol {name!r}")


def bench_suite(name: str, backbone: str, dataset: str, data_root, work: Path, device: str = "cpu",
                tag: str = "[2]", extra: tuple[str, ...] = EXTRA) -> None:
    """One feature pass (tokens of the evaluation split), then the whole suite (and `extra`) in a fresh cache: its
    one shared pass (every facet of every split it reads), each protocol on top, split by `breakdown`, and the
    ratios. The dataset is hashed first and the model's load time is taken out of the suite's figures, so every ratio
    compares compute with compute."""
    import torch

    from ssl_segbench.backbones import BackboneRef
    from ssl_segbench.data import get_dataset
    from ssl_segbench.faiss_blas import blas_config
    from ssl_segbench.features import extract, loader_workers
    from ssl_segbench.runner import RunOptions, run
    from ssl_segbench.transforms import Transform

    os.environ["SSL_SEGBENCH_CACHE"] = str(work / f"cache-suite-{name}")
    t0 = time.perf_counter()
    warm_imports(SUITE + tuple(extra))
    imports = time.perf_counter() - t0
    ds = get_dataset(dataset, data_root)
    ds.content_sha256()  # hashed once (remembered in the cache), before anything is timed
    BackboneRef(backbone).load(device)  # imports and the checkpoint's pages warm, as for the run's own load below
    t0 = time.perf_counter()
    ref = BackboneRef(backbone)
    ref.load(device)
    load = time.perf_counter() - t0
    one = float("inf")
    for k in range(2):  # the faster of two: the first forward at a new shape also pays the kernels' first-call setup
        t0 = time.perf_counter()
        extract(ref, ds, Transform("shorter", 224, ref.spec.patch_size), device=device,
                batch_size=64 if device != "cpu" else 16, num_workers=loader_workers(device),
                root=work / f"one-pass-{name}-{k}")
        one = min(one, time.perf_counter() - t0)
    t0 = time.perf_counter()
    out = run(RunOptions(backbone=backbone, dataset=dataset, data_root=data_root, protocols=SUITE + tuple(extra),
                         params=SMALL, device=device, results_dir=work / f"res-{name}", write_records=False))
    total = time.perf_counter() - t0 - load
    records = [r for _, _, r in out]
    shared = records[0].provenance["shared_feature_pass_seconds"] - load
    splits = {ds.split: len(ds)}
    for r in records:
        train = (r.identity.get("train") or {}).get("split")
        if train and train not in splits:
            splits[train] = len(get_dataset(dataset, data_root, train))
    print(f"{tag} suite on {name}: {dataset}, {backbone}, {device}, {torch.get_num_threads()} threads, model load "
          f"{load:.2f} s and the protocols' first imports {imports:.2f} s (a process pays both once;"
          " not counted below)")
    print(f"    one feature pass (tokens of {ds.split}, {len(ds)} images)  {one:7.2f} s")
    print(f"    the suite's shared pass (all facets, {' + '.join(f'{k} {v}' for k, v in splits.items())} images)"
          f"  {shared:7.2f} s = {shared / one:5.2f} × one pass")
    parts = ("crops", "scoring", "graph", "masks", "fit")
    print(f"    {'protocol':12s} {'seconds':>8s} {'× pass':>7s}   own backbone passes | own work, × one pass: "
          "scoring (score, upsample, argmax) / graph / masks / fit (clustering, training, rest)")
    extra_s, passes, fits = 0.0, shared, 0.0
    for r in records:
        sec = r.provenance["wall_seconds"]
        if r.protocol["name"] in extra:
            extra_s += sec
        else:
            passes += breakdown(r)["crops"]
            fits += breakdown(r)["fit"] if r.protocol["name"] in ("kmeans", "overcluster") else 0.0
        b = {k: v / one for k, v in breakdown(r).items()}
        own = " / ".join(f"{b[k]:5.2f}" for k in parts[1:])
        print(f"    {r.protocol_spec:12s} {sec:8.2f} {sec / one:7.2f}   crops {b['crops']:5.2f} | {own}"
              + ("   (not in the suite ratio)" if r.protocol["name"] in extra else ""))
    suite = total - extra_s
    print(f"    whole suite ({', '.join(SUITE)}: shared pass + protocols)  {suite:7.2f} s = {suite / one:5.2f} × one "
          "pass")
    print(f"    of which backbone passes (shared + crops) {passes / one:5.2f}, k-means fits of kmeans and overcluster "
          f"(faiss's matrix products) {fits / one:5.2f}, everything else {(suite - passes - fits) / one:5.2f} × one "
          f"pass; faiss's BLAS: {blas_config()}")


def bench_suites(shared: Path, work: Path, device: str = "cpu", tag: str = "[2]") -> None:
    """`bench_suite` on the SUIM sample with the shared DINOv2 (when `shared` has them), then on the synthetic set
    with the random ViT-S/16."""
    model, suim = shared / "models" / "dinov2-small-imgfocus", shared / "data" / "suim_sample"
    if model.is_dir() and suim.is_dir():
        bench_suite("suim-sample", str(model), "suim", str(suim), work, device, tag, extra=SUIM_EXTRA)
    else:
        print(f"{tag} suite on the SUIM sample: skipped, {model} or {suim} is not there (--shared DIR)")
    bench_suite("synthetic", "random_vits16", "synthetic", None, work, device, tag)


def _peak_child(n: int, work: Path, args) -> dict:
    """Extraction of n images in a fresh process; returns its resident memory before and at most during extraction
    (VmRSS sampled every 5 ms: the high-water mark of the process is set by imports, not by extraction) and the cache
    size."""
    code = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from bench_extraction import _dataset
from peak_rss import PeakRSS
from pathlib import Path
from ssl_segbench.backbones import BackboneRef
from ssl_segbench.features import extract
from ssl_segbench.transforms import Transform
ds = _dataset(Path({str(work)!r}) / "mem{n}", {n})
ref = BackboneRef({args.backbone!r})
ref.load("cpu")  # the model's own memory is not extraction's
with PeakRSS() as m:
    fs = extract(ref, ds, Transform("shorter", {args.size}, ref.spec.patch_size), batch_size={args.batch_size},
                 root=Path({str(work)!r}) / "cache-mem{n}")
cache = fs["tokens"].data.nbytes + fs.labels.data.nbytes
print(json.dumps({{"before_kb": m.before_kb, "peak_kb": m.peak_kb, "cache_bytes": cache}}))
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
    p.add_argument("--only", default="1,2,3", help="which benchmarks to run, e.g. 2")
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"),
                   help="the shared folder with data/suim_sample and models/dinov2-small-imgfocus")
    args = p.parse_args()
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="ssl-segbench-bench-") as tmp:
        work = Path(tmp)
        if "1" in only:
            bench_throughput(args, work)
        if "2" in only:
            bench_suites(Path(args.shared), work)
        if "3" in only:
            bench_memory(args, work)


if __name__ == "__main__":
    main()
