"""`ssl-segbench sweep`: a backbones × datasets grid of `ssl-segbench run` cells on an existing engine.

One cell is one (backbone, dataset) with all its protocols, so a cell extracts its features once. A cell whose records
all exist is skipped; the others run through an executor:
- `local`: each cell is an `ssl-segbench run` process, at most `workers` at a time;
- `slurm`: through submitit, one array task per cell, with the partition, GPUs, CPUs, memory, time limit, account and
  extra sbatch options of the sweep file (or flags); `nproc_per_node` > 1 runs the cell with torchrun inside its job
  (data-parallel extraction, `distributed.py`).
Records land in the path-keyed store (`results_dir`), so nothing merges them and `leaderboard` afterwards needs nothing
else. Each cell's log and job are noted in `<work_dir>/state.json`; `sweep status` lists every cell as done, running,
failed (with its log) or missing. Killing a sweep and starting it again runs only what is missing.

The sweep file (YAML; unknown keys are errors):

    results_dir: results/sweep         # records root
    work_dir: null                     # state and logs (default <results_dir>/.sweeps/<file stem>)
    backbones: [dino_vits16, dinov2_vits14]
    datasets:                          # name → where and how to read it (`dataset`: its id, default the name)
      voc: {data_root: /data/VOCdevkit/VOC2012, split: null, options: {}, protocols: null}
    protocols: [kmeans, linear]        # per dataset `protocols` overrides these
    params: {linear: {epochs: 25}}     # --param PROTOCOL.KEY=VALUE
    run: {size: 448, resize: square, seeds: null, device: auto, batch_size: null, registry: null, layer: -1}
    executor: {kind: local, workers: 1}
    slurm: {partition: null, gpus_per_node: 0, cpus_per_task: 4, mem_gb: 32, timeout_min: 240, account: null,
            nproc_per_node: 1, additional: {}}
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import yamlload
from .atomic import write_json_atomic
from .errors import SegbenchError
from .paths import safe_component

EXECUTORS = ("local", "slurm")
_TOP = {"results_dir", "work_dir", "backbones", "datasets", "protocols", "params", "run", "executor", "slurm"}
_DATASET = {"dataset", "data_root", "split", "options", "protocols"}
_RUN = {"size", "resize", "seeds", "device", "batch_size", "registry", "layer"}
_EXECUTOR = {"kind", "workers"}
SLURM_DEFAULTS = {"partition": None, "gpus_per_node": 0, "cpus_per_task": 4, "mem_gb": 32, "timeout_min": 240,
                  "account": None, "nproc_per_node": 1, "additional": {}}


class SweepError(SegbenchError):
    """A malformed sweep file or a sweep that cannot run; the message names the file and the key."""


@dataclass(frozen=True)
class Cell:
    """One (backbone, dataset) of the grid and the `ssl-segbench run` arguments that compute it."""

    backbone: str
    dataset: str
    argv: tuple[str, ...]

    @property
    def name(self) -> str:
        return safe_component(f"{self.backbone}__{self.dataset}")


@dataclass
class Sweep:
    path: Path
    cells: list[Cell]
    results_dir: Path
    work_dir: Path
    executor: dict
    slurm: dict = field(default_factory=dict)

    @property
    def state_file(self) -> Path:
        return self.work_dir / "state.json"

    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise SweepError(f"{self.state_file} is not valid JSON ({e}); delete it to forget past submissions") \
                from None

    def save_state(self, state: dict) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_file, state)


def _check_keys(where: str, value, allowed: set) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError(f"{where} must be a mapping")
    unknown = set(value) - allowed
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return value


def _mapping(where: str, value) -> dict:
    """A mapping with keys of the user's choosing (dataset names, protocol names)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError(f"{where} must be a mapping")
    return value


def _names(where: str, value) -> list[str]:
    if not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
        raise SweepError(f"{where} must be a non-empty list of names")
    return value


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file and expand its grid."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} not found")
    doc = _check_keys(str(path), yamlload.load(path.read_text(), str(path)), _TOP)
    backbones = _names(f"{path}: backbones", doc.get("backbones"))
    datasets = _mapping(f"{path}: datasets", doc.get("datasets"))
    if not datasets:
        raise SweepError(f"{path}: datasets must map at least one dataset id to its settings")
    protocols = _names(f"{path}: protocols", doc.get("protocols"))
    params = _mapping(f"{path}: params", doc.get("params"))
    run = _check_keys(f"{path}: run", doc.get("run"), _RUN)
    executor = {"kind": "local", "workers": 1, **_check_keys(f"{path}: executor", doc.get("executor"), _EXECUTOR)}
    slurm = {**SLURM_DEFAULTS, **_check_keys(f"{path}: slurm", doc.get("slurm"), set(SLURM_DEFAULTS))}
    results_dir = Path(doc.get("results_dir") or "results")
    work_dir = Path(doc.get("work_dir") or results_dir / ".sweeps" / safe_component(path.stem))
    common = []
    for key, flag in (("size", "--size"), ("resize", "--resize"), ("device", "--device"),
                      ("batch_size", "--batch-size"), ("registry", "--registry"), ("layer", "--layer")):
        if run.get(key) is not None:
            common += [flag, str(run[key])]
    seeds = run.get("seeds")
    if seeds is not None:
        common += ["--seeds", ",".join(str(s) for s in seeds) if isinstance(seeds, list) else str(seeds)]
    for proto, values in params.items():
        for key, value in _mapping(f"{path}: params.{proto}", values).items():
            common += ["--param", f"{proto}.{key}={json.dumps(value)}"]
    cells = []
    for name, settings in datasets.items():
        s = _check_keys(f"{path}: datasets.{name}", settings, _DATASET)
        ds = s.get("dataset") or name  # a name of its own: one dataset id at several roots
        argv = ["--dataset", ds]
        if s.get("data_root"):
            argv += ["--data-root", str(s["data_root"])]
        if s.get("split"):
            argv += ["--split", str(s["split"])]
        for key, value in _mapping(f"{path}: datasets.{name}.options", s.get("options")).items():
            argv += ["-o", f"{key}={value}"]
        protos = _names(f"{path}: datasets.{name}.protocols", s["protocols"]) if s.get("protocols") else protocols
        argv += ["--protocol", ",".join(protos)]
        for b in backbones:
            cells.append(Cell(b, name, ("--backbone", b, *argv, *common, "--results-dir", str(results_dir))))
    if executor["kind"] not in EXECUTORS:
        raise SweepError(f"{path}: executor.kind must be one of {EXECUTORS}, got {executor['kind']!r}")
    return Sweep(path, cells, results_dir, work_dir, executor, slurm)


def missing_records(cell: Cell) -> list[Path]:
    """The records of a cell that do not exist yet, resolved exactly as `ssl-segbench run` resolves them."""
    from .cli import _run_options_of, build_parser
    from .runner import run

    args = build_parser().parse_args(["run", *cell.argv])
    protocols = tuple(p.strip() for p in args.protocol.split(",") if p.strip())
    opts = _run_options_of(args, protocols, seeds=args.seeds, results_dir=args.results_dir, plan_only=True)
    return [path for status, path, _ in run(opts) if status == "pending"]


def run_cell(argv: list[str], nproc_per_node: int = 1) -> None:
    """The body of one cell's job: `ssl-segbench run` (under torchrun when several processes share the job's GPUs).
    Its output goes to the job's log; a failure raises, so the executor marks the job failed."""
    if nproc_per_node > 1:
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", "--nproc-per-node", str(nproc_per_node), "-m", "ssl_segbench", "run", *argv]
    else:
        cmd = [sys.executable, "-m", "ssl_segbench", "run", *argv]
    print(f"ssl-segbench sweep cell: {shlex.join(cmd)}", flush=True)
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise RuntimeError(f"ssl-segbench run exited with {rc}: {shlex.join(cmd)}")


def pending_cells(sweep: Sweep, say=print) -> list[Cell]:
    """The cells with a missing record; a cell that cannot even be planned (an unknown backbone, a missing dataset
    root) runs too, so that its log says why it fails."""
    todo = []
    for cell in sweep.cells:
        try:
            missing = missing_records(cell)
        except SegbenchError as e:
            say(f"{cell.name}: cannot be planned ({str(e).splitlines()[0]}); running it to log the failure")
            todo.append(cell)
            continue
        say(f"{cell.name}: " + (f"{len(missing)} record(s) missing" if missing else "done, skipped"))
        if missing:
            todo.append(cell)
    return todo


def run_local(sweep: Sweep, cells: list[Cell], workers: int, say=print) -> list[str]:
    """Each cell as its own `ssl-segbench run` process (at most `workers` at once), its output in
    <work_dir>/logs/<cell>.log; returns the cells that failed."""
    logs = sweep.work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    state, running, failed, queue = sweep.state(), {}, [], list(cells)
    while queue or running:
        while queue and len(running) < max(1, workers):
            cell = queue.pop(0)
            log = logs / f"{cell.name}.log"
            fh = open(log, "w")
            proc = subprocess.Popen([sys.executable, "-c", "import sys; from ssl_segbench.sweep import run_cell; "
                                     "run_cell(sys.argv[1:])", *cell.argv], stdout=fh, stderr=subprocess.STDOUT)
            running[cell.name] = (proc, fh)
            state[cell.name] = {"executor": "local", "pid": proc.pid, "log": str(log),
                                "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            sweep.save_state(state)
            say(f"{cell.name}: started (pid {proc.pid}, log {log})")
        time.sleep(0.2)
        for name, (proc, fh) in list(running.items()):
            if proc.poll() is not None:
                fh.close()
                del running[name]
                state[name]["exit"] = proc.returncode
                sweep.save_state(state)
                if proc.returncode:
                    failed.append(name)
                say(f"{name}: " + ("finished" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, log "
                                                                          f"{state[name]['log']})"))
    return failed


def run_slurm(sweep: Sweep, cells: list[Cell], slurm: dict, wait: bool, say=print) -> list[str]:
    """One submitit array task per cell; waits for them unless `wait` is False; returns the cells that failed."""
    import submitit

    executor = submitit.AutoExecutor(folder=sweep.work_dir / "slurm" / "%j", cluster="slurm")
    executor.update_parameters(
        name="ssl-segbench", nodes=1, tasks_per_node=1, cpus_per_task=slurm["cpus_per_task"],
        mem_gb=slurm["mem_gb"], timeout_min=slurm["timeout_min"], gpus_per_node=slurm["gpus_per_node"] or None,
        slurm_partition=slurm["partition"], slurm_account=slurm["account"],
        slurm_additional_parameters=dict(slurm["additional"] or {}))
    jobs = executor.map_array(run_cell, [list(c.argv) for c in cells], [slurm["nproc_per_node"]] * len(cells))
    state = sweep.state()
    for cell, job in zip(cells, jobs):
        state[cell.name] = {"executor": "slurm", "job_id": job.job_id, "log": str(job.paths.stdout),
                            "stderr": str(job.paths.stderr), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        say(f"{cell.name}: submitted as Slurm job {job.job_id} (log {job.paths.stdout})")
    sweep.save_state(state)
    if not wait:
        return []
    failed = []
    for cell, job in zip(cells, jobs):
        try:
            job.result()
            say(f"{cell.name}: finished")
        except Exception as e:  # noqa: BLE001 - submitit reports a failed job as whatever it raised
            failed.append(cell.name)
            say(f"{cell.name}: FAILED (log {job.paths.stdout}, {job.paths.stderr}): {str(e).splitlines()[-1][:200]}")
    return failed


def _slurm_state(job_id: str) -> str | None:
    """The job's state in the queue (PENDING, RUNNING, ...), or None once it has left it."""
    out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True)
    return (out.stdout.split() or [None])[0] if out.returncode == 0 else None


def _alive(pid: int) -> bool:
    try:
        return "ssl_segbench" in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


def status(sweep: Sweep) -> list[tuple[str, str, str]]:
    """(cell, done | running | pending | failed | missing | error, detail) for every cell of the grid."""
    state, rows = sweep.state(), []
    for cell in sweep.cells:
        try:
            missing = missing_records(cell)
        except SegbenchError as e:
            rows.append((cell.name, "error", str(e).splitlines()[0]))
            continue
        if not missing:
            rows.append((cell.name, "done", "all records written"))
            continue
        st = state.get(cell.name)
        if st is None:
            rows.append((cell.name, "missing", f"{len(missing)} record(s) missing, never submitted"))
            continue
        if st["executor"] == "slurm":
            queued = _slurm_state(st["job_id"])
            if queued:
                rows.append((cell.name, "running" if queued == "RUNNING" else queued.lower(),
                             f"Slurm job {st['job_id']}, log {st['log']}"))
                continue
            rows.append((cell.name, "failed", f"Slurm job {st['job_id']} ended without its records; log {st['log']}"
                                              f" and {st['stderr']}"))
            continue
        if st.get("exit") is None and _alive(st["pid"]):
            rows.append((cell.name, "running", f"pid {st['pid']}, log {st['log']}"))
            continue
        rows.append((cell.name, "failed", f"exit {st.get('exit', 'unknown (the process is gone)')}, log {st['log']}"))
    return rows


def run_sweep(sweep: Sweep, executor: str | None = None, workers: int | None = None, wait: bool = True,
              slurm_overrides: dict | None = None, say=print) -> int:
    """Run what is missing; 0 when every cell it ran finished, 1 when one failed."""
    kind = executor or sweep.executor["kind"]
    if kind not in EXECUTORS:
        raise SweepError(f"--executor must be one of {EXECUTORS}, got {kind!r}")
    cells = pending_cells(sweep, say)
    if not cells:
        say("nothing to run: every cell's records exist")
        return 0
    say(f"running {len(cells)} cell(s) of {len(sweep.cells)} with the {kind} executor")
    if kind == "local":
        failed = run_local(sweep, cells, workers or int(sweep.executor.get("workers") or 1), say)
    else:
        slurm = {**sweep.slurm, **{k: v for k, v in (slurm_overrides or {}).items() if v is not None}}
        if not shutil.which("sbatch"):
            raise SweepError("--executor slurm needs Slurm's sbatch on PATH (this machine has none)")
        failed = run_slurm(sweep, cells, slurm, wait, say)
    if failed:
        say(f"{len(failed)} cell(s) failed: {', '.join(failed)}; `ssl-segbench sweep status {sweep.path}` lists "
            "their logs")
    return 1 if failed else 0


__all__ = ["Cell", "Sweep", "SweepError", "load_sweep", "missing_records", "run_sweep", "status", "run_cell"]
