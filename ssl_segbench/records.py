"""Result records: one JSON file per (backbone, revision, dataset, split, protocol@version, parameters).

The path is the key: `<results>/<dataset>/<split>/<backbone>/<revision>/<protocol>@<version>/<digest>.json`, where the
digest covers everything that can change the number (the dataset's content digest, transform, layer, parameters,
seeds, and the train split's content for protocols that train). Every path component is made safe (no separators, no
'..') and the path is checked to stay inside the results directory. Records are written to a temporary file and
renamed, so a crash never leaves a truncated record, and a record whose metrics are not finite numbers is refused.

Schema v2 identifies the data by content; v1 records (identified by file names only) still load, marked `legacy`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import platform
import subprocess
import warnings
import zlib
from importlib import metadata
from pathlib import Path

import numpy as np

from .errors import SegbenchError
from .paths import inside, safe_component

SCHEMA = "ssl-segbench/record/v2"
LEGACY_SCHEMAS = {"ssl-segbench/record/v1": "schema v1: its dataset was identified by file names only, so it may "
                                             "come from stale cached features; rerun to replace it"}
_PACKAGES = ("ssl-segbench", "torch", "torchvision", "timm", "transformers", "huggingface-hub", "faiss-cpu",
             "faiss-gpu", "numpy", "scipy", "scikit-learn", "pillow")
METRICS = ("miou", "pixel_acc", "mf1")


def record_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def record_path(results_dir: Path, identity: dict) -> Path:
    rev = (identity["revision"] or "none").replace("/", "_").replace(":", "-")
    parts = [identity["dataset"], identity["split"], identity["backbone"], rev,
             f"{identity['protocol']}@{identity['version']}"]
    return inside(results_dir, Path(*(safe_component(p) for p in parts), f"{record_key(identity)}.json"))


def data_digest(rec: dict) -> str:
    """The evaluation data's digest in a record: its content (v2) or, for legacy records, its file list."""
    ident = rec["identity"]
    return ident.get("content_sha256") or ident.get("files_sha256") or ""


def check_finite(metrics: dict, what: str) -> None:
    """Refuse metrics that are not finite numbers (mean, std, per seed, interval): such a record would put NaN in a
    leaderboard and pass a regression gate."""
    for m, v in metrics.items():
        if m == "per_class_iou":
            continue
        values = [v.get("mean"), v.get("std"), *v.get("per_seed", []), *v.get("ci95", [])]
        bad = [x for x in values if not (isinstance(x, (int, float)) and math.isfinite(x))]
        if bad:
            raise RecordError(f"{what}: metric '{m}' is {bad[0]!r} (not a finite number); no record was written. "
                              "This comes from empty ground truth (no labelled pixels) or from broken scores.")


def package_versions() -> dict:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_sha() -> str | None:
    """Commit of the ssl-segbench checkout (with '-dirty' when it has uncommitted changes), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    return {"packages": package_versions(), "git_sha": git_sha(), "python": platform.python_version(),
            "platform": platform.platform()}


def summarize(per_seed: list[dict]) -> dict:
    """mean, std (population, over seeds) and per-seed values of each metric; per-class IoU averaged over seeds."""
    out = {}
    for m in METRICS:
        vals = [s[m] for s in per_seed if m in s]
        if vals:
            out[m] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "per_seed": [float(v) for v in vals]}
    pcs = np.array([[np.nan if v is None else v for v in s["per_class_iou"]] for s in per_seed], dtype=float)
    with warnings.catch_warnings():  # a class absent from every seed's ground truth and prediction stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_pc = np.nanmean(pcs, axis=0) if pcs.size else pcs
    out["per_class_iou"] = [None if np.isnan(v) else float(v) for v in np.atleast_1d(mean_pc)]
    return out


def encode_array(a: np.ndarray) -> dict:
    """A compact, exact JSON form of an integer array (zlib-compressed little-endian int64, base64)."""
    raw = np.ascontiguousarray(a, dtype="<i8").tobytes()
    return {"shape": list(a.shape), "dtype": "int64", "encoding": "zlib+base64",
            "data": base64.b64encode(zlib.compress(raw, 6)).decode("ascii")}


def decode_array(d: dict) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(d["data"])), dtype="<i8").reshape(d["shape"])


class RecordError(SegbenchError):
    """A record file that is not valid JSON or not an ssl-segbench record."""


def read_record(path: Path) -> dict:
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: unreadable record ({e}); delete it and re-run to regenerate") from e
    if not isinstance(rec, dict) or (rec.get("schema") != SCHEMA and rec.get("schema") not in LEGACY_SCHEMAS):
        raise RecordError(f"{path}: not an {SCHEMA} record")
    if rec["schema"] in LEGACY_SCHEMAS:
        rec["legacy"] = LEGACY_SCHEMAS[rec["schema"]]
    return rec


def iter_records(results_dir: Path):
    """(path, record or RecordError) for every *.json under results_dir, in sorted path order."""
    for path in sorted(Path(results_dir).rglob("*.json")):
        try:
            yield path, read_record(path)
        except RecordError as e:
            yield path, e
