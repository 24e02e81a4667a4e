"""Result records: one JSON file per (backbone, revision, dataset, split, protocol@version, parameters).

The path is the key: `<results>/<dataset>/<split>/<backbone>/<revision>/<protocol>@<version>/<digest>.json`, where the
digest covers everything that can change the number (the dataset's content digest, transform, layer, parameters,
seeds, and the train split's content for protocols that train). Every path component is made safe (no separators, no
'..') and the path is checked to stay inside the results directory. Records are written to a temporary file and
renamed, so a crash never leaves a truncated record, and a record whose metrics are not finite numbers is refused.
Reading validates too: a record that cannot be true (a value outside [0, 1], a mean that is not its per-seed values'
mean, a key that is not its identity's digest or its file name, unknown fields) is a RecordError naming the file.

Schema v2 identifies the data by content; v1 records (identified by file names only) still load, marked `legacy`.
"""
from __future__ import annotations

import base64
import functools
import json
import math
import platform
import subprocess
import warnings
import zlib
from dataclasses import MISSING, dataclass, field, fields
from importlib import metadata
from pathlib import Path

import numpy as np

from .errors import SegbenchError
from .registry import is_number
from .setting import Setting

SCHEMA = "ssl-segbench/record/v2"
LEGACY_SCHEMAS = {"ssl-segbench/record/v1": "schema v1: its dataset was identified by file names only, so it may "
                                             "come from stale cached features; rerun to replace it"}
_PACKAGES = ("ssl-segbench", "torch", "torchvision", "timm", "transformers", "huggingface-hub", "faiss-cpu",
             "faiss-gpu", "numpy", "scipy", "scikit-learn", "pillow")
METRICS = ("miou", "pixel_acc", "mf1")
# below these, a number is flagged wherever it is shown (`Record.caveats`)
MIN_EVAL_IMAGES = 100  # evaluation images: fewer make a noisy number
MIN_POINTS_PER_CLUSTER = 100  # fitted tokens per cluster under many-to-one: fewer let it label tokens one by one


def _finite(x) -> bool:
    return is_number(x) and math.isfinite(x)


def check_finite(metrics: dict, what: str) -> None:
    """Refuse metrics that are not finite numbers (mean, std, per seed, interval): such a record would put NaN in a
    leaderboard and pass a regression gate."""
    for m, v in metrics.items():
        if m == "per_class_iou":
            continue
        values = [v.get("mean"), v.get("std"), *v.get("per_seed", []), *v.get("ci95", [])]
        bad = [x for x in values if not _finite(x)]
        if bad:
            raise RecordError(f"{what}: metric '{m}' is {bad[0]!r} (not a finite number); no record was written. "
                              "This comes from empty ground truth (no labelled pixels) or from broken scores.")


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def metrics_problem(metrics: dict, seeds: list) -> str | None:
    """What makes a record's metrics impossible, or None. Every value (mean, std, per-seed values, the interval's ends,
    per-class IoU other than null) is a finite fraction in [0, 1]; there is one per-seed value per seed; mean and std
    are the mean and population std of the per-seed values (as `summarize` computes them); the interval is ordered.
    The interval need not contain the mean: the percentile bootstrap of `metrics.bootstrap_ci` can legitimately lie
    wholly on one side of it (classes present in few images drop out of most resamples)."""
    def fraction(x) -> bool:
        return _finite(x) and 0 <= x <= 1

    for m, v in metrics.items():
        if m == "per_class_iou":
            if not isinstance(v, list) or not all(x is None or fraction(x) for x in v):
                return "'per_class_iou' must be a list of fractions in [0, 1] (or null for an absent class)"
            continue
        if not isinstance(v, dict) or not isinstance(v.get("per_seed"), list) or not v["per_seed"]:
            return f"metric '{m}' needs mean, std and a non-empty per_seed list"
        ci = v.get("ci95")
        if ci is not None and not (isinstance(ci, list) and len(ci) == 2):
            return f"metric '{m}': ci95 must be a [low, high] pair"
        for what, x in (("mean", v.get("mean")), ("std", v.get("std")), *(("per_seed", x) for x in v["per_seed"]),
                        *(("ci95", x) for x in ci or ())):
            if not fraction(x):
                return f"metric '{m}': {what} {x!r} is not a fraction in [0, 1]"
        if len(v["per_seed"]) != len(seeds):
            return f"metric '{m}' has {len(v['per_seed'])} per-seed values for {len(seeds)} seed(s)"
        mean, std = float(np.mean(v["per_seed"])), float(np.std(v["per_seed"]))
        if not (_close(v["mean"], mean) and _close(v["std"], std)):
            return (f"metric '{m}': mean {v['mean']!r} and std {v['std']!r} are not the mean {mean!r} and population "
                    f"std {std!r} of its per-seed values {v['per_seed']}")
        if ci is not None and ci[0] > ci[1]:
            return f"metric '{m}': ci95 {ci} is not ordered (low > high)"
    return None


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
    """A record file that is not valid JSON or not an ssl-segbench record; the message names the file and the key."""


_IDENTITY_KEYS = ("backbone", "source", "revision", "dataset", "split", "protocol", "version", "params", "layer",
                  "seeds")


@dataclass
class Record:
    """One result as written to `<results>/.../<key>.json`: identity (the key's contents), what produced it, its
    metrics and provenance. `from_json` validates on load; v1 records (`LEGACY_SCHEMAS`) load with `legacy` set.
    Its `setting` is what every reader (leaderboards, the site, the regression gate, `compare`) groups it by."""

    schema: str
    key: str
    identity: dict
    backbone: dict
    dataset: dict
    protocol: dict
    seeds: list
    metrics: dict
    info: dict = field(default_factory=dict)
    transform: dict = field(default_factory=dict)
    per_seed: list = field(default_factory=list)
    confusions: list | None = None
    image_stats: dict | None = None
    provenance: dict = field(default_factory=dict)
    legacy: str | None = None

    @classmethod
    def from_json(cls, obj, source: str = "<record>") -> "Record":
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise RecordError(f"{source}: {what}; delete it and re-run to regenerate")

        need(isinstance(obj, dict), "not a JSON object")
        schema = obj.get("schema")
        need(schema == SCHEMA or schema in LEGACY_SCHEMAS, f"not an {SCHEMA} record (schema {schema!r})")
        names = {f.name for f in fields(cls)} - {"legacy"}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(obj))
        need(not missing, f"missing key(s) {missing}")
        need(isinstance(obj["key"], str) and isinstance(obj["seeds"], list), "'key' must be a string and 'seeds' a "
             "list")
        ident = obj["identity"]
        need(isinstance(ident, dict) and all(k in ident for k in _IDENTITY_KEYS) and isinstance(ident["params"], dict),
             f"'identity' needs {list(_IDENTITY_KEYS)}")
        for key in ("backbone", "dataset", "protocol", "metrics", "info"):
            need(isinstance(obj[key], dict), f"'{key}' is not a mapping")
        need(all(k in obj["protocol"] for k in ("name", "version", "preset", "params")),
             "'protocol' needs name, version, preset and params")
        need("id" in obj["backbone"] and "revision_resolved" in obj["backbone"], "'backbone' needs id and "
             "revision_resolved")
        unknown = sorted(set(obj) - names)
        need(not unknown, f"unknown field(s) {unknown} (a record has only {sorted(names)})")
        need({"miou", "pixel_acc"} <= set(obj["metrics"]), "no 'miou' or no 'pixel_acc' metric (every page shows both)")
        digest = Setting.of_identity(ident).key
        need(obj["key"] == digest, f"its key {obj['key']!r} is not the digest of its identity ({digest!r}): the "
             "identity or the key was edited")
        problem = metrics_problem(obj["metrics"], obj["seeds"])
        need(problem is None, str(problem))
        rec = cls(**{k: v for k, v in obj.items() if k in names})
        rec.legacy = LEGACY_SCHEMAS.get(schema)
        return rec

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "legacy"}

    @functools.cached_property
    def setting(self) -> Setting:
        """What this record measured (its identity with the descriptive fields it stores): its key, its column, and
        what a published claim is matched against. Every reader groups and pairs records through it."""
        return Setting.of_record(self)

    @property
    def protocol_spec(self) -> str:
        """'name' or 'name:preset', as given to --protocol."""
        return self.setting.spec

    def caveats(self) -> list[str]:
        """Why this number is not comparable with a paper's, or with a column of well-posed runs, read from the record
        alone (so records written before these flags existed get them too): a probe or memory fit on the evaluation
        images themselves, many-to-one matching with few fitted tokens per cluster (it approaches labelling each token
        by its ground truth), a single seed (no spread), an evaluation set under MIN_EVAL_IMAGES images."""
        out = []
        train = self.setting.train
        if train is not None and train.get("split") is None:
            out.append("fit on the evaluation images (no train split)")
        k, points = self.info.get("k"), self.info.get("fit_points")
        if self.protocol["params"].get("matching") == "many-to-one" and k and points is not None and \
                points / k < MIN_POINTS_PER_CLUSTER:
            out.append(f"many-to-one with {points / k:.1f} tokens per cluster (K={k}; under {MIN_POINTS_PER_CLUSTER})")
        if len(self.seeds) == 1:
            out.append("1 seed (no spread)")
        n = self.dataset.get("n_images")
        if isinstance(n, int) and n < MIN_EVAL_IMAGES:
            out.append(f"{n} evaluation images (under {MIN_EVAL_IMAGES})")
        return out

    def row_label(self) -> str:
        """Backbone and revision; the normalisation too where `--mean/--std` set it, so such a record never shares a
        row (and a cell) with the entry's own."""
        rev = self.backbone["revision_resolved"]
        norm = self.identity.get("normalisation")
        given = f" (mean {norm['mean']}, std {norm['std']})" if norm and \
            self.backbone.get("normalisation_source") == "--mean/--std" else ""
        return f"{self.backbone['id']} @ {rev[:12] if rev else 'builtin'}{given}" + \
            (" ⚠ v1 record" if self.legacy else "")

    def label(self) -> str:
        """One line naming the record's dataset, backbone and column (regression gate rows)."""
        rev = self.identity["revision"] or "builtin"
        return (f"{self.identity['dataset']}/{self.identity['split']} · {self.identity['backbone']}@{rev[:12]} · "
                f"{self.setting.column.label}")


def read_record(path: Path) -> Record:
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: unreadable record ({e}); delete it and re-run to regenerate") from e
    rec = Record.from_json(obj, str(path))
    if Path(path).stem != rec.key:
        raise RecordError(f"{path}: its key {rec.key!r} is not its file name (a record is stored as <key>.json); "
                          "it was renamed or copied by hand: delete it and re-run to regenerate")
    return rec


def require_results_dir(results_dir: Path) -> Path:
    """`results_dir`, after checking that it is a folder: a mistyped --results-dir must not read as 'no results'."""
    if not Path(results_dir).is_dir():
        raise RecordError(f"results folder {results_dir} does not exist: pass the --results-dir that `ssl-segbench "
                          "run` wrote to (or set SSL_SEGBENCH_RESULTS)")
    return Path(results_dir)


def iter_records(results_dir: Path):
    """(path, Record or RecordError) for every *.json under results_dir, in sorted path order; hidden folders (a
    sweep's state and logs under `.sweeps/`) hold no records and are not read."""
    root = Path(results_dir)
    for path in sorted(root.rglob("*.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts[:-1]):
            continue
        try:
            yield path, read_record(path)
        except RecordError as e:
            yield path, e
