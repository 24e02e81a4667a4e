"""A run killed mid-extraction resumes from its checkpoint with identical numbers; concurrent runs corrupt nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ssl_segbench.records import Record, iter_records


def _cmd(data, results, *extra):
    return [sys.executable, "-m", "ssl_segbench", "run", "--backbone", "random_vits16", "--dataset", "synthetic",
            "--data-root", str(data), "--size", "64", "--batch-size", "1", "--protocol", "kmeans", "--seeds", "2",
            "--results-dir", str(results), *extra]


def _env(cache, **extra):
    return {**os.environ, "SSL_SEGBENCH_CACHE": str(cache), "SSL_SEGBENCH_CHECKPOINT_SECONDS": "0", **extra}


@pytest.mark.slow
def test_killed_mid_extraction_resumes_with_identical_numbers(small_synthetic, tmp_path):
    # uninterrupted reference
    subprocess.run(_cmd(small_synthetic, tmp_path / "ref-res"), env=_env(tmp_path / "ref-cache"), check=True,
                   capture_output=True)
    # a run that is killed (SIGKILL: no cleanup of any kind) once some images are checkpointed
    proc = subprocess.Popen(_cmd(small_synthetic, tmp_path / "res"), env=_env(tmp_path / "cache"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        for prog in (tmp_path / "cache").rglob("features/**/progress.json"):
            try:
                done = json.loads(prog.read_text())["done"]
            except (OSError, ValueError):
                continue
        if 0 < done:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make the dataset larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "res").rglob("*.json")), "no record may exist after a kill during extraction"
    subprocess.run(_cmd(small_synthetic, tmp_path / "res"), env=_env(tmp_path / "cache"), check=True,
                   capture_output=True)
    (_, ref), = iter_records(tmp_path / "ref-res")
    (_, rec), = iter_records(tmp_path / "res")
    assert rec.per_seed == ref.per_seed and rec.metrics == ref.metrics
    metas = [json.loads(m.read_text()) for m in (tmp_path / "cache").rglob("features/**/meta.json")]
    assert any(m["resumed_from"] > 0 for m in metas), "the rerun should have resumed, not started over"


@pytest.mark.slow
def test_concurrent_runs_and_leaderboards_leave_valid_files(small_synthetic, tmp_path):
    env = _env(tmp_path / "cache", SSL_SEGBENCH_CHECKPOINT_SECONDS="20")
    runs = [subprocess.Popen(_cmd(small_synthetic, tmp_path / "res", "--overwrite", "always"), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    boards = []
    for _ in range(2):
        boards.append(subprocess.Popen([sys.executable, "-m", "ssl_segbench", "leaderboard", "--results-dir",
                                        str(tmp_path / "res"), "--out", str(tmp_path / "lb")], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for p in runs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    for p in boards:
        p.wait(timeout=120)
    recs = list(iter_records(tmp_path / "res"))
    assert len(recs) == 1 and isinstance(recs[0][1], Record)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".partial")]
    assert len(list((tmp_path / "cache").rglob("features/**/meta.json"))) == 1  # extracted once, not twice
    last = subprocess.run([sys.executable, "-m", "ssl_segbench", "leaderboard", "--results-dir", str(tmp_path / "res"),
                           "--out", str(tmp_path / "lb")], env=env, capture_output=True)
    assert last.returncode == 0 and "random_vits16" in (tmp_path / "lb" / "synthetic.md").read_text()


def _crop_cmd(data, results, protocol):
    return [sys.executable, "-m", "ssl_segbench", "run", "--backbone", "random_vits16", "--dataset", "synthetic",
            "--data-root", str(data), "--size", "64", "--batch-size", "1", "--protocol", protocol, "--seeds", "1",
            "--results-dir", str(results), *{"datus": ["--param", "datus.k=4", "--param", "datus.tau=0"],
                                             "retrieval": ["--param", "retrieval.augment=3"],
                                             "stego": [a for q in ("size=64", "train_res=32", "steps=2",
                                                                   "feature_samples=3", "knn_top=10")
                                                       for a in ("--param", f"stego.{q}")]}.get(protocol, [])]


def _crop_passes(results):
    (_, rec), = iter_records(results)
    return [p for p in rec.provenance["passes"] if p["kind"] != "features"], rec


@pytest.fixture(scope="module")
def crop_data(tmp_path_factory):
    from ssl_segbench.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("crops") / "synthetic", n_train=20, n_test=30, seed=4)


@pytest.mark.slow
@pytest.mark.parametrize("protocol, entries", [("datus", "datus"), ("maskdistill", "pseudo/maskdistill-embeddings"),
                                               ("retrieval", "retrieval"), ("stego", "stego")])
def test_a_run_killed_while_embedding_crops_resumes_from_its_entry(crop_data, tmp_path, protocol, entries):
    subprocess.run(_crop_cmd(crop_data, tmp_path / "ref-res", protocol), env=_env(tmp_path / "ref-cache"), check=True,
                   capture_output=True)
    proc = subprocess.Popen(_crop_cmd(crop_data, tmp_path / "res", protocol), env=_env(tmp_path / "cache"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, done = time.monotonic() + 300, 0
    while time.monotonic() < deadline and proc.poll() is None and not done:
        for prog in (tmp_path / "cache").glob(f"{entries}/**/*.partial/progress.json"):
            try:
                done = json.loads(prog.read_text())["done"]
            except (OSError, ValueError):
                continue
        time.sleep(0.02)
    assert proc.poll() is None and done, "the crop pass finished before it could be killed; use more images"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "res").rglob("*.json"))
    subprocess.run(_crop_cmd(crop_data, tmp_path / "res", protocol), env=_env(tmp_path / "cache"), check=True,
                   capture_output=True)
    (_, ref), = iter_records(tmp_path / "ref-res")
    passes, rec = _crop_passes(tmp_path / "res")
    assert rec.per_seed == ref.per_seed and all(p["computed"] for p in passes)
    metas = [json.loads(m.read_text()) for m in (tmp_path / "cache").glob(f"{entries}/**/meta.json")]
    assert any(m["resumed_from"] > 0 for m in metas), "the rerun should have resumed the crop entry"


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["datus", "maskdistill"])
def test_two_concurrent_runs_embed_each_crop_entry_once(crop_data, tmp_path, protocol):
    env = _env(tmp_path / "cache", SSL_SEGBENCH_CHECKPOINT_SECONDS="20")
    runs = [subprocess.Popen(_crop_cmd(crop_data, tmp_path / f"res{k}", protocol), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for k in range(2)]
    for p in runs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
    computed = [p["computed"] for k in range(2) for p in _crop_passes(tmp_path / f"res{k}")[0]
                if "embeddings" in p["kind"]]
    assert computed and computed.count(True) == computed.count(False)  # per entry: one run computed, one waited
    assert _crop_passes(tmp_path / "res0")[1].per_seed == _crop_passes(tmp_path / "res1")[1].per_seed
