"""Data-parallel extraction under torchrun (gloo, CPU): the same cache bytes and record metrics as one process, and a
killed rank fails the job, whose rerun resumes every shard from its checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssl_segbench.records import iter_records

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return {**env, "SSL_SEGBENCH_CACHE": str(cache), "OMP_NUM_THREADS": "1", **extra}


def _args(data: Path, results: Path, *extra) -> list[str]:
    return ["run", "--backbone", "random_vits16", "--dataset", "synthetic", "--data-root", str(data), "--size", "64",
            "--protocol", "kmeans,linear", "--param", "linear.epochs=2", "--seeds", "2", "--results-dir", str(results),
            *extra]


def _torchrun(n: int) -> list[str]:
    return [str(TORCHRUN), "--nproc-per-node", str(n), "--master-port", str(29500 + os.getpid() % 1000), "-m",
            "ssl_segbench"]


def _cache_arrays(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*.npy"))}


def _records(results: Path) -> dict:
    return {r.protocol["name"]: r for _, r in iter_records(results)}


@pytest.fixture(scope="module")
def one_process(small_synthetic, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    subprocess.run([sys.executable, "-m", "ssl_segbench", *_args(small_synthetic, tmp / "res")],
                   env=_env(tmp / "cache"), check=True, capture_output=True)
    return _cache_arrays(tmp / "cache"), _records(tmp / "res")


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_bytes_and_numbers_of_one_process(small_synthetic, tmp_path, one_process):
    cache, recs = one_process
    proc = subprocess.run([*_torchrun(2), *_args(small_synthetic, tmp_path / "res")], env=_env(tmp_path / "cache"),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1/2: images 4-7" in proc.stderr  # each rank extracted its own shard
    assert _cache_arrays(tmp_path / "cache") == cache  # tokens, labels and their indexes, byte for byte
    ddp = _records(tmp_path / "res")
    for name in ("kmeans", "linear"):
        assert ddp[name].per_seed == recs[name].per_seed and ddp[name].confusions == recs[name].confusions
        assert ddp[name].provenance["extraction_ranks"] == 2 and recs[name].provenance["extraction_ranks"] == 1
    metas = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("features/**/meta.json")]
    assert metas and all(m["world_size"] == 2 for m in metas)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_a_killed_rank_fails_the_job_and_the_rerun_resumes_its_shard(crop_like_data, tmp_path):
    """Rank 1 is SIGKILLed once it has checkpointed part of its shard: torchrun stops the job with an error; the rerun
    resumes from the checkpointed rows and ends with the bytes of an uninterrupted one-process run."""
    data = crop_like_data
    subprocess.run([sys.executable, "-m", "ssl_segbench", *_args(data, tmp_path / "ref-res", "--batch-size", "1")],
                   env=_env(tmp_path / "ref-cache"), check=True, capture_output=True)
    env = _env(tmp_path / "cache", SSL_SEGBENCH_CHECKPOINT_SECONDS="0")
    cmd = [*_torchrun(2), *_args(data, tmp_path / "res", "--batch-size", "1")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, killed = time.monotonic() + 240, False
    while time.monotonic() < deadline and proc.poll() is None and not killed:
        for prog in (tmp_path / "cache").glob("features/**/*.partial/progress.1.json"):
            try:
                done = json.loads(prog.read_text())["done"]
            except (OSError, ValueError):
                continue
            if done > 0:
                workers = _children(proc.pid)
                ranks = {w: (Path(f"/proc/{w}/environ").read_bytes().split(b"\0")) for w in workers}
                rank1 = [w for w, env_ in ranks.items() if b"RANK=1" in env_]
                if rank1:
                    os.kill(rank1[0], signal.SIGKILL)
                    killed = True
                    break
        time.sleep(0.01)
    assert killed, "the extraction finished before rank 1 could be killed; use more images"
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "ssl_segbench" in err  # torchrun names the failed job
    assert not list((tmp_path / "res").rglob("*.json"))
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming at image" in rerun.stderr
    assert _cache_arrays(tmp_path / "cache") == _cache_arrays(tmp_path / "ref-cache")
    assert _records(tmp_path / "res")["kmeans"].per_seed == _records(tmp_path / "ref-res")["kmeans"].per_seed


@pytest.fixture(scope="module")
def crop_like_data(tmp_path_factory):
    from ssl_segbench.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("ddp") / "synthetic", n_train=40, n_test=40, seed=5)


@pytest.mark.slow
def test_a_sweep_cell_with_several_processes_runs_under_torchrun(small_synthetic, tmp_path, monkeypatch):
    from ssl_segbench.sweep import run_cell

    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_cell(["--backbone", "pixels", "--dataset", "synthetic", "--data-root", str(small_synthetic), "--size", "32",
              "--protocol", "kmeans", "--seeds", "1", "--results-dir", str(tmp_path / "res")], nproc_per_node=2)
    (_, rec), = iter_records(tmp_path / "res")
    assert rec.provenance["extraction_ranks"] == 2
