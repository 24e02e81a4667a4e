"""`ssl-segbench sweep`: a backbones × datasets grid of `ssl-segbench run` cells on an existing engine.

One cell is one (backbone, dataset) with all its protocols, so a cell extracts its features once. A cell carries the
RunOptions of its run (its job's command line is made from them, `RunOptions.argv`), and its missing records are the
Settings the runner plans for it (`missing_records`). A cell whose records all exist is skipped; the others run
through an executor:
- `local`: each cell is an `ssl-segbench run` process, at most `workers` at a time;
- `slurm`: through submitit, one array task per cell, with the partition, GPUs, CPUs, memory, time limit, account and
  extra sbatch options of the sweep file (or flags); `nproc_per_node` > 1 runs the cell with torchrun inside its job
  (data-parallel extraction, `distributed.py`).
Before anything starts, the whole grid is checked as each cell's run would check itself (`runner.preflight`: run
flags, protocols and params, dataset ids and roots, backbone ids or directories, layer and size; no Hub access), and
duplicate cells are refused: one error lists every problem with its cells and sweep key, and nothing is submitted or
written. Records land in the path-keyed store (`results_dir`), so nothing merges them and `leaderboard` afterwards
needs nothing else. Each cell's log and job are noted in `<work_dir>/state.json`; `sweep status` lists every cell as
done, running, failed (with its log) or missing. Killing a sweep and starting it again runs only what is missing.

The sweep file (YAML; unknown keys are errors):

    results_dir: results/sweep         # records root
    work_dir: null                     # state and logs (default <results_dir>/.sweeps/<file stem>)
    backbones: [dino_vits16, dinov2_vits14]
    datasets:                          # name → where and how to read it (`dataset`: its id, default the name)
      voc: {data_root: /data/VOCdevkit/VOC2012, split: null, options: {}, protocols: null}
    protocols: [kmeans, linear]        # per dataset `protocols` overrides these; optional if every dataset has its own
    params: {linear: {epochs: 25}}     # --param PROTOCOL.KEY=VALUE
    run: {size: 448, resize: square, seeds: null, device: auto, batch_size: null, registry: null, layer: -1}
    executor: {kind: local, workers: 1}
    slurm: {partition: null, gpus_per_node: 0, cpus_per_task: 4, mem_gb: 32, timeout_min: 240, account: null,
            nproc_per_node: 1, additional: {}}
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import yamlload
from .atomic import write_json_atomic
from .errors import SegbenchError
from .extras import require
from .paths import safe_component
from .registry import is_int
from .setting import Setting

if TYPE_CHECKING:
    from .runner import RunOptions

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
    """One (backbone, dataset name) of the grid and the RunOptions of the run that computes it; its job's command line
    is made from them (`argv`), never the other way round."""

    backbone: str
    dataset: str
    options: RunOptions

    @property
    def argv(self) -> list[str]:
        """The job's `ssl-segbench run` arguments (`RunOptions.argv`: they parse back to `options`)."""
        return self.options.argv()

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
    own_protocols: frozenset = frozenset()  # the dataset names with a `protocols` list of their own

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


def _run_values(where: str, run: dict, problems: list[str]) -> dict:
    """The `run` section as RunOptions fields; a value of the wrong type is a problem (the values themselves are the
    runner's to check, as for `run`)."""
    out = {}
    for key, value in run.items():
        if value is None:
            continue
        if key in ("resize", "device", "registry"):
            ok, kind = isinstance(value, str), "a string"
        elif key == "seeds":
            ok = is_int(value) or isinstance(value, list) and all(is_int(v) for v in value)
            kind = "a count or a list of integers"
        else:
            ok, kind = is_int(value), "an integer"
        if ok:
            out[key] = value
        else:
            problems.append(f"{where}: run.{key} must be {kind}, got {value!r}")
    return out


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file and expand its grid; one error lists every problem of the file's form
    (`check_cells` then checks what the cells would run)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} not found")
    doc = _check_keys(str(path), yamlload.load(path.read_text(), str(path)), _TOP)
    problems: list[str] = []

    def form(check, *args):
        try:
            return check(*args)
        except SweepError as e:
            problems.append(str(e))

    backbones = form(_names, f"{path}: backbones", doc.get("backbones")) or []
    datasets = form(_mapping, f"{path}: datasets", doc.get("datasets"))
    if datasets == {}:
        problems.append(f"{path}: datasets must map at least one dataset id to its settings")
    protocols = None if doc.get("protocols") is None else form(_names, f"{path}: protocols", doc["protocols"])
    params = form(_mapping, f"{path}: params", doc.get("params")) or {}
    run = form(_check_keys, f"{path}: run", doc.get("run"), _RUN) or {}
    executor = {"kind": "local", "workers": 1,
                **(form(_check_keys, f"{path}: executor", doc.get("executor"), _EXECUTOR) or {})}
    slurm = {**SLURM_DEFAULTS, **(form(_check_keys, f"{path}: slurm", doc.get("slurm"), set(SLURM_DEFAULTS)) or {})}
    results_dir = Path(doc.get("results_dir") or "results")
    work_dir = Path(doc.get("work_dir") or results_dir / ".sweeps" / safe_component(path.stem))
    from .runner import RunOptions  # lazy: start-up time (torch)

    common = _run_values(str(path), run, problems)
    shared = {proto: dict(form(_mapping, f"{path}: params.{proto}", values) or {}) for proto, values in params.items()}
    used, ran = set(), set()  # the protocols that shared params went to; the protocols of any dataset
    cells = []
    for name, settings in (datasets or {}).items():
        s = form(_check_keys, f"{path}: datasets.{name}", settings, _DATASET)
        wrong = [k for k in ("dataset", "data_root", "split") if (s or {}).get(k) is not None and
                 not isinstance(s[k], str)]
        if wrong:
            problems.append(f"{path}: datasets.{name}: {', '.join(wrong)} must be a string")
        if s is None or wrong:
            continue
        options = form(_mapping, f"{path}: datasets.{name}.options", s.get("options")) or {}
        own = s.get("protocols")
        protos = protocols if own is None else form(_names, f"{path}: datasets.{name}.protocols", own)
        if own is None and doc.get("protocols") is None:
            problems.append(f"{path}: datasets.{name} has no protocols: give it `protocols: [...]`, or give a "
                            "top-level `protocols` list for every dataset without its own")
        names = {spec.partition(":")[0] for spec in protos or []}
        used |= names & set(shared)
        ran |= names
        for b in backbones:  # shared params go to the cells that run their protocol
            cells.append(Cell(b, name, RunOptions(
                backbone=b, dataset=s.get("dataset") or name,  # a name of its own: one dataset id at several roots
                protocols=tuple(protos or ()), data_root=s.get("data_root") or None, split=s.get("split") or None,
                results_dir=results_dir, params={proto: dict(shared[proto]) for proto in sorted(names & set(shared))},
                dataset_options=dict(options), **common)))
    if set(shared) - used:
        from .protocols import PROTOCOLS  # lazy: start-up time (torch)

        for proto in sorted(set(shared) - used):
            problems.append(f"{path}: params.{proto}: no dataset of this sweep runs protocol '{proto}' (they run: "
                            f"{', '.join(sorted(ran)) or 'none'}; known protocols: {', '.join(sorted(PROTOCOLS))}): "
                            "fix the name or drop it")
    if executor["kind"] not in EXECUTORS:
        problems.append(f"{path}: executor.kind must be one of {EXECUTORS}, got {executor['kind']!r}")
    if problems:
        raise SweepError(_listing(path, problems))
    own = frozenset(name for name, settings in datasets.items() if (settings or {}).get("protocols") is not None)
    return Sweep(path, cells, results_dir, work_dir, executor, slurm, own)


def _listing(path: Path, problems: list[str]) -> str:
    """One error for all the problems of a sweep file, each on its own line after the file's name."""
    if len(problems) == 1:
        text = problems[0] if problems[0].startswith(str(path)) else f"{path}: {problems[0]}"
    else:
        text = f"{path}: {len(problems)} problems:\n" + "\n".join(f"- {p}" for p in problems)
    return text + "\nNothing was started or written; fix the sweep file and run it again."


def _sweep_key(sweep: Sweep, option: str, cell: Cell) -> str:
    """Where in the sweep file a run option of a cell comes from."""
    own = f"datasets.{cell.dataset}.protocols" if cell.dataset in sweep.own_protocols else "protocols"
    return {"protocols": own, "params": "params", "dataset": f"datasets.{cell.dataset}",
            "backbone": "backbones"}.get(option, f"run.{option}")


def check_cells(sweep: Sweep, here: bool) -> None:
    """Check every cell as its run checks itself before any work (`runner.preflight`, no Hub access), all before
    anything starts: one error lists each problem with its sweep key and cells. `here`: the cells run on this
    machine (local executor), so their device must exist here."""
    from .runner import preflight  # lazy: start-up time (torch)

    found: dict[tuple[str, str], list[str]] = {}
    names, data = set(), {}
    for cell in sweep.cells:
        opts = cell.options
        if cell.name in names:
            found.setdefault(("backbones", f"'{cell.backbone}' is listed more than once, so its cells would run twice "
                                           "into one log: list each backbone once"), []).append(cell.name)
            continue
        names.add(cell.name)
        root = str(Path(opts.data_root).expanduser().resolve()) if opts.data_root else None
        first = data.setdefault((cell.backbone, opts.dataset, root, opts.split,
                                 json.dumps(opts.dataset_options, sort_keys=True, default=str)), cell.dataset)
        if first != cell.dataset:
            found.setdefault((f"datasets.{cell.dataset}", f"reads what datasets.{first} reads (dataset "
                              f"'{opts.dataset}', its root, split and options), so its cells would repeat those: "
                              "keep one of the two"), []).append(cell.name)
        for option, message in preflight(opts, here):
            found.setdefault((_sweep_key(sweep, option, cell), message), []).append(cell.name)
    if found:
        raise SweepError(_listing(sweep.path, [
            f"{key} ({'every cell' if len(names) > 1 and set(cells) == names else 'cell ' + ', '.join(cells)}): "
            f"{message}" for (key, message), cells in found.items()]))


def missing_records(cell: Cell) -> list[Setting]:
    """The Settings of a cell's records that do not exist yet, planned by `ssl-segbench run`'s own planning."""
    from .runner import run  # lazy: start-up time (torch)

    planned = run(dataclasses.replace(cell.options, plan_only=True))
    return [setting for status, _, setting in planned if status == "pending"]


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
    """The cells with a missing record (checked by `check_cells` first); a cell that cannot be planned on this machine
    (its checkpoint is not in the Hub cache here, its GPU is elsewhere) runs too: its job plans it where it runs."""
    todo = []
    for cell in sweep.cells:
        try:
            missing = missing_records(cell)
        except SegbenchError as e:
            say(f"{cell.name}: cannot be planned here ({str(e).splitlines()[0]}); running it, its job plans it")
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
    submitit = require("submitit", "sweep --executor slurm")
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
    if kind == "slurm":  # before any cell is checked, planned or submitted
        require("submitit", "sweep --executor slurm")
    check_cells(sweep, here=kind == "local")
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


__all__ = ["Cell", "Sweep", "SweepError", "check_cells", "load_sweep", "missing_records", "run_sweep", "status",
           "run_cell"]
