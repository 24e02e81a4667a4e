"""`ssl-segbench sweep`: a grid through local processes and through a real one-node Slurm cluster (started here,
submitit as the engine): the same records either way, only missing cells rerun, failed cells named with their logs."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from slurm_cluster import ensure_packages, start, stop

from ssl_segbench.cli import main
from ssl_segbench.leaderboard import load_published
from ssl_segbench.records import iter_records
from ssl_segbench.sweep import SweepError, load_sweep, status

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grid_data(tmp_path_factory):
    from ssl_segbench.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("grid")
    return [generate_synthetic(root / f"syn{k}", n_train=4, n_test=4, seed=k) for k in (1, 2)]


def _sweep_file(path: Path, data, results: Path, backbones=("pixels", "random_vits16")) -> Path:
    doc = {"results_dir": str(results), "backbones": list(backbones),
           "datasets": {f"syn{k}": {"dataset": "synthetic", "data_root": str(d)} for k, d in enumerate(data)},
           "protocols": ["kmeans"], "run": {"size": 32, "seeds": 2},
           "slurm": {"partition": "debug", "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 10}}
    path.write_text(yaml.safe_dump(doc))
    return path


def _metrics(results: Path) -> dict:
    return {(r.identity["backbone"], r.identity["content_sha256"]): r.per_seed for _, r in iter_records(results)}


def test_local_sweep_runs_missing_cells_only_and_status_names_a_failed_cell(grid_data, tmp_path, capsys):
    f = _sweep_file(tmp_path / "grid.yaml", grid_data, tmp_path / "res", ("pixels", "random_vits16", "no_such"))
    assert main(["sweep", str(f), "--workers", "2"]) == 1  # the unknown backbone's cells fail
    out = capsys.readouterr().err
    assert "running 6 cell(s) of 6 with the local executor" in out and "no_such__syn0: FAILED" in out
    assert len(_metrics(tmp_path / "res")) == 4
    rows = {name: (state, detail) for name, state, detail in status(load_sweep(f))}
    assert rows["pixels__syn0"][0] == "done"
    # a cell that cannot even be planned is an error row; its log is where the run said why
    assert rows["no_such__syn1"][0] == "error" and "unknown backbone 'no_such'" in rows["no_such__syn1"][1]
    assert main(["sweep", "status", str(f)]) == 1
    assert "no_such__syn0" in capsys.readouterr().out
    log = (tmp_path / "res" / ".sweeps" / "grid" / "logs" / "no_such__syn0.log").read_text()
    assert "unknown backbone 'no_such'" in log
    # rerun: the four finished cells are skipped, only the failing ones run again
    assert main(["sweep", str(f)]) == 1
    assert "running 2 cell(s) of 6" in capsys.readouterr().err


def test_sweep_files_are_checked(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbones: [pixels]\ndatasets: {synthetic: {root: x}}\nprotocols: [kmeans]\n")
    with pytest.raises(SweepError, match=r"datasets.synthetic: unknown key\(s\) \['root'\]"):
        load_sweep(bad)
    bad.write_text("backbones: [pixels]\ndatasets: [{synthetic: {}}]\nprotocols: [kmeans]\n")
    with pytest.raises(SweepError, match="datasets must be a mapping"):
        load_sweep(bad)
    bad.write_text("backbones: [pixels]\ndatasets: {synthetic: {}}\nprotocols: [kmeans]\nexecutor: {kind: pbs}\n")
    with pytest.raises(SweepError, match="executor.kind must be one of"):
        load_sweep(bad)


def test_the_published_sweep_covers_every_exact_published_number():
    sweep = load_sweep(ROOT / "benchmarks" / "sweeps" / "published.yaml")
    cells = {(c.backbone, c.argv[c.argv.index("--dataset") + 1]): c.argv[c.argv.index("--protocol") + 1].split(",")
             for c in sweep.cells}
    exact = [e for e in load_published() if e["compare"] == "exact"]
    assert exact
    for e in exact:
        protocols = cells[(e["backbone"], e["dataset"])]
        spec = e["protocol"]["name"] + (f":{e['protocol']['preset']}" if e["protocol"].get("preset") else "")
        assert spec in protocols or f"{e['protocol']['name']}:hummingbird" in protocols, e


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = ensure_packages()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have Slurm: {why} (.ci/run installs slurm-wlm and munge)")
        pytest.skip(why)
    root = Path("/tmp") / f"ssl-segbench-slurm-{os.getpid()}"  # short: Slurm's socket paths have a length limit
    env = start(root)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]
    yield env
    stop(root)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def _queue() -> list[tuple[str, str]]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, check=True).stdout
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]


def test_slurm_sweep_equals_local_and_reruns_only_a_killed_cell(slurm, grid_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache-local"))
    local = _sweep_file(tmp_path / "local.yaml", grid_data, tmp_path / "res-local")
    assert main(["sweep", str(local), "--workers", "2"]) == 0
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache-slurm"))
    grid = _sweep_file(tmp_path / "slurm.yaml", grid_data, tmp_path / "res-slurm")
    assert main(["sweep", str(grid), "--executor", "slurm"]) == 0
    assert _metrics(tmp_path / "res-slurm") == _metrics(tmp_path / "res-local") and len(_metrics(tmp_path /
                                                                                               "res-local")) == 4

    # a second grid, one of its jobs cancelled while it runs
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache-kill"))
    kill = _sweep_file(tmp_path / "kill.yaml", grid_data, tmp_path / "res-kill")
    assert main(["sweep", str(kill), "--executor", "slurm", "--no-wait"]) == 0
    sweep = load_sweep(kill)
    jobs = {v["job_id"]: k for k, v in sweep.state().items()}
    deadline, victim = time.monotonic() + 60, None
    while time.monotonic() < deadline and victim is None:
        running = [j for j, st in _queue() if st == "RUNNING" and j in jobs]
        if running:
            victim = running[0]
            subprocess.run(["scancel", "--signal=KILL", "--full", victim], check=True)
        time.sleep(0.05)
    assert victim, "no job of the sweep was seen running"
    while any(j in jobs for j, _ in _queue()) and time.monotonic() < deadline + 120:
        time.sleep(0.2)
    rows = {name: (state, detail) for name, state, detail in status(sweep)}
    cell = jobs[victim]
    assert rows[cell][0] == "failed" and sweep.state()[cell]["log"] in rows[cell][1]
    assert sum(state == "done" for state, _ in rows.values()) == 3
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "res-kill").rglob("*.json") if ".sweeps" not in str(p)}
    capsys.readouterr()
    assert main(["sweep", str(kill), "--executor", "slurm"]) == 0
    assert "running 1 cell(s) of 4" in capsys.readouterr().err
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "res-kill").rglob("*.json") if ".sweeps" not in str(p)}
    assert {p: t for p, t in after.items() if p in before} == before  # the three finished cells were not rerun
    assert len(after) == 4 and _metrics(tmp_path / "res-kill") == _metrics(tmp_path / "res-local")
