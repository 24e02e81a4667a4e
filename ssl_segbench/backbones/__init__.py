"""Loading backbones: registry ids, `hf-hub:` timm ids, transformers repo ids and local directories.

Hub checkpoints are loaded through the libraries' own code paths (`timm.create_model("hf-hub:org/name@rev")`,
`AutoModel.from_pretrained(repo, revision=rev)`), so the Hugging Face cache, `HF_HUB_OFFLINE` and `HF_HUB_CACHE`
behave as users expect. Without HF_HUB_OFFLINE, a file the cache lacks is first asked for once (`hub.hub_file`): an
unreachable Hub is an error at once naming HF_HUB_OFFLINE=1, not after huggingface_hub's retries (5, about 25 s).
The commit actually used is read back from the cache's snapshot path and recorded. The loaded tensors must fit the
model exactly (`weights.py`), and each record lists the weight files' sha256.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ..registry import BackboneSpec, did_you_mean, is_number, load_registry
from .base import FACETS, Backbone, BackboneError
from .checkpoint import is_checkpoint_file, open_checkpoint, options_problem
from .hub import repair_hint, resolve_revision, verify_checkpoint_files
from .loader import LOADERS, NORMALISATION_FIX, loader_of
from .module import Adapter, in_memory_spec
from .weights import read_json

Normalisation = tuple[tuple[float, float, float], tuple[float, float, float]]  # (mean, std) per RGB channel
# helpers the loaders share; every other module of this package registers a loader (`@register_loader`)
SHARED_MODULES = ("base", "hub", "loader", "weights")
LOADERS.discover(__name__, shared=SHARED_MODULES)


def _library_model(spec: BackboneSpec, source: str):
    """The library's model of a checkpoint with its weights checked: its files first (`verify_checkpoint_files`),
    then the loaded tensors against the model. Any other failure while the files are here names them."""
    loader = loader_of(spec)
    snapshot = loader.snapshot(spec)
    if snapshot is not None:
        verify_checkpoint_files(snapshot, repair_hint(spec))
    try:
        return loader.model(spec, snapshot)
    except BackboneError:
        raise
    except Exception as e:  # noqa: BLE001 - torch, safetensors and the libraries raise many kinds
        if snapshot is None:
            raise
        files = ", ".join(sorted(p.name for p in snapshot.iterdir() if p.is_file())) or "no files"
        raise BackboneError(f"checkpoint {source} could not be loaded from {snapshot} ({files}): "
                            f"{type(e).__name__}: {str(e)[:300]}. If a download was interrupted, delete "
                            f"{snapshot} and download it again.") from e


def looks_like_path(name: str) -> bool:
    """A name meant as a filesystem path rather than a Hub id 'org/name[@rev]': it starts with '.', '/' or '~', has
    more than one slash, or its first part is a directory here."""
    repo = name.removeprefix("hf-hub:").partition("@")[0]
    first = repo.split("/")[0]
    return (name.startswith(("/", ".", "~")) or "\\" in name or repo.count("/") > 1 or repo.endswith("/")
            or (repo.count("/") == 1 and (not all(repo.split("/")) or Path(first).is_dir())))


def _adhoc_spec(name: str) -> BackboneSpec:
    """A provisional spec for a backbone named on the command line: a local directory, `hf-hub:org/name[@rev]` (timm)
    or `org/name[@rev]` (transformers). Shape facts are filled in by the loader (`Loader.fill_spec`), mean
    and std from its own files or the run options (`_normalisation`)."""
    base = dict(revision=None, patch_size=1, embed_dim=1, num_prefix_tokens=0, mean=(0.0, 0.0, 0.0),
                std=(1.0, 1.0, 1.0), method="ad-hoc", paper=None, license="unknown")  # mean/std: `_normalisation`
    path = Path(name).expanduser()
    if looks_like_path(name) and not path.is_dir():
        parent = next((p for p in path.resolve().parents if p.is_dir()), None)
        what = "is a file, not a checkpoint directory" if path.exists() else "no such directory"
        raise BackboneError(f"backbone '{name}': {what} ({path.resolve()}). A local checkpoint is a directory with "
                            f"config.json and the weights; the nearest existing folder is {parent}.")
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise BackboneError(f"{path} has no config.json: expected a transformers or timm checkpoint directory")
        adhoc_id = path.resolve().name.lower()
        if "architecture" in read_json(cfg_file, "replace it with the config.json saved with these weights"):  # timm
            return BackboneSpec(id=adhoc_id, loader="timm", repo_id=f"local-dir:{path.resolve()}", **base)
        return BackboneSpec(id=adhoc_id, loader="transformers", repo_id=str(path.resolve()), **base)
    repo, _, rev = name.removeprefix("hf-hub:").partition("@")
    if "/" not in repo:
        raise BackboneError(f"'{name}' is neither a registry id, a local directory, nor a Hub repo id 'org/name'")
    base["revision"] = rev or None
    return BackboneSpec(id=repo.replace("/", "__").lower(), loader=_hub_loader(name), repo_id=repo, **base)


def _hub_loader(name: str) -> str:
    """The loader a Hub id on the command line names: `hf-hub:org/name` is timm's, `org/name` transformers'."""
    return "timm" if name.startswith("hf-hub:") else "transformers"


def normalisation_problem(mean, std) -> str | None:
    """Why (mean, std) cannot normalise RGB input (None: they can): each must be 3 finite numbers, std above 0."""
    for key, v in (("mean", mean), ("std", std)):
        if not (isinstance(v, (list, tuple)) and len(v) == 3
                and all(is_number(x) and math.isfinite(x) for x in v)):
            return f"{key} {v!r} is not 3 finite numbers (one per RGB channel)"
    if min(std) <= 0:
        return f"std {list(std)!r} has a value <= 0"
    return None


def _normalisation(spec: BackboneSpec, snapshot: Path | None, name: str) -> tuple[Normalisation, str]:
    """The mean/std an ad-hoc checkpoint states in its own files, and where: the file and keys its loader names (a
    transformers checkpoint's `preprocessor_config.json` image_mean/image_std, a timm checkpoint's `config.json`
    pretrained_cfg mean/std), read from the local directory or the Hub cache snapshot (offline). A checkpoint that
    states none is refused: ImageNet values assumed for a model trained otherwise (SigLIP: 0.5) would give a wrong
    number silently."""
    loader = loader_of(spec)
    where, keys, file = loader.normalisation_where, loader.normalisation_keys, loader.normalisation_file
    path = snapshot / file if snapshot is not None else None
    if path is None or not path.is_file():
        local = Path(spec.repo_id.removeprefix("local-dir:")).is_dir()
        get = "" if local else f"run `hf download {spec.repo_id} {file}` (it is not in {snapshot or 'the cache'}), or "
        raise BackboneError(f"backbone '{name}': no normalisation (mean/std) found: the checkpoint has no {file}. "
                            f"To fix it, {get}{NORMALISATION_FIX}")
    cfg = loader.section(read_json(path, f"replace it with the {file} saved with these weights"), path, name)
    mean, std = (cfg.get(k) for k in keys)
    problem = "it has no " + " / ".join(k for k in keys if k not in cfg) if None in (mean, std) else \
        normalisation_problem(mean, std)
    if problem:
        raise BackboneError(f"backbone '{name}': no usable normalisation in {path} ({where}): {problem}. To fix it, "
                            f"correct {file}, or {NORMALISATION_FIX}")
    return (tuple(map(float, mean)), tuple(map(float, std))), f"{where} ({path})"


def registry_match(name: str, registry: dict[str, BackboneSpec]) -> BackboneSpec | None:
    """The registry entry a Hub id names: same repo and loader kind (`hf-hub:org/name` for timm, `org/name` for
    transformers), and no revision or the entry's pinned one. Another revision is another checkpoint: it stays
    ad-hoc and is normalised from its own files, never from the entry's facts."""
    if looks_like_path(name) or Path(name).expanduser().exists():
        return None
    repo, _, rev = name.removeprefix("hf-hub:").partition("@")
    return next((s for s in registry.values() if (s.loader, s.repo_id) == (_hub_loader(name), repo)
                 and (not rev or rev == s.revision)), None)


class BackboneRef:
    """A backbone named and pinned but not yet loaded: `spec`, `source` and the resolved `revision` are known without
    reading weights (except for ad-hoc timm checkpoints, whose shape is only known from the model), so a feature-cache
    hit never loads or runs the model."""

    def __init__(self, name, registry_path=None, normalisation: Normalisation | None = None,
                 arch: str | None = None, checkpoint_key: str | None = None):
        """`name`: a registry id or --backbone string, or an in-memory model object (`backbones/module.py`).
        `normalisation`: (mean, std) stated by the user (`--mean/--std`), replacing the registry's or the
        checkpoint's. `normalisation_source` says where the spec's mean/std came from; `note` is a line for the
        console when a Hub id was read as a registry entry. `arch` / `checkpoint_key`: the timm architecture and key
        set of a training checkpoint file (`checkpoint.py`), whose extraction facts `checkpoint` holds."""
        self._model = None
        self._loaded: dict[str, Backbone] = {}
        self.note = None
        self.facets = None  # the facets it gives where not every facet its spec allows: an Adapter's
        self.checkpoint = None
        if not isinstance(name, str):  # the object is the model; its identity is its state dict's digest
            self._model = name
            self.facets = name.facets if isinstance(name, Adapter) else None
            self.spec, self.normalisation_source = in_memory_spec(name, normalisation, normalisation_problem)
            self.source, self.revision = loader_of(self.spec).pin(self.spec)
            return
        registry = load_registry(registry_path)
        spec = registry.get(name)
        self.normalisation_source = "registry"
        if spec is None and (spec := registry_match(name, registry)) is not None:
            self.note = (f"backbone '{name}' is the registry entry '{spec.id}': its pin and facts (normalisation "
                         "included) are used")
        if problem := options_problem(name, arch, checkpoint_key, registry_entry=spec is not None):
            raise BackboneError(problem)
        if spec is None and is_checkpoint_file(name):
            spec, self._model, self.checkpoint = open_checkpoint(name, arch, checkpoint_key)
            self.normalisation_source = f"timm pretrained_cfg of {spec.arch}"
        elif spec is None:
            if not (Path(name).expanduser().exists() or "/" in name or looks_like_path(name)):
                listing = "ssl-segbench list backbones" + (f" --registry {registry_path}" if registry_path else "")
                raise BackboneError(f"unknown backbone '{name}'.{did_you_mean(name, registry, listing)}; or give a "
                                    "local checkpoint directory, 'hf-hub:org/name[@rev]' (timm) or 'org/name[@rev]' "
                                    "(transformers)")
            spec = _adhoc_spec(name)
            loader = loader_of(spec)
            snapshot = loader.snapshot(spec)
            own = None if normalisation is not None or snapshot is None else _normalisation(spec, snapshot, name)
            if loader.shape_from_model:
                self._model = _library_model(spec, name)
            elif snapshot is not None:
                verify_checkpoint_files(snapshot, repair_hint(spec))
            spec = loader.fill_spec(spec, self._model)
            if normalisation is None:  # not cached: the loaders above gave the offline message already
                (mean, std), self.normalisation_source = own or _normalisation(spec, snapshot, name)
                spec = dataclasses.replace(spec, mean=mean, std=std)
        if normalisation is not None:
            spec = dataclasses.replace(spec, mean=tuple(normalisation[0]), std=tuple(normalisation[1]))
            self.normalisation_source = "--mean/--std"
        self.spec = spec
        self.source, self.revision = loader_of(spec).pin(spec)

    def weights_sha256(self) -> dict[str, str] | None:
        """sha256 of each weight file of the checkpoint (file name → hex digest), for the record's provenance: read
        from the files (a feature-cache hit never loads the model) and remembered per file in the cache, so a large
        checkpoint is hashed once per machine. None for the weight-free builtins (a random-init baseline's seed is its
        `revision`) and for a Hub checkpoint whose weights are not in this machine's cache."""
        if not hasattr(self, "_weights_sha256"):
            self._weights_sha256 = loader_of(self.spec).weights_sha256(self.spec)
        return self._weights_sha256

    def load(self, device: str | torch.device = "cpu") -> Backbone:
        """The frozen model on `device`, loaded once per reference and device (the feature pass, crop passes and
        augmented training of one run share it). A damaged checkpoint file, or weights that do not fit the model
        built from its config (missing, unexpected or differently shaped tensors), is an error naming the files and
        the fix."""
        if str(device) not in self._loaded:
            self._loaded[str(device)] = self._load(device)
        return self._loaded[str(device)]

    def _load(self, device: str | torch.device) -> Backbone:
        spec = self.spec
        model = self._model if self._model is not None else _library_model(spec, self.source)
        backbone = loader_of(spec).backbone(spec, self.source, self.revision, model)
        for p in backbone.parameters():
            p.requires_grad_(False)
        return backbone.eval().to(device)


def load_backbone(name: str, device: str | torch.device = "cpu", registry_path=None) -> Backbone:
    """Registry id or ad-hoc name → a frozen Backbone on `device`."""
    return BackboneRef(name, registry_path).load(device)


__all__ = ["FACETS", "Adapter", "Backbone", "BackboneError", "BackboneRef", "load_backbone", "normalisation_problem",
           "registry_match", "resolve_revision"]
