"""Loading backbones: registry ids, `hf-hub:` timm ids, transformers repo ids and local directories.

Hub checkpoints are loaded through the libraries' own code paths (`timm.create_model("hf-hub:org/name@rev")`,
`AutoModel.from_pretrained(repo, revision=rev)`), so the Hugging Face cache, `HF_HUB_OFFLINE` and `HF_HUB_CACHE`
behave as users expect. Without HF_HUB_OFFLINE, a file the cache lacks is first asked for once (`_hub_file`): an
unreachable Hub is an error at once naming HF_HUB_OFFLINE=1, not after huggingface_hub's retries (5, about 25 s).
The commit actually used is read back from the cache's snapshot path and recorded. The loaded tensors must fit the
model exactly (`weights.py`), and each record lists the weight files' sha256.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from ..fingerprint import content_sha256
from ..paths import hub_offline
from ..registry import BackboneSpec, did_you_mean, is_number, load_registry
from .base import FACETS, Backbone, BackboneError
from .builtin import PixelsBackbone, random_init_model
from .hf_backbone import VISION_TOWERS, HFBackbone, hf_spec_fields, model_class
from .timm_backbone import TimmBackbone
from .weights import (
    check_transformers_fit,
    checked_timm_load,
    describe_weights,
    read_json,
    verify_config_files,
    weights_sha256,
)

Normalisation = tuple[tuple[float, float, float], tuple[float, float, float]]  # (mean, std) per RGB channel
NORMALISATION_FIX = ("state it with the run options --mean R,G,B --std R,G,B (the values the checkpoint was trained "
                     "with), or add the checkpoint to the registry (backbones.yaml, keys mean and std)")


# exception class names that mean "no connection" (httpx, httpx2 and requests alike), as opposed to an answer from the
# Hub (not found, gated, unauthorised); LocalEntryNotFoundError is huggingface_hub's own "unreachable and not cached"
_UNREACHABLE = ("ConnectError", "ConnectionError", "TransportError", "Timeout", "TimeoutError", "TimeoutException",
                "LocalEntryNotFoundError")


def _unreachable(err: BaseException | None) -> bool:
    """Whether a Hub failure, or one it was raised from (transformers wraps the Hub's errors), is a failed
    connection."""
    seen = 0
    while err is not None and seen < 5:
        if any(c.__name__ in _UNREACHABLE for c in type(err).__mro__):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _offline_hint(repo_id: str, revision: str | None, err: Exception,
                  spec: BackboneSpec | None = None) -> BackboneError:
    """The error for a Hub checkpoint the cache lacks, worded by why it could not be fetched: HF_HUB_OFFLINE set, the
    Hub not reachable (then how to run from a cached copy with HF_HUB_OFFLINE=1 and HF_HUB_CACHE), or the Hub's own
    answer (a mistyped repo or revision, a private or gated repo)."""
    from huggingface_hub import constants

    where = f"{repo_id}@{revision}" if revision else repo_id
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    cached = f"not in the Hugging Face cache (HF_HUB_CACHE={constants.HF_HUB_CACHE})"
    copy = (f"point HF_HUB_CACHE at a cache that holds it (run `{download}` on a machine with network and copy that "
            "cache here)")
    if hub_offline():
        why = (f"it is {cached} and HF_HUB_OFFLINE is set, so the Hub was not asked. To fix it, {copy}, or unset "
               "HF_HUB_OFFLINE to download it.")
    elif _unreachable(err):
        why = (f"the Hugging Face Hub ({constants.ENDPOINT}) could not be reached and the checkpoint is {cached}. "
               f"To work without network, {copy} and set HF_HUB_OFFLINE=1, so that no connection is tried.")
    else:
        why = (f"it is {cached} and the Hub did not serve it: check the repo id and revision; a private or gated "
               "repo needs `hf auth login` first.")
    gated = ""
    if spec is not None and spec.gated:
        gated = (f" The Hub copy is gated ({spec.license}): accept its license at {spec.license_url} while logged in "
                 f"to the Hub, then `hf auth login` with a token of that account, then `{download}`.")
    return BackboneError(f"checkpoint {where} could not be loaded: {why}{gated}\n({type(err).__name__}: {err})")


def verify_checkpoint_files(directory: Path, fix: str = "replace it with a complete copy") -> None:
    """Check every safetensors file of a checkpoint directory against its own header (JSON length, then the byte
    range of every tensor) and parse its JSON files: a truncated or damaged download is named here, before a library
    fails deep inside."""
    verify_config_files(directory, fix)
    for f in sorted(Path(directory).glob("*.safetensors")):
        size = f.stat().st_size
        problem = None
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or 8 + n > size:
                problem = f"it has {size} bytes, too few for its header"
            else:
                try:
                    header = json.loads(fh.read(n))
                    end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
                except (ValueError, KeyError, TypeError, IndexError):
                    problem = "its header is not valid safetensors JSON"
                else:
                    if size < 8 + n + end:
                        problem = f"it has {size} bytes but its header declares {8 + n + end} (truncated)"
        if problem:
            raise BackboneError(f"checkpoint file {f} is damaged: {problem}. To fix it, {fix}.")


def _repair_hint(spec: BackboneSpec) -> str:
    if Path(spec.repo_id.removeprefix("local-dir:")).is_dir():
        return "replace it with a complete copy of the checkpoint"
    rev = f" --revision {spec.revision}" if spec.revision else ""
    return f"delete it and download the checkpoint again: `hf download {spec.repo_id}{rev}`"


def _snapshot_dir(spec: BackboneSpec) -> Path | None:
    """The directory holding a checkpoint's files: the local directory, or the Hub cache snapshot (None for the
    builtins, or when the cache does not have it)."""
    if spec.loader == "builtin" or spec.repo_id.startswith("random-init:"):
        return None
    local = Path(spec.repo_id.removeprefix("local-dir:"))
    if local.is_dir():
        return local
    try:
        return _hub_file(spec.repo_id, "config.json", spec.revision, spec).parent
    except BackboneError:  # the Hub could not be reached: said now, not after the library's own retries
        raise
    except Exception:  # noqa: BLE001 - not cached: the loader's own offline message explains it
        return None


def _hub_file(repo_id: str, filename: str, revision: str | None, spec: BackboneSpec | None = None) -> Path:
    """One file of a Hub checkpoint through the Hugging Face cache (`hf_hub_download`). A file the cache lacks is
    first asked for with one metadata request, which huggingface_hub makes without retrying: when the Hub cannot be
    reached, that is the error at once (`_offline_hint`), instead of the library's 5 retries with backoff (about
    25 s) for each missing file. Under HF_HUB_OFFLINE the library contacts no one, so there is nothing to ask."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

    if not hub_offline() and try_to_load_from_cache(repo_id, filename, revision=revision) is None:
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision))
        except Exception as e:  # noqa: BLE001 - an answer (not found, gated) is left to hf_hub_download's own error
            if _unreachable(e):
                raise _offline_hint(repo_id, revision, e, spec) from e
    return Path(hf_hub_download(repo_id, filename, revision=revision))


def resolve_revision(repo_id: str, revision: str | None, filename: str = "config.json",
                     spec: BackboneSpec | None = None) -> str:
    """The commit sha the cache serves for (repo_id, revision), from the snapshot path of one of its files (`spec`:
    the registry entry, for the gated-license hint)."""
    return _hub_file(repo_id, filename, revision, spec).parent.name


def _is_hub_error(e: Exception) -> bool:
    mod = type(e).__module__ or ""
    return isinstance(e, OSError) or mod.startswith("huggingface_hub") or "NotFound" in type(e).__name__


def _config_name(spec: BackboneSpec, snapshot: Path | None) -> str:
    """The config file a checkpoint's model is built from, for messages."""
    return str(snapshot / "config.json") if snapshot is not None else f"the config.json of {spec.repo_id}"


def _create_timm(name: str, weights: str, config: str, **kwargs):
    """timm.create_model with position embeddings that follow the input size (`dynamic_img_size`), for the
    architectures that have it; the others (BEiT: a relative position bias fixed to its grid) take their native size
    only, and the backbone says so when given another. The loaded tensors must fit the model (`checked_timm_load`)."""
    import timm

    with checked_timm_load(weights, config):
        try:
            return timm.create_model(name, pretrained=True, num_classes=0, dynamic_img_size=True, **kwargs)
        except TypeError as e:
            if "dynamic_img_size" not in str(e):
                raise
        return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)


def _timm_model(spec: BackboneSpec, snapshot: Path | None):
    """A timm checkpoint: Hub (timm's own layout, or bare weights read into the registry's `timm_model`), local
    directory (its files in `snapshot`) or seeded random init."""
    if spec.repo_id.startswith("random-init:"):
        seed = int((spec.revision or "seed0").removeprefix("seed"))
        return random_init_model(spec.repo_id.removeprefix("random-init:"), seed)
    where = describe_weights(snapshot), _config_name(spec, snapshot)
    if spec.repo_id.startswith("local-dir:"):
        return _create_timm(spec.repo_id, *where)
    hub_id = spec.repo_id + (f"@{spec.revision}" if spec.revision else "")
    config = snapshot / "config.json" if snapshot is not None else None
    if not spec.timm_model and config is not None and config.is_file() \
            and "architecture" not in read_json(config, _repair_hint(spec)):
        raise BackboneError(f"{config} is not a timm config (it names no 'architecture'), so timm cannot build "
                            f"hf-hub:{hub_id}. If the repo holds bare weights of a timm architecture, name it in the "
                            f"registry entry's timm_model (e.g. timm_model: vit_base_patch16_224); otherwise load it "
                            f"with its own library.")
    try:
        if spec.timm_model:  # bare weights without timm's config: timm's architecture, the repo's weights
            return _create_timm(spec.timm_model, *where, pretrained_cfg_overlay={"hf_hub_id": hub_id})
        return _create_timm(f"hf-hub:{hub_id}", *where)
    except Exception as e:  # the hub raises several unrelated types for "not cached"
        if _is_hub_error(e):
            raise _offline_hint(spec.repo_id, spec.revision, e, spec) from e
        raise


def _hf_config(spec: BackboneSpec):
    """The transformers config of a checkpoint; one transformers cannot build (values that contradict each other) is
    a BackboneError naming the file."""
    from transformers import AutoConfig

    local = Path(spec.repo_id).is_dir()
    try:
        return AutoConfig.from_pretrained(spec.repo_id, revision=None if local else spec.revision)
    except Exception as e:
        if not local and _is_hub_error(e):
            raise _offline_hint(spec.repo_id, spec.revision, e, spec) from e
        raise BackboneError(f"{_config_name(spec, _snapshot_dir(spec))} is not a configuration transformers can build "
                            f"({type(e).__name__}: {str(e)[:300]}). To fix it, use the config.json saved with these "
                            "weights.") from e


def _transformers_model(spec: BackboneSpec, snapshot: Path | None):
    """A transformers checkpoint: Hub repo or local directory (its files in `snapshot`), loaded strictly."""
    local = Path(spec.repo_id).is_dir()
    config = _hf_config(spec)
    cls = model_class(config)
    try:
        model, info = cls.from_pretrained(spec.repo_id, revision=None if local else spec.revision,
                                          output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:
        if not local and _is_hub_error(e):
            raise _offline_hint(spec.repo_id, spec.revision, e, spec) from e
        raise
    check_transformers_fit(model, info, describe_weights(snapshot), _config_name(spec, snapshot),
                           vision_tower=config.model_type in VISION_TOWERS)
    return model


def _library_model(spec: BackboneSpec, source: str):
    """The library's model of a checkpoint with its weights checked: its files first (`verify_checkpoint_files`),
    then the loaded tensors against the model. Any other failure while the files are here names them."""
    snapshot = _snapshot_dir(spec)
    if snapshot is not None:
        verify_checkpoint_files(snapshot, _repair_hint(spec))
    try:
        return _transformers_model(spec, snapshot) if spec.loader == "transformers" else _timm_model(spec, snapshot)
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
    or `org/name[@rev]` (transformers). Shape facts are filled in from the checkpoint's config (`_fill_spec`), mean
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
    loader = "timm" if name.startswith("hf-hub:") else "transformers"
    return BackboneSpec(id=repo.replace("/", "__").lower(), loader=loader, repo_id=repo, **base)


def _fill_spec(spec: BackboneSpec, model=None) -> BackboneSpec:
    """Complete an ad-hoc spec's shape from the checkpoint: the transformers config (no weights needed) or the timm
    model."""
    if spec.loader == "transformers":
        fields = hf_spec_fields(_hf_config(spec))
    else:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        fields = {"patch_size": model.patch_embed.patch_size[0], "embed_dim": model.embed_dim,
                  "num_prefix_tokens": model.num_prefix_tokens, "num_layers": len(model.blocks),
                  "arch": cfg.get("architecture", "timm")}
    return dataclasses.replace(spec, **fields)


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
    """The mean/std an ad-hoc checkpoint states in its own files, and where: a transformers checkpoint's
    `preprocessor_config.json` (image_mean, image_std), a timm checkpoint's `config.json` pretrained_cfg (mean, std),
    read from the local directory or the Hub cache snapshot (offline). A checkpoint that states none is refused:
    ImageNet values assumed for a model trained otherwise (SigLIP: 0.5) would give a wrong number silently."""
    if spec.loader == "transformers":
        where, keys, file = "preprocessor_config.json", ("image_mean", "image_std"), "preprocessor_config.json"
    else:
        where, keys, file = "timm pretrained_cfg", ("mean", "std"), "config.json"
    path = snapshot / file if snapshot is not None else None
    if path is None or not path.is_file():
        local = Path(spec.repo_id.removeprefix("local-dir:")).is_dir()
        get = "" if local else f"run `hf download {spec.repo_id} {file}` (it is not in {snapshot or 'the cache'}), or "
        raise BackboneError(f"backbone '{name}': no normalisation (mean/std) found: the checkpoint has no {file}. "
                            f"To fix it, {get}{NORMALISATION_FIX}")
    cfg = read_json(path, f"replace it with the {file} saved with these weights")
    if spec.loader == "timm":
        cfg = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), dict) else {}
    elif cfg.get("do_normalize") is False:
        raise BackboneError(f"backbone '{name}': {path} says do_normalize false, which this benchmark does not "
                            f"read as a normalisation. To fix it, {NORMALISATION_FIX} (0,0,0 and 1,1,1 for none)")
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
    loader = "timm" if name.startswith("hf-hub:") else "transformers"
    return next((s for s in registry.values() if s.loader == loader and s.repo_id == repo
                 and (not rev or rev == s.revision)), None)


def _local_revision(directory: Path) -> str:
    """Content identity of a local checkpoint directory: sha256 over its files' names and bytes (each file's digest
    remembered while the file is unchanged, as for datasets)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    digest = content_sha256({"kind": "checkpoint"}, [(f.relative_to(directory).as_posix(), f) for f in files],
                            directory, f"checkpoint {directory.name}")
    return "local-sha256:" + digest[:16]


class BackboneRef:
    """A backbone named and pinned but not yet loaded: `spec`, `source` and the resolved `revision` are known without
    reading weights (except for ad-hoc timm checkpoints, whose shape is only known from the model), so a feature-cache
    hit never loads or runs the model."""

    def __init__(self, name: str, registry_path=None, normalisation: Normalisation | None = None):
        """`normalisation`: (mean, std) stated by the user (`--mean/--std`), replacing the registry's or the
        checkpoint's. `normalisation_source` says where the spec's mean/std came from; `note` is a line for the
        console when a Hub id was read as a registry entry."""
        registry = load_registry(registry_path)
        spec = registry.get(name)
        self._model = None
        self._loaded: dict[str, Backbone] = {}
        self.note = None
        self.normalisation_source = "registry"
        if spec is None and (spec := registry_match(name, registry)) is not None:
            self.note = (f"backbone '{name}' is the registry entry '{spec.id}': its pin and facts (normalisation "
                         "included) are used")
        if spec is None:
            if not (Path(name).expanduser().exists() or "/" in name or looks_like_path(name)):
                listing = "ssl-segbench list backbones" + (f" --registry {registry_path}" if registry_path else "")
                raise BackboneError(f"unknown backbone '{name}'.{did_you_mean(name, registry, listing)}; or give a "
                                    "local checkpoint directory, 'hf-hub:org/name[@rev]' (timm) or 'org/name[@rev]' "
                                    "(transformers)")
            spec = _adhoc_spec(name)
            snapshot = _snapshot_dir(spec)
            own = None if normalisation is not None or snapshot is None else _normalisation(spec, snapshot, name)
            if spec.loader == "timm":
                self._model = _library_model(spec, name)
                spec = _fill_spec(spec, self._model)
            else:
                if snapshot is not None:
                    verify_checkpoint_files(snapshot, _repair_hint(spec))
                spec = _fill_spec(spec)
            if normalisation is None:  # not cached: the loaders above gave the offline message already
                (mean, std), self.normalisation_source = own or _normalisation(spec, snapshot, name)
                spec = dataclasses.replace(spec, mean=mean, std=std)
        if normalisation is not None:
            spec = dataclasses.replace(spec, mean=tuple(normalisation[0]), std=tuple(normalisation[1]))
            self.normalisation_source = "--mean/--std"
        self.spec = spec
        if spec.loader == "builtin":
            if spec.repo_id != "pixels" and not spec.repo_id.startswith("random-init:"):
                raise BackboneError(f"backbone '{spec.id}': unknown builtin '{spec.repo_id}' "
                                    "(use 'pixels' or 'random-init:<timm arch>')")
            self.source, self.revision = f"builtin:{spec.repo_id}", spec.revision
        elif spec.repo_id.startswith("local-dir:") or Path(spec.repo_id).is_dir():
            self.source = spec.repo_id
            self.revision = _local_revision(Path(spec.repo_id.removeprefix("local-dir:")))
        else:
            self.source = (f"hf-hub:{spec.repo_id}" if spec.loader == "timm" else spec.repo_id) + \
                (f"@{spec.revision}" if spec.revision else "")
            try:
                self.revision = resolve_revision(spec.repo_id, spec.revision, spec=spec)
            except Exception as e:
                if _is_hub_error(e):
                    raise _offline_hint(spec.repo_id, spec.revision, e, spec) from e
                raise

    def weights_sha256(self) -> dict[str, str] | None:
        """sha256 of each weight file of the checkpoint (file name → hex digest), for the record's provenance: read
        from the files (a feature-cache hit never loads the model) and remembered per file in the cache, so a large
        checkpoint is hashed once per machine. None for the weight-free builtins (a random-init baseline's seed is its
        `revision`) and for a Hub checkpoint whose weights are not in this machine's cache."""
        if not hasattr(self, "_weights_sha256"):
            self._weights_sha256 = weights_sha256(_snapshot_dir(self.spec), self.spec.id)
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
        if spec.repo_id == "pixels" and spec.loader == "builtin":
            backbone = PixelsBackbone(spec, self.source, self.revision)
        else:
            model = self._model if self._model is not None else _library_model(spec, self.source)
            cls = HFBackbone if spec.loader == "transformers" else TimmBackbone
            backbone = cls(model, spec, self.source, self.revision)
        for p in backbone.parameters():
            p.requires_grad_(False)
        return backbone.eval().to(device)


def load_backbone(name: str, device: str | torch.device = "cpu", registry_path=None) -> Backbone:
    """Registry id or ad-hoc name → a frozen Backbone on `device`."""
    return BackboneRef(name, registry_path).load(device)


__all__ = ["FACETS", "Backbone", "BackboneError", "BackboneRef", "load_backbone", "normalisation_problem",
           "registry_match", "resolve_revision"]
