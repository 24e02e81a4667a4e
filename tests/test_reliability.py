"""A run killed mid-extraction resumes from its checkpoint with identical numbers; concurrent runs corrupt nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from ssl_segbench.records import iter_records


def _cmd(data, results, *extra):
    return [sys.executable, "-m", "ssl_segbench", "run", "--backbone", "random_vits16", "--dataset", "synthetic",
            "--data-root", str(data), "--size", "64", "--batch-size", "1", "--protocol", "kmeans", "--seeds", "2",
            "--results-dir", str(results), *extra]


def _env(cache, **extra):
    return {**os.environ, "SSL_SEGBENCH_CACHE": str(cache), "SSL_SEGBENCH_CHECKPOINT_SECONDS": "0", **extra}


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
    assert rec["per_seed"] == ref["per_seed"] and rec["metrics"] == ref["metrics"]
    metas = [json.loads(m.read_text()) for m in (tmp_path / "cache").rglob("features/**/meta.json")]
    assert any(m["resumed_from"] > 0 for m in metas), "the rerun should have resumed, not started over"


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
    assert len(recs) == 1 and isinstance(recs[0][1], dict)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".partial")]
    assert len(list((tmp_path / "cache").rglob("features/**/meta.json"))) == 1  # extracted once, not twice
    last = subprocess.run([sys.executable, "-m", "ssl_segbench", "leaderboard", "--results-dir", str(tmp_path / "res"),
                           "--out", str(tmp_path / "lb")], env=env, capture_output=True)
    assert last.returncode == 0 and "random_vits16" in (tmp_path / "lb" / "synthetic.md").read_text()
