"""`make demo` gives the same bytes on every machine: the same record numbers whatever the thread count (k-means in
this process under 1 and 2 threads; a whole run of one demo backbone in subprocesses under OMP_NUM_THREADS=1 and 2),
leaderboard pages that show no run details (time, git sha, cache state), and figures without metadata; the demo writes
its leaderboard to an ignored folder, never into the committed leaderboards/."""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from ssl_segbench import cluster
from ssl_segbench.atomic import write_json_atomic
from ssl_segbench.cli import main
from ssl_segbench.cluster import Preprocess, assign, kmeans
from ssl_segbench.protocols.kmeans import KMeansProtocol
from ssl_segbench.records import iter_records

ROOT = Path(__file__).resolve().parents[1]
THREADS = (1, 2)


def _blobs(n: int = 12_000, d: int = 96, k: int = 8, seed: int = 0) -> np.ndarray:
    """Overlapping Gaussian clusters: enough rows that faiss and torch split the work between threads, and enough
    overlap that points near a boundary flip cluster when a distance changes in its last bits."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)).astype(np.float32)
    return (centres[rng.integers(0, k, n)] + 1.5 * rng.normal(size=(n, d))).astype(np.float32)


def _demo_kmeans(x: np.ndarray, threads: int) -> tuple[bytes, bytes]:
    """The demo's k-means (the kmeans protocol's defaults: L2-normalised rows, spherical, 100 iterations, best of 5
    restarts, faiss on the CPU) and the nearest-centroid labels, fitted with both libraries set to `threads`."""
    p = KMeansProtocol.all_defaults()
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    try:
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (threads, threads)
        y = Preprocess.fit(x, p["standardize"], p["pca_dim"], p["l2_normalize"])(x)
        c = kmeans(y, 8, 0, p["niter"], p["nredo"], p["spherical"], p["max_points_per_centroid"], "faiss")
        return c.tobytes(), assign(y, c, p["spherical"]).astype(np.int64).tobytes()
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


def test_demo_kmeans_gives_the_same_bytes_under_1_and_2_threads(monkeypatch):
    monkeypatch.setattr(cluster, "ONE_THREAD_WORK", 0)  # the thread policy off: faiss really runs on 2 threads
    x = _blobs()
    (c1, l1), (c2, l2) = (_demo_kmeans(x, t) for t in THREADS)
    assert c1 == c2 and l1 == l2
    # the comparison sees a change: another restart seed moves the centroids
    p = KMeansProtocol.all_defaults()
    y = Preprocess.fit(x, False, None, True)(x)
    assert kmeans(y, 8, 1, p["niter"], p["nredo"], True, None, "faiss").tobytes() != c1


_RUN = """
import sys, faiss, torch
n = int(sys.argv[1])
assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (n, n), (torch.get_num_threads(), n)
from ssl_segbench.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def demo_runs(small_synthetic, tmp_path_factory):
    """One demo backbone (random_vits16: a real ViT forward pass) through kmeans, linear and retrieval at --size 64,
    run in a fresh process per thread count, each with its own feature cache: {threads: results folder}."""
    out = {}
    for n in THREADS:
        root = tmp_path_factory.mktemp(f"threads{n}")
        env = dict(os.environ, OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n), HF_HUB_OFFLINE="1",
                   SSL_SEGBENCH_CACHE=str(root / "cache"), PYTHONPATH=str(ROOT))
        args = ["run", "--backbone", "random_vits16", "--dataset", "synthetic", "--data-root", str(small_synthetic),
                "--protocol", "kmeans,linear,retrieval", "--size", "64", "--seeds", "1",
                "--param", "linear.epochs=3", "--results-dir", str(root / "res")]
        proc = subprocess.run([sys.executable, "-c", _RUN, str(n), *args], env=env, cwd=root, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[n] = root / "res"
    return out


def _numbers(res: Path) -> dict[str, str]:
    """record key → its numbers (metrics, per-seed values, confusion matrices, protocol info) as canonical JSON."""
    return {r.key: json.dumps({"metrics": r.metrics, "per_seed": r.per_seed, "info": r.info,
                               "confusions": r.to_json().get("confusions")}, sort_keys=True)
            for _, r in iter_records(res)}


def test_demo_run_gives_the_same_records_under_1_and_2_threads(demo_runs):
    one, two = (_numbers(demo_runs[n]) for n in THREADS)
    assert len(one) == 3 and one.keys() == two.keys()
    for key in one:
        assert one[key] == two[key], key


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_leaderboard_bytes_do_not_depend_on_run_details(demo_runs, tmp_path):
    """Run details differ on every run (and a dirty checkout's sha ends in -dirty): they stay in the records, but
    markdown, plots and site are the same bytes whatever they are; a changed number does change the pages."""
    res = demo_runs[1]
    assert main(["leaderboard", "--results-dir", str(res), "--out", str(tmp_path / "a"), "--plots"]) == 0
    changed = tmp_path / "res"
    for path, rec in iter_records(res):
        obj = rec.to_json()
        obj["provenance"] = dict(obj["provenance"], started="2001-01-01T00:00:00+0000", wall_seconds=12345.678,
                                 git_sha="0123456789abcdef0123456789abcdef01234567-dirty",
                                 cache_hit=not obj["provenance"]["cache_hit"], shared_feature_pass_seconds=99.0)
        write_json_atomic(changed / path.relative_to(res), obj)
    assert main(["leaderboard", "--results-dir", str(changed), "--out", str(tmp_path / "b"), "--plots"]) == 0
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert any(name.startswith("site/records/") for name in a) and a == b
    assert not any(b"-dirty" in blob or b"12345.678" in blob for blob in b.values())
    # the comparison sees a change in the numbers
    path, rec = next((p, r) for p, r in iter_records(changed) if r.protocol["name"] == "linear")
    obj = rec.to_json()
    for m in ("miou", "mf1", "pixel_acc"):  # every value halved: mean, per-seed values, std and interval agree
        obj["metrics"][m] = {name: [v / 2 for v in value] if isinstance(value, list) else value / 2
                             for name, value in obj["metrics"][m].items()}
    write_json_atomic(path, obj)
    assert main(["leaderboard", "--results-dir", str(changed), "--out", str(tmp_path / "c"), "--plots"]) == 0
    assert _files(tmp_path / "c")[f"site/records/{rec.key}.html"] != a[f"site/records/{rec.key}.html"]


def _png_chunks(blob: bytes) -> list[str]:
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    out, i = [], 8
    while i < len(blob):
        (n,) = struct.unpack(">I", blob[i: i + 4])
        out.append(blob[i + 4: i + 8].decode("ascii"))
        i += 12 + n
    return out


def test_show_figure_is_the_same_bytes_and_carries_no_metadata(small_synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    blobs = []
    for name in ("a.png", "b.png"):
        assert main(["show", "--backbone", "pixels", "--dataset", "synthetic", "--data-root", str(small_synthetic),
                     "--protocol", "kmeans", "--size", "64", "-n", "2", "--out", str(tmp_path / name)]) == 0
        blobs.append((tmp_path / name).read_bytes())
    assert blobs[0] == blobs[1]
    assert set(_png_chunks(blobs[0])) == {"IHDR", "IDAT", "IEND"}  # no tEXt/tIME/eXIf/pHYs: nothing machine-made


def test_make_demo_writes_its_leaderboard_to_an_ignored_folder():
    """The demo target's writes (records, figures, leaderboard) all go to folders git ignores; only the deliberate
    `make leaderboards` target writes the committed leaderboards/."""
    text = subprocess.run(["make", "-n", "-B", "demo", "leaderboards", "VENV=/nonexistent"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    demo, _, refresh = text.partition("mkdir -p leaderboards/figures")
    targets = re.findall(r"--(?:results-dir|out) (\S+)", demo)
    assert targets and not any(t.startswith("leaderboards") for t in targets)
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *targets], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert sorted(ignored) == sorted(targets)
    assert "--out leaderboards --plots" in refresh
