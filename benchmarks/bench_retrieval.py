"""Peak resident memory of retrieval's search (printed as ratios, never asserted in tests).

A memory bank of M rows (float16 tokens, float32 class distributions: cache entries written with the cache's own
writer) is searched by Q query patches, in the batches the shared scoring path hands the scorer, through the
protocol's own `Scorer`, each (M, Q) in a fresh process whose VmRSS is sampled every 5 ms. Peak memory should not grow
with Q (queries are scored batch by batch) and should grow with M by much less than the bank (the bank is read in
chunks and its pages released after each).

Usage: python benchmarks/bench_retrieval.py [--dim 128] [--banks 80000,320000] [--queries 16384,49152]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CLASSES = 21
GRID = 32  # query images of 32 × 32 patches, 16 per batch as a 512² VOC batch


def make_bank(root: Path, rows: int, dim: int) -> None:
    """A bank of `rows` unit rows with random class distributions, written as two cache entries."""
    import numpy as np

    from ssl_segbench.cache import RowWriter

    rng = np.random.default_rng(0)
    per = 4096
    shapes = [(min(per, rows - s), 1) for s in range(0, rows, per)]
    tw = RowWriter(root / "tokens", {"bench": rows}, shapes, dim, np.float16, False)
    lw = RowWriter(root / "labels", {"bench": rows}, shapes, CLASSES, np.float32, False)
    for i, (n, _) in enumerate(shapes):
        x = rng.normal(size=(n, dim)).astype(np.float32)
        tw.write(i, (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
        d = rng.random((n, CLASSES)).astype(np.float32)
        lw.write(i, d / d.sum(1, keepdims=True))
    tw.commit({})
    lw.commit({})


def peak_child(root: Path, queries: int, dim: int) -> dict:
    code = f"""
import json, sys, time
import numpy as np, torch
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from peak_rss import PeakRSS
from ssl_segbench.cache import ArrayStore
from ssl_segbench.protocols.retrieval import Bank, RetrievalProtocol, Scorer
root = Path({str(root)!r})
bank = Bank(ArrayStore(root / "tokens"), ArrayStore(root / "labels"), None, False)
scorer = Scorer(bank, RetrievalProtocol().params, "cpu")
rng = np.random.default_rng(1)
images = {queries} // {GRID * GRID}
t0 = time.perf_counter()
with PeakRSS() as m:
    for start in range(0, images, 16):
        b = min(16, images - start)
        scorer(torch.from_numpy(rng.normal(size=(b, {GRID}, {GRID}, {dim})).astype(np.float32)))
print(json.dumps({{"before_kb": m.before_kb, "peak_kb": m.peak_kb, "seconds": time.perf_counter() - t0,
                   "bank_bytes": bank.tokens.data.nbytes + bank.labels.data.nbytes}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--banks", default="80000,320000", help="two bank sizes (rows), both above one search chunk")
    p.add_argument("--queries", default="16384,49152", help="two query-set sizes (patches; 16384 = one batch)")
    args = p.parse_args()
    banks = [int(v) for v in args.banks.split(",")]
    queries = [int(v) for v in args.queries.split(",")]
    with tempfile.TemporaryDirectory(prefix="ssl-segbench-bench-retrieval-") as tmp:
        results = {}
        for m in banks:
            make_bank(Path(tmp) / f"bank{m}", m, args.dim)
            for q in queries:
                results[m, q] = peak_child(Path(tmp) / f"bank{m}", q, args.dim)
    print(f"[4] retrieval search, peak resident memory in a fresh process (exact, k = 30, D = {args.dim}, "
          f"{CLASSES} classes, batches of 16 images × {GRID}² patches)")
    for (m, q), r in results.items():
        print(f"    bank {m:7d} rows ({r['bank_bytes'] / 2**20:6.1f} MiB), {q:6d} queries: peak "
              f"{r['peak_kb'] / 1024:7.1f} MiB (+{(r['peak_kb'] - r['before_kb']) / 1024:6.1f} over the loaded "
              f"process), {r['seconds']:6.1f} s")
    for m in banks:
        a, b = results[m, queries[0]], results[m, queries[1]]
        print(f"    bank {m}: {queries[1] // queries[0]}× the queries → peak × {b['peak_kb'] / a['peak_kb']:.2f}")
    for q in queries:
        a, b = results[banks[0], q], results[banks[1], q]
        growth = (b["peak_kb"] - a["peak_kb"]) / 1024
        bank_growth = (b["bank_bytes"] - a["bank_bytes"]) / 2**20
        print(f"    {q} queries: bank + {bank_growth:.0f} MiB → peak + {growth:.1f} MiB "
              f"(ratio {growth / max(bank_growth, 1e-9):.2f}; 1 would mean the whole bank is resident)")


if __name__ == "__main__":
    main()
