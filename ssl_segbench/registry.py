"""The backbone registry: `backbones.yaml` validated into typed `BackboneSpec`s.

Every field that changes features (patch size, prefix tokens, normalisation, revision) is data, not code, and is checked
on load: an unknown key, a missing field or a bad value is an error naming the entry and the key.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import yamlload
from .errors import SegbenchError
from .paths import registry_override

_SHA = re.compile(r"^[0-9a-f]{40}$")


class RegistryError(SegbenchError):
    """backbones.yaml (or an ad-hoc backbone) is malformed; the message names the entry, the key and the file."""


@dataclass(frozen=True)
class BackboneSpec:
    """One pretrained checkpoint: where it lives and how its tokens must be read."""

    id: str
    loader: str
    repo_id: str
    revision: str | None
    patch_size: int
    embed_dim: int
    num_prefix_tokens: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    method: str
    paper: str | None
    license: str
    arch: str = ""
    num_layers: int | None = None
    num_heads: int | None = None
    image_size: int | None = None
    revision_source: str | None = None
    n_parameters: int | None = None
    notes: str | None = None
    family: str = "other"  # model family, for `list backbones --family`
    min_gpu_memory: int | None = None  # GiB a bf16 forward needs; set only where one 80 GB GPU is not enough
    gated: bool = False  # the Hub copy asks its users to accept a license first
    license_url: str | None = None  # the license page a gated checkpoint's users accept
    fixed_input: bool = False  # the model takes only image_size² input (position terms fixed to that grid)
    timm_model: str | None = None  # timm architecture to build for a repo of bare weights without timm's config


    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SHOWN_IN_FULL = 20  # name lists up to this long are printed in an unknown-name error; longer ones are pointed to


def did_you_mean(name: str, known: Iterable[str], listing: str) -> str:
    """The tail of an unknown-name error (backbone, dataset, protocol, preset): the close matches first (difflib), then
    every name where there are few, else their count and the command `listing` that lists them, so a typo never
    prints a whole registry."""
    known = list(known)
    close = [f"'{c}'" for c in difflib.get_close_matches(name, known, n=3, cutoff=0.6)]
    guess = ""
    if close:
        guess = f" Did you mean {', '.join(close[:-1]) + ' or ' + close[-1] if len(close) > 1 else close[0]}?"
    if len(known) <= SHOWN_IN_FULL:
        return f"{guess} Known: {', '.join(known) or 'none'} (`{listing}` describes them)"
    return f"{guess} Known: {len(known)} (`{listing}` lists them)"


_REQUIRED = {f.name for f in dataclasses.fields(BackboneSpec) if f.default is dataclasses.MISSING}
_ALL = {f.name for f in dataclasses.fields(BackboneSpec)}


def default_registry_path() -> Path:
    """$SSL_SEGBENCH_REGISTRY, else the registry shipped inside the package (`ssl_segbench/backbones.yaml`; the
    repository's top-level backbones.yaml is a link to it, so both name the one file that is edited)."""
    return registry_override() or Path(__file__).with_name("backbones.yaml")


@functools.cache
def loader_names() -> tuple[str, ...]:
    """The backbone loaders' names, read from the source of the backbones package: the `name` each class decorated
    `@register_loader` assigns (backbones/loader.py). Read, not imported: checking backbones.yaml must not import the
    loaders (torch, timm); tests/test_plugins.py checks that this gives the names the imported loaders register."""
    names = []
    for module in sorted(Path(__file__).with_name("backbones").glob("*.py")):
        for cls in ast.walk(ast.parse(module.read_text())):
            if isinstance(cls, ast.ClassDef) and any(getattr(d, "id", None) == "register_loader"
                                                     for d in cls.decorator_list):
                names += [line.value.value for line in cls.body if isinstance(line, ast.Assign)
                          and [getattr(t, "id", None) for t in line.targets] == ["name"]
                          and isinstance(line.value, ast.Constant)]
    return tuple(sorted(names))


def is_int(v) -> bool:
    """An integer that is not a bool (YAML and JSON give True where a count was meant)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """An int or float that is not a bool (the same reason)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate(entry: object, where: str) -> BackboneSpec:
    """Check every key's type strictly (a YAML `true` is not an integer, `123` is not a string) and build the spec."""
    if not isinstance(entry, dict):
        raise RegistryError(f"{where}: each entry must be a mapping, got {type(entry).__name__}")
    name = entry.get("id", "?")
    at = f"{where}: backbone '{name}'"
    unknown = set(entry) - _ALL
    if unknown:
        raise RegistryError(f"{at}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_ALL)}")
    missing = _REQUIRED - set(entry)
    if missing:
        raise RegistryError(f"{at}: missing key(s) {sorted(missing)}")

    def bad(key: str, why: str):
        return RegistryError(f"{at}, key '{key}': {why} (got {entry.get(key)!r})")

    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name):
        raise bad("id", "must be lowercase letters, digits, '_', '-', '.'")
    if entry["loader"] not in loader_names():
        raise bad("loader", f"must be one of {loader_names()}")
    if not isinstance(entry["repo_id"], str) or not entry["repo_id"]:
        raise bad("repo_id", "must be a non-empty string")
    rev = entry["revision"]
    if rev is not None and not isinstance(rev, str):
        raise bad("revision", "must be a commit sha, a tag, or null")
    if entry["loader"] != "builtin" and rev is not None and not _SHA.match(rev):
        raise bad("revision", "must be a full 40-hex commit sha (or null to record the one resolved from the cache)")
    for key in ("patch_size", "embed_dim"):
        if not is_int(entry[key]) or entry[key] <= 0:
            raise bad(key, "must be a positive integer")
    if not is_int(entry["num_prefix_tokens"]) or entry["num_prefix_tokens"] < 0:
        raise bad("num_prefix_tokens", "must be an integer >= 0 (CLS + registers)")
    for key in ("num_layers", "num_heads", "image_size", "n_parameters"):
        if entry.get(key) is not None and (not is_int(entry[key]) or entry[key] < 0):
            raise bad(key, "must be a non-negative integer or absent")
    for key in ("mean", "std"):
        v = entry[key]
        if not (isinstance(v, list) and len(v) == 3 and all(is_number(x) for x in v)):
            raise bad(key, "must be a list of 3 numbers")
        if key == "std" and min(v) <= 0:
            raise bad(key, "must be positive")
    for key in ("method", "license"):
        if not isinstance(entry[key], str) or not entry[key]:
            raise bad(key, "must be a non-empty string")
    for key in ("paper", "revision_source", "notes", "arch", "license_url", "timm_model"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise bad(key, "must be a string or null")
    if "family" in entry and not (isinstance(entry["family"], str) and re.fullmatch(r"[a-z0-9][a-z0-9_.-]*",
                                                                                    entry["family"])):
        raise bad("family", "must be a lowercase name")
    if entry.get("min_gpu_memory") is not None and (not is_int(entry["min_gpu_memory"]) or
                                                    entry["min_gpu_memory"] <= 0):
        raise bad("min_gpu_memory", "must be a positive number of GiB or absent")
    for key in ("gated", "fixed_input"):
        if key in entry and not isinstance(entry[key], bool):
            raise bad(key, "must be true or false")
    if entry.get("gated") and not entry.get("license_url"):
        raise bad("license_url", "a gated checkpoint names the license page its users accept")
    if entry.get("timm_model") is not None and entry["loader"] != "timm":
        raise bad("timm_model", "names a timm architecture, so the loader must be timm")
    if entry.get("fixed_input") and not entry.get("image_size"):
        raise bad("image_size", "a fixed-input model states its input size")
    values = dict(entry)
    values["mean"] = tuple(float(x) for x in entry["mean"])
    values["std"] = tuple(float(x) for x in entry["std"])
    if values.get("arch") is None:
        values.pop("arch", None)
    return BackboneSpec(**values)


def load_registry(path: str | Path | None = None) -> dict[str, BackboneSpec]:
    """Read and validate the registry: id → spec, in file order."""
    path = Path(path) if path else default_registry_path()
    if not path.is_file():
        raise RegistryError(f"backbone registry {path} not found (set SSL_SEGBENCH_REGISTRY or pass --registry)")
    try:
        doc = yamlload.load(path.read_text(), str(path))
    except yamlload.YAMLError as e:
        raise RegistryError(str(e)) from None
    if not isinstance(doc, dict) or set(doc) != {"backbones"} or not isinstance(doc["backbones"], list):
        raise RegistryError(f"{path}: expected one top-level key 'backbones' holding a list of entries")
    specs: dict[str, BackboneSpec] = {}
    for i, entry in enumerate(doc["backbones"]):
        spec = _validate(entry, f"{path} entry #{i + 1}")
        if spec.id in specs:
            raise RegistryError(f"{path}: backbone id '{spec.id}' appears twice")
        specs[spec.id] = spec
    return specs
