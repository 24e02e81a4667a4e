"""Published numbers (`published.yaml`), in three classes by what stands behind them, and their match to records.

- `reproduced`: a record of ours under the entry's exact Setting was measured within ±1 point of the number; the
  entry names that record's key and the machine it ran on (`record`, `machine`). Drawn beside the column with ✓.
- `same-protocol`: our preset follows the reference's protocol, but the published run differs in known ways, each
  listed as data (`deviations`); drawn beside the column with † and a footnote listing them, never as exact.
- `reported`: context (another protocol, a trained or fine-tuned network, an unstated protocol): listed under
  "Reported numbers" with `why`, never beside a column and never as a difference.

A `reproduced` or `same-protocol` entry claims a Setting (`Claim`): dataset, split, backbone, protocol (name,
version, preset, overrides, layer), the run's input size and resize policy where the preset does not fix them
(`run`), and, for a protocol that fits on or retrieves from a train split, that split and its size (`train`). A record
matches when its Setting equals the claim resolved the way its run was (`runner.resolve_params`: machine-dependent
`auto` values for the record's device, the input size for its backbone's patch): so a record trained or retrieved
from another split (VOC `train`, 1,464 images, where the paper used `trainaug`, 10,582) is never shown beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from . import yamlload
from .errors import SegbenchError
from .records import METRICS, Record

PUBLISHED = Path(__file__).with_name("published.yaml")
CLASSES = ("reproduced", "same-protocol", "reported")
MARKS = {"reproduced": "✓", "same-protocol": "†"}
STAGES = ("frozen backbone", "frozen backbone, other protocol", "trained head", "fine-tuned backbone",
          "distilled network", "unstated")  # unstated: the source does not say what was measured (reported only)
_KEYS = {"dataset", "split", "method", "backbone", "network", "metric", "value", "stage", "measured_on", "class", "why",
         "source", "protocol", "run", "train", "deviations", "record", "machine"}
_REQUIRED = {"dataset", "split", "method", "metric", "value", "stage", "measured_on", "class", "source"}
_PROTOCOL_KEYS = {"name", "version", "preset", "overrides", "layer"}
_RUN_KEYS = {"size", "resize"}
_TRAIN_KEYS = {"split", "n_images"}
_CLAIM_ONLY = ("protocol", "run", "train")


class PublishedError(SegbenchError):
    """published.yaml is malformed; the message names the entry and the key."""


@dataclass(frozen=True)
class Claim:
    """The Setting a `reproduced` or `same-protocol` entry claims, as far as a paper fixes one."""

    dataset: str
    split: str
    backbone: str
    protocol: str
    version: str
    preset: str | None
    overrides: dict = field(default_factory=dict)
    layer: int = -1
    run: dict = field(default_factory=dict)  # size / resize, where the preset does not fix them
    train: dict | None = None  # {split, n_images (optional)}

    @classmethod
    def of_entry(cls, entry: dict) -> "Claim":
        proto = entry["protocol"]
        return cls(entry["dataset"], entry["split"], entry["backbone"], proto["name"], str(proto["version"]),
                   proto.get("preset"), dict(proto.get("overrides") or {}), proto.get("layer", -1),
                   dict(entry.get("run") or {}), entry.get("train"))

    def protocol_made(self):
        """The claimed protocol, made from its preset and overrides (a ProtocolError when the claim names a preset or
        parameter the protocol lacks)."""
        from .protocols import get_protocol  # lazy: start-up time (torch): the leaderboard imports published

        return get_protocol(self.protocol + (f":{self.preset}" if self.preset else ""), **self.overrides)

    def params_for(self, patch_size: int, device: str | None) -> dict:
        """The parameters the Setting of a run of the claim holds on `device` for a backbone of `patch_size` (those
        added after records existed left out at their default, as `runner.plan_setting` does)."""
        from .runner import RunOptions, resolve_params  # lazy: start-up time (torch)

        defaults = {f.name: f.default for f in fields(RunOptions) if f.name in _RUN_KEYS}
        run = {**defaults, **self.run}
        proto, params, _ = resolve_params(self.protocol_made(), patch_size, run["size"], run["resize"], device)
        return proto.identity_params(params)

    def matches(self, rec: Record) -> bool:
        """Whether `rec` was measured under this claim: its Setting equals the claim in every field a claim fixes."""
        s = rec.setting
        if (s.dataset, s.split, s.backbone, s.protocol, s.version, s.layer) != \
                (self.dataset, self.split, self.backbone, self.protocol, self.version, self.layer):
            return False
        if (self.train is None) != (s.train is None):
            return False
        if self.train is not None and (s.train.get("split") != self.train["split"] or (
                "n_images" in self.train and s.train_images != self.train["n_images"])):
            return False
        patch = rec.backbone.get("patch_size")
        return patch is not None and s.params == self.params_for(patch, rec.provenance.get("device"))


def _problem(e: dict) -> str | None:
    """What is wrong with one entry, or None."""
    unknown, missing = set(e) - _KEYS, _REQUIRED - set(e)
    if unknown or missing:
        return f"unknown key(s) {sorted(unknown)}, missing key(s) {sorted(missing)}"
    if e["metric"] not in METRICS or not isinstance(e["value"], float) or not 0 <= e["value"] <= 1:
        return f"metric must be one of {METRICS} and value a fraction in [0, 1]"
    if e["stage"] not in STAGES:
        return f"stage must be one of {STAGES}, got {e['stage']!r}"
    kind = e["class"]
    if kind not in CLASSES:
        return f"class must be one of {CLASSES}, got {kind!r}"
    if kind == "reported":
        if not e.get("why") or any(k in e for k in (*_CLAIM_ONLY, "deviations", "record", "machine")):
            return ("a reported entry says `why` it is not beside a column and claims no setting (no protocol, run, "
                    "train, deviations, record or machine)")
        if "backbone" in e and "network" in e:
            return "a reported entry names a registry `backbone` or another `network`, not both"
        return None
    if e["stage"] != "frozen backbone" or not e.get("backbone") or "why" in e or "network" in e:
        return (f"a {kind} entry is measured on a frozen backbone (stage; a number whose stage is unstated or "
                "another can only be reported) and names its backbone; it has no `why`")
    proto = e.get("protocol")
    if not isinstance(proto, dict) or set(proto) - _PROTOCOL_KEYS or not {"name", "version"} <= set(proto):
        return f"a {kind} entry names its protocol with {sorted(_PROTOCOL_KEYS)} (name and version required)"
    if set(e.get("run") or {}) - _RUN_KEYS:
        return f"run may set only {sorted(_RUN_KEYS)}"
    train = e.get("train")
    if train is not None and (not isinstance(train, dict) or set(train) - _TRAIN_KEYS or "split" not in train):
        return f"train names the split the paper fit on or retrieved from, and optionally its n_images: {_TRAIN_KEYS}"
    if kind == "same-protocol":
        devs = e.get("deviations")
        if not (isinstance(devs, list) and devs and all(isinstance(d, str) and d for d in devs)) or "record" in e:
            return ("a same-protocol entry lists every known deviation of the published run from our preset "
                    "(`deviations`: a non-empty list of texts) and names no record")
    if kind == "reproduced":
        key, machine = e.get("record"), e.get("machine")
        if not (isinstance(key, str) and len(key) == 16 and all(c in "0123456789abcdef" for c in key)) or \
                not machine or "deviations" in e:
            return ("a reproduced entry names the record that reproduced it (`record`: its 16-hex key) and the "
                    "`machine` it ran on")
    try:
        made = Claim.of_entry(e).protocol_made()
    except SegbenchError as err:
        return f"its protocol does not resolve: {err}"
    if (made.train_split_wanted() is not None) != (train is not None):
        return (f"protocol '{made.name}' " + ("reads a train split, so the entry states `train` (split, n_images)"
                                              if train is None else "reads no train split: drop `train`"))
    return None


def load_published(path: Path = PUBLISHED) -> list[dict]:
    """The validated entries of published.yaml (this module's docstring for the classes and their fields)."""
    if not Path(path).is_file():
        if path != PUBLISHED:
            raise PublishedError(f"published numbers file {path} not found: pass an existing file to --published")
        return []
    doc = yamlload.load(Path(path).read_text(), str(path))
    if not isinstance(doc, dict) or not isinstance(doc.get("published"), list):
        raise PublishedError(f"{path}: expected a top-level list 'published'")
    for n, e in enumerate(doc["published"], 1):
        problem = "must be a mapping" if not isinstance(e, dict) else _problem(e)
        if problem:
            raise PublishedError(f"{path} entry #{n}: {problem}")
    return doc["published"]


def published_for(rec: Record, published: list[dict]) -> dict | None:
    """The reproduced or same-protocol entry whose claim `rec` matches, or None."""
    for entry in published:
        if entry["class"] != "reported" and Claim.of_entry(entry).matches(rec):
            return entry
    return None


def reported_for(dataset: str, split: str, published: list[dict]) -> list[dict]:
    """Reported entries of a dataset split: context for its page."""
    return sorted((e for e in published if e["class"] == "reported" and (e["dataset"], e["split"]) ==
                   (dataset, split)), key=lambda e: (e["method"], e.get("backbone") or "", e["metric"], e["value"]))


def measured_network(entry: dict) -> str:
    """What a number was measured on, for tables: the registry backbone, another network, or '–'."""
    return entry.get("backbone") or entry.get("network") or "–"


def published_text(rec: Record, entry: dict) -> str:
    """The published number beside ours: value, metric where not mIoU, its class's mark, and the difference."""
    ours = rec.metrics[entry["metric"]]["mean"]
    what = "" if entry["metric"] == "miou" else f" {entry['metric']}"
    return f"{100 * entry['value']:.1f}{MARKS[entry['class']]}{what} ({100 * (ours - entry['value']):+.1f})"


def footnote(entry: dict) -> str:
    """What stands behind a published number's mark: the record that reproduced it, or the known deviations."""
    if entry["class"] == "reproduced":
        return (f"✓ {entry['method']}, {entry['source']}: reproduced by record {entry['record']} on "
                f"{entry['machine']}")
    return (f"† {entry['method']} ({entry['backbone']}), {entry['source']}: same protocol, not reproduced; known "
            "deviations of the published run: " + "; ".join(entry["deviations"]))
