"""Result records: one JSON file per (backbone, revision, dataset, split, protocol@version, parameters).

The path is the key: `<results>/<dataset>/<split>/<backbone>/<revision>/<protocol>@<version>/<digest>.json`, where the
digest covers everything that can change the number (file-list hash, transform, layer, parameters, seeds). Records are
written to a temporary file and renamed, so a crash never leaves a truncated record.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import warnings
import zlib
from importlib import metadata
from pathlib import Path

import numpy as np

SCHEMA = "ssl-segbench/record/v1"
_PACKAGES = ("ssl-segbench", "torch", "torchvision", "timm", "transformers", "huggingface-hub", "faiss-cpu",
             "faiss-gpu", "numpy", "scipy", "scikit-learn", "pillow")
METRICS = ("miou", "pixel_acc", "mf1")


def record_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def record_path(results_dir: Path, identity: dict) -> Path:
    rev = (identity["revision"] or "none").replace("/", "_").replace(":", "-")
    return (Path(results_dir) / identity["dataset"] / identity["split"] / identity["backbone"] / rev
            / f"{identity['protocol']}@{identity['version']}" / f"{record_key(identity)}.json")


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


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename: readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


class RecordError(Exception):
    """A record file that is not valid JSON or not an ssl-segbench record."""


def read_record(path: Path) -> dict:
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: unreadable record ({e}); delete it and re-run to regenerate") from e
    if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
        raise RecordError(f"{path}: not an {SCHEMA} record")
    return rec


def iter_records(results_dir: Path):
    """(path, record or RecordError) for every *.json under results_dir, in sorted path order."""
    for path in sorted(Path(results_dir).rglob("*.json")):
        try:
            yield path, read_record(path)
        except RecordError as e:
            yield path, e
