"""k-nearest neighbours by inner product over a memory bank that may be far larger than RAM: exact search reads the
(memory-mapped) bank in chunks and keeps a running top-k, so peak memory depends on the chunk sizes, never on the
bank or on the number of queries (faiss on the CPU, a torch matrix product on a GPU); approximate faiss indexes (IVF,
HNSW) for banks too large to scan, recorded as a parameter because they change the neighbours."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .cache import release_pages
from .cluster import faiss_threads
from .errors import SegbenchError
from .faiss_blas import faiss

INDEXES = ("exact", "ivf", "hnsw")
BANK_ROWS = 1 << 16  # bank rows read (and converted to float32) at a time
QUERY_ROWS = 4096  # queries per matrix product on the GPU path


def merge_topk(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, m) candidate similarities and bank rows → the k best per query, ordered by similarity, then by bank row
    (so equal similarities always resolve the same way, whatever the chunking)."""
    order = np.lexsort((idx, -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)


def exact_search(queries: np.ndarray, bank, k: int, device: str = "cpu",
                 bank_rows: int = BANK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(Q, D) queries against the (M, D) rows of `bank` (any array, e.g. a float16 memory map, or a torch tensor
    already on `device`): the (Q, k) largest inner products and their rows, best first. The bank is read `bank_rows`
    at a time; on CUDA the products run on the GPU, `QUERY_ROWS` queries at a time."""
    m = len(bank)
    if m == 0:
        raise SegbenchError("nearest-neighbour search over an empty memory bank")
    if k > m:  # never fewer neighbours than asked, silently
        raise SegbenchError(f"nearest-neighbour search for k={k} over a memory bank of {m} rows: use k <= {m}")
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    on_gpu = str(device).startswith("cuda")
    faiss_gpu = on_gpu and not isinstance(bank, torch.Tensor) and faiss.get_num_gpus() > 0
    qt = torch.from_numpy(q).to(device) if on_gpu and not faiss_gpu else None
    for start in range(0, m, bank_rows):
        if faiss_gpu:  # a GPU build of faiss: its own brute-force kernel on the chunk
            block = np.ascontiguousarray(bank[start: start + bank_rows], dtype=np.float32)
            s_blk, i_blk = faiss.knn_gpu(_gpu_resources(), q, block, min(k, len(block)),
                                         metric=faiss.METRIC_INNER_PRODUCT, device=_gpu_index(device))
        elif on_gpu:
            block = bank[start: start + bank_rows]
            bt = (block if isinstance(block, torch.Tensor) else torch.from_numpy(np.asarray(block))).to(device)
            bt = bt.float()
            kk = min(k, len(bt))
            parts = [torch.topk(qt[s: s + QUERY_ROWS] @ bt.T, kk, dim=1) for s in range(0, len(q), QUERY_ROWS)]
            s_blk = torch.cat([t.values for t in parts]).cpu().numpy()
            i_blk = torch.cat([t.indices for t in parts]).cpu().numpy()
        else:
            block = np.ascontiguousarray(bank[start: start + bank_rows], dtype=np.float32)
            s_blk, i_blk = faiss.knn(q, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        best_s, best_i = merge_topk(np.concatenate([best_s, s_blk], 1),
                                    np.concatenate([best_i, i_blk.astype(np.int64) + start], 1), k)
        if isinstance(bank, np.ndarray):
            release_pages(bank)
    return best_s, best_i


_GPU_RESOURCES = []


def _gpu_resources():
    """One faiss StandardGpuResources per process (GPU builds of faiss only)."""
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    return _GPU_RESOURCES[0]


def _gpu_index(device: str) -> int:
    """'cuda' → 0, 'cuda:N' → N."""
    return int(str(device).partition(":")[2] or 0)


def gpu_backend(device: str) -> str:
    """Which exact search runs on `device`: 'faiss-gpu' with a GPU build of faiss, else 'torch' (CUDA) or 'faiss'."""
    if not str(device).startswith("cuda"):
        return "faiss"
    return "faiss-gpu" if faiss.get_num_gpus() > 0 else "torch"


@dataclass
class ApproximateIndex:
    """A faiss IVF-flat or HNSW-flat inner-product index over the whole bank (held in RAM: the index stores the
    vectors). IVF trains its `lists` centroids on a seeded sample of at most 256 rows per list and searches `probe`
    of them; HNSW links `m` neighbours per node and searches with breadth `ef`."""

    kind: str
    lists: int = 1024
    probe: int = 32
    m: int = 32
    ef: int = 128
    seed: int = 0

    def build(self, bank) -> "faiss.Index":
        n, d = bank.shape
        if self.kind == "ivf":
            lists = self.lists
            if lists > n:  # never fewer lists than asked, silently
                raise SegbenchError(f"an IVF index of {lists} lists over a memory bank of {n} rows: use at most {n}")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(self.seed)
            sample = np.sort(rng.choice(n, size=min(n, 256 * lists), replace=False))
            index.cp.seed = self.seed
            index.cp.min_points_per_centroid = 1  # only silences faiss's raw stderr warning (as cluster.kmeans)
            index.train(np.ascontiguousarray(bank[sample], dtype=np.float32))
            index.nprobe = self.probe
        elif self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, self.m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = self.ef
        else:
            raise SegbenchError(f"approximate index must be 'ivf' or 'hnsw', got {self.kind!r}")
        # a multithreaded HNSW insert links nodes in a racy order: one thread, one graph
        with faiss_threads(1 if self.kind == "hnsw" else None):
            for start in range(0, n, BANK_ROWS):
                index.add(np.ascontiguousarray(bank[start: start + BANK_ROWS], dtype=np.float32))
        return index


def approximate_search(index: "faiss.Index", queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) similarities and rows from a built approximate index, best first (rows −1 where it found fewer)."""
    s, i = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))
    return merge_topk(s, i.astype(np.int64), k)
