"""`Setting`: the identity of one measurement, built once by the runner, stored in its record, read by every reader.

A Setting names everything that can change a number: the backbone (id, loader source, revision; the input
normalisation where it did not come from the registry entry), the evaluation data (dataset id, split, content digest,
which covers the decoding options), the train data where a protocol fits on or retrieves from one (split and content
digest; split None when it used the evaluation images), the protocol (name, version, fully resolved parameters), the
layer and the seeds. Nothing else builds one from run inputs: the runner makes it (`runner.plan_setting`), a record
stores `identity()` and is read back with `Setting.of_record`.

What it alone produces:
- the record key (`key`, the digest of `identity()`) and path (`path`);
- the leaderboard column (`column`): everything but the backbone, so two records share a column, and `compare` pairs
  them, exactly when their Settings differ in the backbone alone; its header axes come from the protocol's declared
  `axes` (no protocol-specific branch outside the protocol);
- the published-entry match (`published.Claim.matches` compares a claim with it, field by field).

Parameters added to a protocol after records of it existed: a field of the protocol's `Params` made with
`protocols.base.added_param(default)` (dataclass field metadata) is left out of `params` while it holds that default,
the behaviour the older records measured (`Protocol.identity_params`, applied by `runner.plan_setting` and by
`published.Claim.params_for`); set to anything else it is in the identity, so in the key and the column. Older records
keep their keys, and every reader sees such a key absent exactly when the parameter was at its default (a protocol's
`axes` name it only when set). The record's `protocol.params` still lists every parameter.

Descriptive fields (the preset's name, the decoding options, K, the train split's size) name the column or serve the
published match without entering the key: the resolved parameters and the content digests already cover what they
change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .cache import json_digest
from .paths import inside, safe_component


@dataclass(frozen=True)
class Column:
    """A leaderboard column: a Setting without its backbone. `id` is a digest of what it holds; `axes` its
    (name, value, header text) triples: the static site filters columns by value, the header joins the texts (an axis
    at its usual value, such as no CRF or the last layer, has no text)."""

    id: str
    axes: tuple[tuple[str, str, str], ...]

    @property
    def label(self) -> str:
        return " · ".join(text for _, _, text in self.axes if text)

    def axis(self, name: str) -> str:
        """The value of one axis ('–' where this column has none of that name)."""
        return next((value for n, value, _ in self.axes if n == name), "–")


def unique_labels(columns) -> dict[str, str]:
    """column id → header, sorted by header, with the id appended where two different columns would read the same."""
    labels = {c.id: c.label for c in columns}
    out = {}
    for cid, label in sorted(labels.items(), key=lambda kv: (kv[1], kv[0])):
        clash = sum(1 for other in labels.values() if other == label) > 1
        out[cid] = f"{label} [{cid}]" if clash else label
    return out


@dataclass(frozen=True, eq=False)
class Setting:
    backbone: str
    source: str
    revision: str | None
    dataset: str
    split: str
    data_digest: str
    protocol: str
    version: str
    params: dict
    layer: int
    seeds: tuple[int, ...]
    normalisation: dict | None = None  # {mean, std} where not the registry entry's own
    train: dict | None = None  # {split, content_sha256} where the protocol reads train data
    preset: str | None = None  # descriptive: the preset's name
    decoding: dict = field(default_factory=dict)  # descriptive: options that change how masks become labels
    k: int | None = None  # descriptive: the number of clusters where the protocol resolved one
    train_images: int | None = None  # descriptive: the size of the train split, where there is one
    digest_field: str = "content_sha256"  # legacy v1 identities name the data by 'files_sha256'

    def __eq__(self, other) -> bool:
        return isinstance(other, Setting) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    # --- the key ------------------------------------------------------------------------------------------------
    def identity(self) -> dict:
        """The record's `identity` field: exactly what the key digests."""
        out = {"backbone": self.backbone, "source": self.source, "revision": self.revision, "dataset": self.dataset,
               "split": self.split, self.digest_field: self.data_digest, "protocol": self.protocol,
               "version": self.version, "params": self.params, "layer": self.layer, "seeds": list(self.seeds)}
        if self.normalisation is not None:
            out["normalisation"] = self.normalisation
        if self.train is not None:
            out["train"] = self.train
        return out

    @property
    def key(self) -> str:
        return json_digest(self.identity(), 16)

    def path(self, results_dir: Path) -> Path:
        """`<results>/<dataset>/<split>/<backbone>/<revision>/<protocol>@<version>/<key>.json`, every component made
        safe and the whole checked to stay inside `results_dir`."""
        rev = (self.revision or "none").replace("/", "_").replace(":", "-")
        parts = [self.dataset, self.split, self.backbone, rev, f"{self.protocol}@{self.version}"]
        return inside(results_dir, Path(*(safe_component(p) for p in parts), f"{self.key}.json"))

    @classmethod
    def of_identity(cls, identity: dict, preset: str | None = None, decoding: dict | None = None,
                    k: int | None = None, train_images: int | None = None) -> "Setting":
        """The Setting a stored identity states (the inverse of `identity()`)."""
        kind = "content_sha256" if "content_sha256" in identity else "files_sha256"
        return cls(backbone=identity["backbone"], source=identity["source"], revision=identity["revision"],
                   dataset=identity["dataset"], split=identity["split"], data_digest=identity.get(kind) or "",
                   protocol=identity["protocol"], version=str(identity["version"]), params=identity["params"],
                   layer=identity["layer"], seeds=tuple(identity["seeds"]), normalisation=identity.get("normalisation"),
                   train=identity.get("train"), preset=preset, decoding=dict(decoding or {}), k=k,
                   train_images=train_images, digest_field=kind)

    @classmethod
    def of_record(cls, rec) -> "Setting":
        """A record's Setting: its stored identity with the descriptive fields it also stores."""
        decoding = {"resize_masks": True} if rec.dataset.get("resize_masks") else {}
        policy = (rec.dataset.get("off_palette") or {}).get("policy", "refuse")
        if policy != "refuse":
            decoding["off_palette"] = policy
        return cls.of_identity(rec.identity, rec.protocol.get("preset"), decoding, rec.info.get("k"),
                               rec.info.get("train_images"))

    # --- the column -----------------------------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """'name' or 'name:preset', as given to --protocol."""
        return self.protocol + (f":{self.preset}" if self.preset else "")

    @property
    def column(self) -> Column:
        """Everything but the backbone: the column's id digests it, its axes name it."""
        ident = self.identity()
        for name in ("backbone", "source", "revision", "normalisation"):
            ident.pop(name, None)
        return Column(json_digest(ident, 8), tuple(self._axes()))

    def _axes(self):
        # lazy: start-up time (torch): records import setting
        from .protocols import PROTOCOLS  # the protocol declares its own header axes

        p = self.params
        yield "protocol", self.spec, f"{self.spec} v{self.version}"
        if self.k is not None:
            yield "k", str(self.k), f"K={self.k}"
        cls = PROTOCOLS.get(self.protocol) if self.protocol in PROTOCOLS else None
        for name, text in (cls.column_axes(p) if cls else {}).items():
            yield name, text, text
        yield "resolution", f"{p['resize']} {p['size']}", f"{p['resize']} {p['size']}"
        yield "eval", f"{p['eval_size']}²" if p.get("eval_size") else "input", \
            f"eval {p['eval_size']}²" if p.get("eval_size") else "eval at input res"
        crf = p.get("crf") and (f"T={p['crf_temperature']:g}" if "crf_temperature" in p else "on")
        yield "crf", crf or "off", f"CRF {crf}" if crf and crf != "on" else "CRF" if crf else ""
        yield "layer", str(self.layer), "" if self.layer == -1 else f"layer {self.layer}"
        if self.train is not None:
            split = self.train.get("split") or "the evaluation images"
            yield "train", split, f"train: {split}"
        if self.decoding:
            text = ", ".join(f"{k}={v}" for k, v in sorted(self.decoding.items()))
            yield "decoding", text, text
        yield "seeds", str(len(self.seeds)), f"{len(self.seeds)} seed" + ("s" if len(self.seeds) != 1 else "")
