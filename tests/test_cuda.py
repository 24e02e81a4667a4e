"""CUDA paths against their CPU references. These run where a GPU is (`make gpu-check` on a lent machine) and are
skipped elsewhere; nothing else in the suite needs a GPU, and no CPU-side test counts on these."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from stores import feature_set

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _planted(rng, n=6, k=5, dim=12):
    """Tokens near k well separated centres (no near-ties for any argmax), label maps 4× the token grid."""
    centres = rng.normal(size=(k, dim)).astype(np.float32) * 3
    tokens, labels = [], []
    for _ in range(n):
        g = rng.integers(0, k, size=(6, 8))
        tokens.append(centres[g] + 0.05 * rng.normal(size=(6, 8, dim)).astype(np.float32))
        labels.append(np.kron(g, np.ones((4, 4), dtype=np.int64)))
    return tokens, labels, centres


@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
def test_prediction_on_the_gpu_equals_the_cpu(tmp_path, upsample):
    from ssl_segbench.cluster import centroid_scores
    from ssl_segbench.protocols.base import Predictions, Scoring, count_confusions

    rng = np.random.default_rng(0)
    tokens, labels, centres = _planted(rng)
    fs = feature_set(tmp_path / "fs", tokens, labels)
    fn = centroid_scores(centres, spherical=False)
    out = {dev: count_confusions(Predictions(fs["tokens"], fs.labels, [fn], 5, upsample, None, Scoring(device=dev)),
                                 5, 255)[0] for dev in ("cpu", "cuda")}
    np.testing.assert_array_equal(out["cpu"][0], out["cuda"][0])


@pytest.mark.parametrize("spherical", [False, True])
def test_torch_kmeans_on_the_gpu_finds_what_it_finds_on_the_cpu(spherical):
    from ssl_segbench.cluster import assign, torch_kmeans

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16)) * 3
    truth = np.repeat(np.arange(4), 500)
    x = (centres[truth] + 0.1 * rng.normal(size=(2000, 16))).astype(np.float32)
    if spherical:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    cpu = torch_kmeans(x, 4, 0, niter=20, nredo=10, spherical=spherical, max_points_per_centroid=None)
    gpu = torch_kmeans(x, 4, 0, niter=20, nredo=10, spherical=spherical, max_points_per_centroid=None, device="cuda")
    np.testing.assert_array_equal(assign(x, cpu, spherical), assign(x, gpu, spherical))
    np.testing.assert_allclose(cpu, gpu, atol=1e-4)
    again = torch_kmeans(x, 4, 0, niter=20, nredo=10, spherical=spherical, max_points_per_centroid=None,
                         device="cuda")
    np.testing.assert_array_equal(gpu, again)  # deterministic on the GPU too


def test_auto_backend_on_the_gpu():
    import faiss

    from ssl_segbench.cluster import kmeans_backend

    assert kmeans_backend("auto", "cuda") == ("faiss" if faiss.get_num_gpus() > 0 else "torch")


def test_bf16_features_on_the_gpu_are_close_to_fp32_on_the_cpu(small_synthetic, tmp_path):
    from ssl_segbench.backbones import BackboneRef
    from ssl_segbench.data import get_dataset
    from ssl_segbench.features import extract, loader_workers
    from ssl_segbench.transforms import Transform

    ds = get_dataset("synthetic", small_synthetic, "test")
    ref = BackboneRef("random_vits16")
    t = Transform("shorter", 224, 16)
    cpu = extract(ref, ds, t, facets=("tokens", "keys"), device="cpu", root=tmp_path / "c")
    gpu = extract(ref, ds, t, facets=("tokens", "keys"), device="cuda", batch_size=4,
                  num_workers=loader_workers("cuda"), root=tmp_path / "g")
    assert cpu["tokens"].meta["key"]["precision"] == "fp32"
    assert gpu["tokens"].meta["key"]["precision"] == "bf16-autocast"
    for facet in ("tokens", "keys"):
        a = np.asarray(cpu[facet].data, dtype=np.float32)
        b = np.asarray(gpu[facet].data, dtype=np.float32)
        assert a.shape == b.shape and np.isfinite(b).all()
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cos.mean() > 0.99 and cos.min() > 0.9
    np.testing.assert_array_equal(np.asarray(cpu.labels.data), np.asarray(gpu.labels.data))


def test_a_run_on_the_gpu_records_what_ran(small_synthetic, tmp_path):
    """kmeans + linear on the GPU: the record names device, precision and k-means backend, and its numbers stay near
    the CPU run's (bf16 features and GPU arithmetic move them a little, not a lot)."""
    from ssl_segbench.cli import main
    from ssl_segbench.records import iter_records

    for dev in ("cpu", "cuda"):
        assert main(["run", "--backbone", "random_vits16", "--dataset", "synthetic", "--data-root",
                     str(small_synthetic), "--protocol", "kmeans,linear", "--seeds", "0,1", "--device", dev,
                     "--results-dir", str(tmp_path / dev)]) == 0
    recs = {dev: {r.protocol["name"]: r for _, r in iter_records(tmp_path / dev)} for dev in ("cpu", "cuda")}
    g = recs["cuda"]["kmeans"]
    assert g.provenance["device"] == "cuda" and g.provenance["compute_precision"] == "bf16-autocast"
    assert g.protocol["params"]["kmeans_backend"] in ("faiss", "torch")
    for name in ("kmeans", "linear"):
        a, b = recs["cpu"][name].metrics["miou"]["mean"], recs["cuda"][name].metrics["miou"]["mean"]
        assert abs(a - b) < 0.05, (name, a, b)


def test_fs4_on_the_gpu_recovers_the_planted_scene_and_repeats_itself(tmp_path):
    """fs4's self-training on CUDA (one-hot segment sums, no atomic adds): the planted scene of tests/test_fs4.py is
    recovered as on the CPU, and two runs give identical records."""
    from test_fs4 import _ctx

    from ssl_segbench.protocols import get_protocol

    def run(name, device):
        ctx = _ctx(tmp_path / name, [0, 1])
        ctx.device = device
        return get_protocol("fs4").for_device(device).run(ctx)

    cpu, gpu, again = run("cpu", "cpu"), run("gpu", "cuda"), run("again", "cuda")
    assert gpu.per_seed == again.per_seed
    for c, g in zip(cpu.per_seed, gpu.per_seed):
        assert g["miou"] >= 0.99 and abs(g["miou"] - c["miou"]) < 0.01


def test_exact_retrieval_search_on_the_gpu_finds_the_cpu_neighbours():
    from ssl_segbench.knn import exact_search

    rng = np.random.default_rng(3)
    bank = rng.normal(size=(5000, 32)).astype(np.float16)
    q = rng.normal(size=(300, 32)).astype(np.float32)
    s_cpu, i_cpu = exact_search(q, bank, 10, "cpu", bank_rows=1024)
    s_gpu, i_gpu = exact_search(q, torch.from_numpy(bank).cuda(), 10, "cuda", bank_rows=1024)
    np.testing.assert_allclose(s_gpu, s_cpu, rtol=1e-4, atol=1e-4)
    assert (i_gpu == i_cpu).mean() > 0.99  # only near-equal similarities may swap
