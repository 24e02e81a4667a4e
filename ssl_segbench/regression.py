"""`ssl-segbench check`: a CI gate that fails exactly when a metric really moved down.

A baseline is a JSON file of record keys (the hash of backbone revision, dataset content, protocol version, parameters
and seeds) with each metric's mean, seed std and number of seeds. A current record with the same key is compared per
metric: it regresses when `current < baseline − tolerance`. The default tolerance is derived from the seed spread:
max(0.002, 2 × the baseline's std over seeds) in absolute metric units (0.002 = 0.2 points absorbs floating-point
differences between machines; the seed spread is how far a number moves when only randomness changes). A baseline
entry with no current record, or whose record cannot be true (`Record.from_json` refuses it), fails the gate
('missing', 'invalid'), and so does any unreadable record under the results folder, so a benchmark that silently
stopped running or started writing NaN or 500 % cannot pass. A malformed or empty baseline, or a results folder that
does not exist, is a usage error (exit 2) naming the file at fault.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_text_atomic
from .errors import SegbenchError
from .records import METRICS, RecordError, iter_records, require_results_dir
from .registry import is_number

SCHEMA = "ssl-segbench/baseline/v1"
TOLERANCE_FLOOR = 0.002


class BaselineError(SegbenchError):
    """The baseline file is missing or malformed; the message names it and how to create one."""


def baseline_from_records(results_dir: Path) -> dict:
    entries = {}
    for path, rec in iter_records(require_results_dir(results_dir)):
        if isinstance(rec, RecordError):
            raise BaselineError(f"cannot build a baseline: {rec}")
        entries[rec.key] = {
            "label": rec.label(), "path": str(path.relative_to(results_dir)),
            "metrics": {m: {"mean": rec.metrics[m]["mean"], "std": rec.metrics[m]["std"],
                            "n_seeds": len(rec.metrics[m]["per_seed"])} for m in METRICS if m in rec.metrics},
        }
    if not entries:
        raise BaselineError(f"cannot build a baseline: no records under {results_dir}; run `ssl-segbench run` first")
    return {"schema": SCHEMA, "entries": dict(sorted(entries.items()))}


def write_baseline(results_dir: Path, path: Path) -> int:
    base = baseline_from_records(results_dir)
    write_text_atomic(path, json.dumps(base, indent=1, sort_keys=True) + "\n")
    return len(base["entries"])


def read_baseline(path: Path) -> dict:
    try:
        base = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BaselineError(f"baseline {path} not found: create it with `ssl-segbench check --baseline {path} "
                            "--update-baseline`") from None
    except json.JSONDecodeError as e:
        raise BaselineError(f"baseline {path} is not valid JSON: {e}") from e
    if not isinstance(base, dict) or base.get("schema") != SCHEMA or not isinstance(base.get("entries"), dict):
        raise BaselineError(f"{path} is not an {SCHEMA} file")
    if not base["entries"]:
        raise BaselineError(f"{path} has no entries, so it would pass any results: regenerate it with "
                            f"`ssl-segbench check --baseline {path} --update-baseline` after a run")
    for key, entry in base["entries"].items():
        where = f"{path}: entry '{key}'"
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), str) \
                or not isinstance(entry.get("metrics"), dict) or not entry["metrics"]:
            raise BaselineError(f"{where} needs a 'label' string and a non-empty 'metrics' mapping; regenerate the "
                                "baseline with --update-baseline")
        for metric, m in entry["metrics"].items():
            ok = isinstance(m, dict) and all(is_number(m.get(f)) and math.isfinite(m[f]) and 0 <= m[f] <= 1
                                             for f in ("mean", "std"))
            if not ok:
                raise BaselineError(f"{where}, metric '{metric}': needs 'mean' and 'std' fractions in [0, 1], got "
                                    f"{m!r}; regenerate the baseline with --update-baseline")
    return base


@dataclass
class Row:
    label: str
    metric: str
    baseline: float | None
    current: float | None
    tolerance: float | None
    status: str  # ok | regressed | improved | missing | invalid | new

    @property
    def delta(self) -> float | None:
        return None if self.baseline is None or self.current is None else self.current - self.baseline


def default_tolerance(entry: dict) -> float:
    return max(TOLERANCE_FLOOR, 2.0 * float(entry.get("std") or 0.0))


def compare(baseline: dict, results_dir: Path,
            tolerances: dict[str, float] | None = None) -> tuple[list[Row], list[str]]:
    """Rows for every baseline metric (and for new records), plus problems with unreadable records. A baseline entry
    whose record file (`<key>.json`) is there but refused is 'invalid', not 'missing'."""
    current, refused, problems = {}, set(), []
    for path, rec in iter_records(require_results_dir(results_dir)):
        if isinstance(rec, RecordError):
            problems.append(str(rec))
            refused.add(path.stem)
        else:
            current[rec.key] = rec
    rows = []
    for key, entry in baseline["entries"].items():
        rec = current.get(key)
        for metric, base in sorted(entry["metrics"].items()):
            tol = (tolerances or {}).get(metric, default_tolerance(base))
            if rec is None and key in refused:
                rows.append(Row(entry["label"], metric, base["mean"], None, tol, "invalid"))
                continue
            if rec is None or metric not in rec.metrics:
                rows.append(Row(entry["label"], metric, base["mean"], None, tol, "missing"))
                continue
            cur = rec.metrics[metric]["mean"]
            status = "regressed" if cur < base["mean"] - tol else "improved" if cur > base["mean"] + tol else "ok"
            rows.append(Row(entry["label"], metric, base["mean"], cur, tol, status))
    for key, rec in sorted(current.items()):
        if key not in baseline["entries"]:
            rows.append(Row(rec.label(), "miou", None, rec.metrics["miou"]["mean"], None, "new"))
    return rows, problems


def gate_failed(rows: list[Row], problems: list[str]) -> bool:
    """A metric regressed, a baseline result is missing or refused, or any record under the results is refused."""
    return bool(problems) or any(r.status in ("regressed", "missing", "invalid") for r in rows)
