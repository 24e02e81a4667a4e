"""`ssl-segbench sweep`: a grid through local processes and through a real one-node Slurm cluster (started here,
submitit as the engine): the same records either way, only missing cells rerun, failed cells named with their logs."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from slurm_cluster import ensure_packages, start, stop

from ssl_segbench.cli import build_parser, main, run_options
from ssl_segbench.published import load_published
from ssl_segbench.records import iter_records
from ssl_segbench.runner import RunOptions
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


def _damaged_copy(data: Path, where: Path) -> tuple[Path, Path]:
    """A copy of a synthetic dataset with one mask smaller than its image: it passes every check made before a run
    (the run refuses it when it reads the labels), so its cells fail in their jobs."""
    copy = shutil.copytree(data, where)
    mask = sorted((copy / "TEST" / "masks").iterdir())[1]
    Image.open(mask).resize((20, 15), Image.NEAREST).save(mask)
    return copy, mask


@pytest.mark.slow
def test_local_sweep_runs_missing_cells_only_and_status_names_a_failed_cell(grid_data, tmp_path, capsys):
    damaged, mask = _damaged_copy(grid_data[1], tmp_path / "damaged")
    f = _sweep_file(tmp_path / "grid.yaml", [grid_data[0], damaged], tmp_path / "res")
    assert main(["sweep", str(f), "--workers", "2"]) == 1  # the damaged dataset's cells fail
    out = capsys.readouterr().err
    assert "running 4 cell(s) of 4 with the local executor" in out and "pixels__syn1: FAILED" in out
    assert len(_metrics(tmp_path / "res")) == 2
    rows = {name: (state, detail) for name, state, detail in status(load_sweep(f))}
    log = tmp_path / "res" / ".sweeps" / "grid" / "logs" / "pixels__syn1.log"
    assert rows["pixels__syn0"][0] == "done" and rows["random_vits16__syn0"][0] == "done"
    assert rows["pixels__syn1"][0] == "failed" and str(log) in rows["pixels__syn1"][1]
    assert main(["sweep", "status", str(f)]) == 1
    assert "random_vits16__syn1" in capsys.readouterr().out
    assert str(mask) in " ".join(log.read_text().split())  # the log says why
    # rerun: the two finished cells are skipped, only the failing ones run again
    assert main(["sweep", str(f)]) == 1
    assert "running 2 cell(s) of 4" in capsys.readouterr().err


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


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _refused(f: Path, capsys, monkeypatch) -> str:
    """Run the sweep through the CLI; it must be refused (exit 2, no traceback) with nothing started or written."""
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(f.parent / "cache"))
    assert main(["sweep", str(f)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error:") and "Nothing was started or written" in err, err
    assert "started (pid" not in err and "submitted" not in err
    assert not (f.parent / "res").exists(), "state, logs or records were written"
    assert not (f.parent / "cache" / "features").exists() and not (f.parent / "cache" / "labels").exists()
    return err


def test_a_sweep_is_checked_as_a_whole_before_anything_starts(grid_data, tmp_path, capsys, monkeypatch):
    """Every problem of the bug report in one file: one error lists them all, each with its sweep key and cells."""
    ok = {"dataset": "synthetic", "data_root": str(grid_data[0])}
    doc = {"results_dir": str(tmp_path / "res"), "backbones": ["pixels", "no_such", "pixels"],
           "datasets": {"syn": ok, "again": {**ok, "data_root": str(grid_data[0]) + "/"},
                        "gone": {**ok, "data_root": str(tmp_path / "nowhere")},
                        "typo": {"dataset": "synthetc", "data_root": str(grid_data[1])},
                        "own": {**ok, "split": "train", "protocols": ["kmeens"]}},
           "protocols": ["kmeans"], "params": {"kmeans": {"kk": 3}},
           "run": {"size": 0, "seeds": [0, 0], "device": "tpu", "batch_size": 0}}
    err = _refused(_write(tmp_path / "grid.yaml", doc), capsys, monkeypatch)
    for expected in [
            "grid.yaml: 11 problems",
            "- run.seeds (every cell): --seeds 0,0: seed(s) 0 listed more than once",
            "- run.size (every cell): --size 0: the input size must be a positive multiple",
            "- run.device (every cell): --device 'tpu' is not supported: use auto, cpu, cuda or cuda:N",
            "- run.batch_size (every cell): --batch-size 0: images per backbone call must be at least 1",
            "- params (cell pixels__syn, no_such__syn, pixels__again, no_such__again, pixels__gone, no_such__gone, "
            "pixels__typo, no_such__typo): protocol 'kmeans': unknown parameter(s) ['kk']; parameters: [",
            "- backbones (cell pixels__syn, pixels__again, pixels__gone, pixels__typo, pixels__own): 'pixels' is "
            "listed more than once, so its cells would run twice into one log: list each backbone once",
            "- backbones (cell no_such__syn, no_such__again, no_such__gone, no_such__typo, no_such__own): unknown "
            "backbone 'no_such'. Known: ",
            "- datasets.again (cell pixels__again, no_such__again): reads what datasets.syn reads",
            f"- datasets.gone (cell pixels__gone, no_such__gone): dataset root {tmp_path / 'nowhere'} does not exist",
            "- datasets.typo (cell pixels__typo, no_such__typo): unknown dataset 'synthetc'. Did you mean "
            "'synthetic'? Known: ",
            "- datasets.own.protocols (cell pixels__own, no_such__own): unknown protocol 'kmeens'. Did you mean "
            "'kmeans'? Known: "]:
        assert expected in err, (expected, err)


@pytest.mark.parametrize("change, expected", [  # expected: the error after "grid.yaml: "
    ({"datasets": None}, "datasets.syn (cell pixels__syn): dataset root "),
    ({"backbones": ["pixels", "no_such"]}, "backbones (cell no_such__syn): unknown backbone 'no_such'. Known: "),
    ({"backbones": ["./no/such/dir"]}, "backbones (cell _no_such_dir__syn-"),
    ({"protocols": ["kmeans", "linaer"]},
     "protocols (cell pixels__syn): unknown protocol 'linaer'. Did you mean 'linear'? Known: "),
    ({"params": {"kmeans": {"k": "abc"}}}, "params (cell pixels__syn): kmeans: k must be int or null, got 'abc'"),
    ({"params": {"kmean": {"k": 3}}}, "params.kmean: no dataset of this sweep runs protocol 'kmean' (they run: "
                                      "kmeans; known protocols: "),
    ({"backbones": ["pixels", "pixels"]}, "backbones (cell pixels__syn): 'pixels' is listed more than once"),
    ({"run": {"seeds": 0}}, "run.seeds (cell pixels__syn): --seeds 0: a seed count must be at least 1"),
    ({"run": {"seeds": [1, -2]}}, "run.seeds (cell pixels__syn): --seeds 1,-2: seed -2 is negative"),
    ({"run": {"size": 7}}, "run.size (cell pixels__syn): size 7 is not a multiple of the patch size 16: use --size "
                           "16,"),
    ({"run": {"size": "big"}}, "run.size must be an integer, got 'big'"),
    ({"run": {"layer": 99}}, "run.layer (cell pixels__syn): --layer 99 is out of range for backbone 'pixels'"),
    ({"run": {"device": "mps"}}, "run.device (cell pixels__syn): --device 'mps' is not supported: use auto, cpu, "
                                 "cuda or cuda:N"),
    ({"protocols": None}, "datasets.syn has no protocols: give it `protocols: [...]`, or give a top-level "
                          "`protocols` list for every dataset without its own"),
])
def test_each_problem_of_a_sweep_file_is_refused_before_anything_starts(grid_data, tmp_path, capsys, monkeypatch,
                                                                        change, expected):
    doc = {"results_dir": str(tmp_path / "res"), "backbones": ["pixels"], "protocols": ["kmeans"],
           "datasets": {"syn": {"dataset": "synthetic", "data_root": str(grid_data[0])}}, "run": {"size": 32}}
    for key, value in change.items():
        if key == "datasets":  # a root that does not exist
            doc["datasets"]["syn"]["data_root"] = str(tmp_path / "nowhere")
        elif key == "run":
            doc["run"].update(value)
        else:
            doc[key] = value
    f = _write(tmp_path / "grid.yaml", {k: v for k, v in doc.items() if v is not None})
    err = _refused(f, capsys, monkeypatch)
    assert f"grid.yaml: {expected}" in err, err


def test_per_dataset_protocol_lists_alone_are_a_valid_sweep(grid_data, tmp_path, monkeypatch, capsys):
    """No top-level `protocols`: each dataset runs its own list, and shared `params` reach the cells that run their
    protocol only; a one-seed list is that seed (not a count)."""
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    doc = {"results_dir": str(tmp_path / "res"), "backbones": ["pixels"],
           "datasets": {"a": {"dataset": "synthetic", "data_root": str(grid_data[0]), "protocols": ["kmeans"]},
                        "b": {"dataset": "synthetic", "data_root": str(grid_data[1]), "protocols": ["linear"]}},
           "params": {"linear": {"epochs": 2}}, "run": {"size": 32, "seeds": [1]}}
    assert main(["sweep", str(_write(tmp_path / "grid.yaml", doc))]) == 0
    from ssl_segbench.data import get_dataset

    digest = {name: get_dataset("synthetic", d).content_sha256() for name, d in zip("ab", grid_data)}
    got = {(r.identity["content_sha256"], r.protocol["name"]): r for _, r in iter_records(tmp_path / "res")}
    assert set(got) == {(digest["a"], "kmeans"), (digest["b"], "linear")}
    assert got[(digest["b"], "linear")].protocol["params"]["epochs"] == 2 and got[(digest["b"], "linear")].seeds == [1]


def test_checking_a_grid_needs_no_hub(grid_data, tmp_path, monkeypatch):
    """A registry checkpoint the submit node has not cached is still checked (its depth from the registry), with no
    Hub or cache access."""
    import huggingface_hub

    import ssl_segbench.backbones.loader as loader
    from ssl_segbench.sweep import check_cells

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(loader, "resolve_revision", no_hub)  # where a loader pins a Hub revision
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    doc = {"results_dir": str(tmp_path / "res"), "backbones": ["dinov2_vits14", "some-org/some-model"],
           "protocols": ["kmeans"], "datasets": {"syn": {"dataset": "synthetic", "data_root": str(grid_data[0])}},
           "run": {"size": 28, "layer": 11}}
    check_cells(load_sweep(_write(tmp_path / "grid.yaml", doc)), here=True)
    doc["run"]["layer"] = 12
    with pytest.raises(SweepError, match=r"run.layer \(cell dinov2_vits14__syn\): --layer 12 is out of range for "
                                         r"backbone 'dinov2_vits14' with 12 transformer blocks: use -12 to 11"):
        check_cells(load_sweep(_write(tmp_path / "grid.yaml", doc)), here=True)
    assert not (tmp_path / "res").exists()


def test_the_published_sweeps_cover_every_published_number_that_claims_a_setting():
    cells: dict[tuple, list] = {}
    for path in sorted((ROOT / "benchmarks" / "sweeps").glob("published*.yaml")):
        for c in load_sweep(path).cells:
            cells.setdefault((c.backbone, c.options.dataset), []).extend(c.options.protocols)
    exact = [e for e in load_published() if e["class"] != "reported"]
    assert exact
    for e in exact:
        protocols = cells[(e["backbone"], e["dataset"])]
        spec = e["protocol"]["name"] + (f":{e['protocol']['preset']}" if e["protocol"].get("preset") else "")
        assert spec in protocols or f"{e['protocol']['name']}:hummingbird" in protocols, e


def test_a_cell_carries_its_run_options_and_its_job_command_parses_back_to_them(tmp_path):
    """A sweep cell is its RunOptions (typed, from the YAML values); the job's `ssl-segbench run` command is made from
    them and parses back to the same object, whatever the values: lists, nulls, a one-seed list, a negative layer,
    paths with spaces, nested CRF settings, a shared parameter only where its protocol runs."""
    doc = {"results_dir": str(tmp_path / "my res"), "backbones": ["pixels", "dino_vits16"],
           "datasets": {"a": {"dataset": "synthetic", "data_root": str(tmp_path / "data a"), "split": "test",
                              "options": {"skip_bad": True, "curated_list": str(tmp_path / "list with space.txt")},
                              "protocols": ["kmeans:stego", "retrieval"]},
                        "b": {"dataset": "voc", "protocols": ["linear"]}},
           "params": {"kmeans": {"k": 7, "crf": {"iterations": 5}}, "retrieval": {"train_split": ["trainaug",
                                                                                              "default"],
                                                                         "memory_size": None}},
           "run": {"size": 448, "resize": "square", "seeds": [3], "layer": -2, "device": "cpu", "batch_size": 4}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(doc))
    cells = {(c.backbone, c.dataset): c for c in load_sweep(path).cells}
    a = cells[("pixels", "a")].options
    assert a == RunOptions(backbone="pixels", dataset="synthetic", protocols=("kmeans:stego", "retrieval"),
                           data_root=str(tmp_path / "data a"), split="test", device="cpu", batch_size=4, seeds=[3],
                           layer=-2, resize="square", size=448, results_dir=tmp_path / "my res",
                           params={"kmeans": {"k": 7, "crf": {"iterations": 5}},
                                   "retrieval": {"train_split": ["trainaug", "default"], "memory_size": None}},
                           dataset_options={"skip_bad": True, "curated_list": str(tmp_path / "list with space.txt")})
    assert cells[("dino_vits16", "b")].options.params == {}  # no protocol of dataset b takes the shared params
    by_hand = RunOptions(backbone="org/model@v2", dataset="voc", protocols=("kmeans",), seeds=5, layer=-1,
                         mean=(0.5, 0.25, 0.125), std=(0.5, 0.5, 0.5), overwrite="always", workers=0, params={},
                         dataset_options={})
    for opts in [c.options for c in cells.values()] + [by_hand]:
        assert run_options(build_parser().parse_args(["run", *opts.argv()])) == opts


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


@pytest.mark.slow
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
