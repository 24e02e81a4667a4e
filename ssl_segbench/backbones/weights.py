"""A checkpoint's weights: which files hold them, their digests, its JSON files read strictly, and the check that the
tensors a library loaded fit the model it built.

Left to themselves, both libraries fill a model leniently: transformers initialises every tensor the checkpoint lacks
at random and only prints a report; timm loads non-strictly whenever it drops a classifier. A checkpoint whose keys
carry a training wrapper's prefix, or that lacks a block, or a config.json of another size than the weights, would
then score a random network. Here every missing, unexpected or differently shaped tensor is a `BackboneError` naming
the first keys, their number, the files and the fix.

What is compared is the checkpoint as each library hands it to the model, after its own documented key handling:

- transformers (`from_pretrained(..., output_loading_info=True)`): its `base_model_prefix` (a checkpoint saved from a
  model with a head, e.g. keys `dinov2.*`, loaded as the base model), its renames of legacy key names, and its
  `_keys_to_ignore_on_load_missing/unexpected` patterns (buffers it initialises itself, such as position ids). Then
  only modules this benchmark never reads may be absent (`pooler.*`, the pooled output) or extra (`classifier.*`, an
  image classifier's head; and for a dual encoder (CLIP, SigLIP) loaded as its vision tower, the text tower, the
  projections and the logit scale and bias). Every tensor of the vision encoder must come from the checkpoint.
- timm (`create_model(pretrained=True)`, hf-hub and local-dir): `load_state_dict`'s unwrapping (`state_dict` / `model`
  / EMA entries, `module.` and `_orig_mod.` prefixes), the architecture's `checkpoint_filter_fn` (original-format
  conversions, an OpenCLIP checkpoint's `visual.trunk.` kept and the rest dropped, position embeddings resampled to
  the model's grid) and the removal of a classifier the model was built without. Nothing else is allowed.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from ..fingerprint import Manifest, content_sha256
from .base import BackboneError

# files either library reads tensors from (safetensors, pickled torch, timm's big_vision npz); shard indexes are JSON
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".pth.tar", ".ckpt", ".npz")
# JSON files the libraries read besides the weights
CONFIG_FILES = ("config.json", "preprocessor_config.json")
_SHOWN = 3  # keys named in a message
# transformers keys of modules the features never pass through (see the module docstring)
HF_ABSENT_OK = ("pooler.",)
HF_EXTRA_OK = ("classifier.",)
DUAL_ENCODER_EXTRA_OK = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias",
                         "temperature")  # temperature: TIPSv2's logit temperature


def weight_files(directory: Path) -> list[Path]:
    """Every file directly in a checkpoint directory that holds weights (the libraries read no subfolder): a superset
    of what the loader reads when several formats were downloaded, so the one it used is always among them."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def describe_weights(directory: Path | None) -> str:
    """The weight file(s) of a checkpoint directory, for messages."""
    if directory is None:
        return "the checkpoint's weights"
    files = weight_files(directory)
    if len(files) == 1:
        return str(files[0])
    return f"the weights in {directory}" + (f" ({', '.join(f.name for f in files)})" if files else "")


def weights_sha256(directory: Path | None, what: str, files: list[Path] | None = None) -> dict[str, str] | None:
    """sha256 of each weight file of a checkpoint directory (file name → hex digest), read from the files, never from
    a loaded model. Each digest is remembered in the cache while its file is unchanged (`fingerprint.Manifest`), so a
    large checkpoint is read once per machine, not once per run. None when no weight file is here. `files`: only these
    files of `directory` (a training checkpoint beside the run's other epochs)."""
    if files is None:
        files = weight_files(directory) if directory is not None else []
    if not files:
        return None
    # hashes the files not yet remembered (with a progress bar) and stores their digests in the manifest
    content_sha256({"kind": "weights"}, [(f.name, f) for f in files], directory, f"the weights of {what}")
    manifest = Manifest(directory)
    return {f.name: manifest.digest(f) for f in files}


def read_json(path: Path, fix: str) -> dict:
    """A checkpoint's JSON file as a mapping; a truncated or invalid file is a BackboneError naming it and `fix`."""
    try:
        doc = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BackboneError(f"checkpoint file {path} is damaged: it is not valid JSON ({e}). To fix it, "
                            f"{fix}.") from None
    if not isinstance(doc, dict):
        raise BackboneError(f"checkpoint file {path} is damaged: it holds a JSON {type(doc).__name__}, not an object. "
                            f"To fix it, {fix}.")
    return doc


def verify_config_files(directory: Path, fix: str) -> None:
    """Parse the JSON files a library will read from a checkpoint directory (config, preprocessor config, shard
    indexes), so a damaged one is named here rather than failing deep inside the library."""
    for f in sorted(Path(directory).iterdir()):
        if f.is_file() and (f.name in CONFIG_FILES or f.name.endswith(".index.json")):
            read_json(f, fix)


def _some(keys: list[str]) -> str:
    more = f", … ({len(keys)} in all)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _prefix_fix(missing: list[str], unexpected: list[str]) -> str | None:
    """When every unexpected key starts with one prefix and, without it, they cover every missing key: strip it."""
    if not (missing and unexpected):
        return None
    first = unexpected[0]
    for cut in (i + 1 for i, c in enumerate(first) if c == "."):
        prefix = first[:cut]
        if all(k.startswith(prefix) for k in unexpected) and set(missing) <= {k[cut:] for k in unexpected}:
            return (f"every key that fits nowhere starts with '{prefix}' (as training wrappers save them) and would "
                    f"fit without it: strip that prefix, e.g. save {{k.removeprefix('{prefix}'): v for k, v in "
                    "state_dict.items()} with safetensors' save_file")
    return None


def refuse_misfit(missing, unexpected, mismatched, *, model: str, weights: str, config: str,
                  absent_ok: tuple[str, ...] = (), extra_ok: tuple[str, ...] = (), fix: str | None = None) -> None:
    """Raise a BackboneError when the checkpoint does not fit the model: `missing` keys (but those starting with one of
    `absent_ok`), `unexpected` keys (but those starting with one of `extra_ok`), `mismatched` (key, checkpoint shape,
    model shape) triples. `model`, `weights` and `config` name the model class and the files, for the message; `fix`
    replaces the advice written for checkpoint directories (their config.json)."""
    fix = fix or _prefix_fix(sorted(missing), sorted(unexpected))
    missing = sorted(k for k in missing if not k.startswith(absent_ok))
    unexpected = sorted(k for k in unexpected if not k.startswith(extra_ok))
    mismatched = sorted((k, tuple(a), tuple(b)) for k, a, b in mismatched)
    if not (missing or unexpected or mismatched):
        return
    found = []
    if missing:
        found.append(f"{len(missing)} tensor(s) of the model are missing from the checkpoint: {_some(missing)}")
    if unexpected:
        found.append(f"{len(unexpected)} tensor(s) of the checkpoint fit no place in the model: {_some(unexpected)}")
    if mismatched:
        shown = [f"{k} is {list(a)} in the checkpoint but {list(b)} in the model" for k, a, b in mismatched]
        found.append(f"{len(mismatched)} tensor(s) have another shape: {_some(shown)}")
    if fix is None and not (unexpected or mismatched):
        fix = (f"use a complete export of the weights (these tensors were not saved), or the config.json saved with "
               f"them if {config} describes a larger model")
    elif fix is None and not missing:
        fix = (f"use the config.json saved with these weights: {config} describes "
               f"{'fewer layers or modules' if unexpected else 'other widths'} than the weights hold")
    elif fix is None:
        fix = "use the config.json saved with these weights and an export that holds every tensor of the model"
    left = [what for what, there in (("the model's missing or reshaped tensors would stay random",
                                      missing or mismatched),
                                     ("the checkpoint's extra tensors would be dropped", unexpected)) if there]
    raise BackboneError(f"{weights} does not fit the {model} built from {config}: {'; '.join(found)}. Loaded anyway, "
                        f"{' and '.join(left)}, so the scores would not be this checkpoint's. To fix it, {fix}.")


def check_transformers_fit(model, info: dict, weights: str, config: str, vision_tower: bool) -> None:
    """Refuse a transformers model whose `from_pretrained(..., output_loading_info=True, ignore_mismatched_sizes=True)`
    report lists a missing, unexpected or mismatched tensor (see the module docstring for what is allowed)."""
    if info.get("error_msgs"):
        raise BackboneError(f"{weights} could not be loaded into the {type(model).__name__} built from {config}: "
                            f"{'; '.join(map(str, info['error_msgs']))[:500]}. To fix it, use the config.json saved "
                            "with these weights.")
    refuse_misfit(info.get("missing_keys", ()), info.get("unexpected_keys", ()), info.get("mismatched_keys", ()),
                  model=type(model).__name__, weights=weights, config=config, absent_ok=HF_ABSENT_OK,
                  extra_ok=HF_EXTRA_OK + (DUAL_ENCODER_EXTRA_OK if vision_tower else ()))


@contextlib.contextmanager
def checked_timm_load(weights: str, config: str):
    """While timm builds a model with `pretrained=True`, record the state dict its `load_pretrained` hands to
    `model.load_state_dict` (after timm's own filtering) and the model's own keys and shapes; on leaving, refuse a
    misfit (also when torch raised for it) and a load that bypassed `load_state_dict` (timm's custom loaders), whose
    tensors cannot be checked. timm's loader is looked up in its module at call time, so it is wrapped for the call."""
    from timm.models import _builder

    original = _builder.load_pretrained
    seen: dict = {}

    def observe(module, state_dict, prefix, *_):
        if not prefix:  # the root module: the whole state dict
            seen["found"] = {k: tuple(v.shape) for k, v in state_dict.items() if hasattr(v, "shape")}
            seen["expected"] = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            seen["model"] = type(module).__name__

    def load_pretrained(model, *args, **kwargs):
        handle = model.register_load_state_dict_pre_hook(observe)
        try:
            return original(model, *args, **kwargs)
        finally:
            handle.remove()

    def check():
        if not seen:
            return
        found, expected = seen["found"], seen["expected"]
        refuse_misfit(set(expected) - set(found), set(found) - set(expected),
                      [(k, found[k], expected[k]) for k in set(found) & set(expected) if found[k] != expected[k]],
                      model=f"timm {seen['model']}", weights=weights, config=config)

    _builder.load_pretrained = load_pretrained
    try:
        yield
    except Exception:
        check()  # torch raises for missing keys under strict loading and for any shape mismatch: name them here
        raise
    finally:
        _builder.load_pretrained = original
    if not seen:
        raise BackboneError(f"timm loaded {weights} without load_state_dict (a custom loader), so its tensors cannot "
                            "be checked against the model. To fix it, convert the checkpoint to timm's safetensors "
                            "layout (timm.models.push_to_hf_hub / save_for_hf) and load that.")
    check()
