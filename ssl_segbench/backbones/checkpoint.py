"""Training checkpoints as backbones: `--backbone run/checkpoint.pth --arch vit_small_patch14_dinov2`.

What the official training code saves is a pickled dict around one or more state dicts: DINO and iBOT
`{"student", "teacher", "optimizer", "epoch", "args", ...}` (student keys `module.backbone.*` / `module.head.*`,
teacher `backbone.*` / `head.*`; iBOT's backbone adds `masked_embed`), DINOv2/DINOv3 `teacher_checkpoint.pth`
`{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}` with chunked blocks `blocks.<chunk>.<i>.*` (BlockChunk),
its trainer's `{"model": {"teacher.backbone.*", "student.backbone.*", ...}}`, MAE `{"model": {..., "decoder_*",
"mask_token"}}`, I-JEPA `{"encoder", "target_encoder", "predictor", ...}` (keys `module.*`). The backbone is taken out
by small pure steps, each recorded: which key set (`key_sets`, `choose_key_set`: the teacher / target encoder unless
`--checkpoint-key` says otherwise), which wrapper prefixes were stripped and which keys dropped (`backbone_state`), the
chunked block names flattened (`unchunk`). timm's own `checkpoint_filter_fn` of the architecture's module then converts
original names (DINOv2 registers, SwiGLU, position embeddings resampled to the model's grid), and the result must fit
`timm.create_model(arch)` exactly (`weights.refuse_misfit`). The revision is the file's sha256; the normalisation is
the architecture's timm `pretrained_cfg` (a training checkpoint states none) unless --mean/--std are given.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import sys
from pathlib import Path

import torch

from ..registry import BackboneSpec, did_you_mean
from .base import BackboneError
from .loader import Loader, loader_of, register_loader
from .timm_backbone import TimmBackbone, TimmLoader
from .weights import refuse_misfit, weights_sha256

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pth.tar", ".ckpt")
ARCH_EXAMPLES = "e.g. --arch vit_small_patch14_dinov2, vit_base_patch16_224 or vit_large_patch16_224"
# key sets in the order one is taken when the checkpoint holds several: the network the method evaluates first
PREFERRED = ("teacher", "target_encoder", "model", "state_dict", "student", "encoder")
WRAPPERS = ("module.", "_orig_mod.")  # DistributedDataParallel and torch.compile prefixes, on every key
BACKBONE_PREFIX = "backbone."  # DINO / iBOT / DINOv2: the backbone beside its heads
TRAINING_ONLY = ("masked_embed",)  # iBOT's mask token: the backbone's, but never used at inference
MAE_DECODER = ("decoder_", "mask_token")  # MAE: the decoder and its mask token, beside the encoder
_SHOWN = 5  # dropped keys named in the record
# what a training script pickles besides tensors (argparse options, paths); anything else is refused, not executed
SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath]


def is_checkpoint_file(name: str) -> bool:
    """Whether a --backbone value names a training checkpoint file (by its suffix; the file is checked on loading)."""
    return str(name).lower().endswith(CHECKPOINT_SUFFIXES)


def options_problem(backbone: str, arch: str | None, key: str | None, registry_entry: bool = False) -> str | None:
    """Why --arch / --checkpoint-key cannot apply to `backbone` (None: they can, or are not given): they describe a
    training checkpoint file, which every other backbone (registry entry, Hub id, directory) states for itself."""
    if (arch or key) and (registry_entry or not is_checkpoint_file(backbone)):
        return (f"--arch and --checkpoint-key apply to a training checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}), "
                f"not to backbone '{backbone}': leave them out")
    return None


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def key_sets(obj) -> dict[str, dict[str, torch.Tensor]]:
    """The state dicts a checkpoint holds, by name: a bare state dict is "(top level)", a dict's entries that are
    state dicts by their key, and one whose keys split into `teacher.*` and `student.*` (DINOv2's trainer saves the
    whole meta-architecture) into "<key>.teacher" and "<key>.student"."""
    found = {"(top level)": obj} if _is_state_dict(obj) else \
        {k: v for k, v in obj.items() if _is_state_dict(v)} if isinstance(obj, dict) else {}
    out = {}
    for name, sd in found.items():
        roots = {k.partition(".")[0] for k in sd}
        if {"teacher", "student"} <= roots:
            for role in ("teacher", "student"):
                out[f"{name}.{role}"] = {k[len(role) + 1:]: v for k, v in sd.items() if k.startswith(role + ".")}
        else:
            out[name] = sd
    return out


def choose_key_set(sets: dict, wanted: str | None, where: str) -> str:
    """The key set to read: `wanted` (--checkpoint-key), else the only one, else the first of PREFERRED by its last
    name part (teacher before student, I-JEPA's target encoder before its encoder)."""
    names = ", ".join(sets) or "none"
    if wanted is not None:
        if wanted not in sets:
            raise BackboneError(f"{where} has no state dict '{wanted}' (--checkpoint-key); it holds: {names}. To fix "
                                "it, name one of these with --checkpoint-key, or leave it out for the default "
                                f"({' > '.join(PREFERRED)})")
        return wanted
    if len(sets) == 1:
        return next(iter(sets))
    for pick in PREFERRED:
        if found := [n for n in sets if n.rpartition(".")[2] == pick]:
            return found[0]
    raise BackboneError(f"{where} holds {'no state dict' if not sets else 'several state dicts'} ({names}) and none "
                        f"is a known network ({', '.join(PREFERRED)}): name the one to read with --checkpoint-key")


def backbone_state(sd: dict) -> tuple[dict, list[str], list[str]]:
    """The backbone's tensors of one key set, with (prefixes stripped, keys dropped): wrapper prefixes on every key
    are stripped; where keys start with `backbone.`, those are the backbone and the rest (DINO heads) dropped; MAE's
    decoder and iBOT's mask embedding are dropped. Nothing else is touched."""
    stripped, dropped = [], []
    for prefix in WRAPPERS:
        if all(k.startswith(prefix) for k in sd):
            sd, stripped = {k[len(prefix):]: v for k, v in sd.items()}, stripped + [prefix]
    if any(k.startswith(BACKBONE_PREFIX) for k in sd):
        dropped += [k for k in sd if not k.startswith(BACKBONE_PREFIX)]
        sd, stripped = {k[len(BACKBONE_PREFIX):]: v for k, v in sd.items() if k.startswith(BACKBONE_PREFIX)}, \
            stripped + [BACKBONE_PREFIX]
    drop = TRAINING_ONLY + (MAE_DECODER if any(k.startswith("decoder_") for k in sd) else ())
    dropped += [k for k in sd if k.startswith(drop)]
    return {k: v for k, v in sd.items() if not k.startswith(drop)}, stripped, sorted(dropped)


def unchunk(sd: dict) -> tuple[dict, int]:
    """DINOv2's BlockChunk names `blocks.<chunk>.<i>.*` (i counts blocks over all chunks) → `blocks.<i>.*`, with the
    number of keys renamed."""
    out = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}
    return out, sum(a != b for a, b in zip(sd, out))


def read_checkpoint(path: Path):
    """The checkpoint's pickled object, read with torch's weights-only unpickler (tensors, containers, numbers, and
    the options objects training scripts save, SAFE_GLOBALS): a file that needs any other code to load is refused."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file raises from zipfile, pickle or torch alike
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        why = f"it pickles {code.group(1)}, which only running its code could load" if code else \
            f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        raise BackboneError(f"training checkpoint {path} could not be read with torch.load(weights_only=True): "
                            f"{why}. To fix it, save just the state dicts (torch.save({{'teacher': "
                            "ckpt['teacher']}, 'teacher.pth') where you trust the file), or copy it again if the "
                            "copy was interrupted.") from None


def _arch(arch: str | None, name: str) -> str:
    """The timm architecture named by --arch, checked against timm's list."""
    import timm

    if not arch:
        raise BackboneError(f"backbone '{name}' is a training checkpoint file: name the timm architecture its "
                            f"backbone was trained as with --arch ({ARCH_EXAMPLES}; `python -c \"import timm; "
                            "print(timm.list_models('vit_*'))\"` lists them)")
    if not timm.is_model(arch):
        tail = did_you_mean(arch, timm.list_models(), "python -c \"import timm; print(timm.list_models())\"")
        raise BackboneError(f"--arch '{arch}' is not a timm architecture.{tail}")
    return arch


def checkpoint_spec(name: str, arch: str | None, key: str | None) -> BackboneSpec:
    """A provisional spec for a training checkpoint named on the command line: the file (`repo_id`), its timm
    architecture (`timm_model`) and the key set asked for (`revision`, None: the default); the rest is filled from the
    built model (`open_checkpoint`)."""
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise BackboneError(f"backbone '{name}': no such training checkpoint file ({path}); the nearest existing "
                            f"folder is {next((p for p in path.parents if p.is_dir()), None)}")
    arch = _arch(arch, name)
    stem = next(path.name[:-len(s)] for s in CHECKPOINT_SUFFIXES if path.name.lower().endswith(s))
    return BackboneSpec(id=stem.lower(), loader="checkpoint", repo_id=str(path), revision=key, patch_size=1,
                        embed_dim=1, num_prefix_tokens=0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                        method="training checkpoint", paper=None, license="unknown", arch=arch, timm_model=arch)


def load_backbone_state(spec: BackboneSpec):
    """The timm model of `spec.timm_model` with the checkpoint's backbone loaded, and what was done to get it (the
    record's `checkpoint` block). Every tensor must fit: a missing, unexpected or reshaped one is refused by name."""
    import timm

    path = Path(spec.repo_id)
    sets = key_sets(read_checkpoint(path))
    used = choose_key_set(sets, spec.revision, str(path))
    sd, stripped, dropped = backbone_state(sets[used])
    sd, renamed = unchunk(sd)
    model = timm.create_model(spec.timm_model, pretrained=False, num_classes=0, dynamic_img_size=True)
    module = sys.modules[type(model).__module__]
    convert = getattr(module, "checkpoint_filter_fn", None)
    if convert is not None:
        sd = convert(sd, model)
    expected = model.state_dict()
    found = {k: tuple(v.shape) for k, v in sd.items()}
    refuse_misfit(set(expected) - set(found), set(found) - set(expected),
                  [(k, found[k], expected[k].shape) for k in set(found) & set(expected)
                   if found[k] != tuple(expected[k].shape)],
                  model=f"timm {spec.timm_model}", weights=f"{path} (key set '{used}')",
                  config=f"--arch {spec.timm_model}",
                  fix=(f"give the --arch its backbone was trained as ({ARCH_EXAMPLES}), or another key set with "
                       f"--checkpoint-key (this file holds: {', '.join(sets)})"))
    model.load_state_dict(sd, strict=True)
    facts = {"file": str(path), "arch": spec.timm_model, "key_set": used, "key_sets": list(sets),
             "stripped_prefixes": stripped, "dropped": {"count": len(dropped), "first": dropped[:_SHOWN]},
             "unchunked_block_keys": renamed,
             "converted_by": f"{module.__name__}.checkpoint_filter_fn" if convert is not None else None}
    return model, facts


def open_checkpoint(name: str, arch: str | None, key: str | None):
    """(spec, model, facts) of a training checkpoint file named on the command line: loaded once, its shape and the
    architecture's timm normalisation filled in, `revision` the key set used."""
    spec = checkpoint_spec(name, arch, key)
    model, facts = load_backbone_state(spec)
    cfg = model.pretrained_cfg or {}
    spec = dataclasses.replace(loader_of(spec).fill_spec(spec, model), revision=facts["key_set"],
                               id=f"{spec.id}.{facts['key_set']}", mean=tuple(map(float, cfg["mean"])),
                               std=tuple(map(float, cfg["std"])))
    return spec, model, {**facts, "sha256": loader_of(spec).weights_sha256(spec)[Path(spec.repo_id).name]}


@register_loader
class CheckpointLoader(Loader):
    """A training checkpoint file (`repo_id`) read as the timm architecture `timm_model`, key set `revision`: pinned
    by the file's sha256; its shape read from the built model."""

    name = "checkpoint"
    backbone_class = TimmBackbone
    shape_from_model = True

    def snapshot(self, spec):
        return None  # one file, not a checkpoint directory: its siblings (other epochs) are not its files

    def pin(self, spec):
        digest = self.weights_sha256(spec)[Path(spec.repo_id).name]
        return f"checkpoint:{spec.repo_id}#{spec.revision or 'default'}@{spec.timm_model}", f"sha256:{digest}"

    def weights_sha256(self, spec):
        path = Path(spec.repo_id)
        return weights_sha256(path.parent, spec.id, files=[path])

    def model(self, spec, snapshot):
        return load_backbone_state(spec)[0]

    def fill_spec(self, spec, model):
        return dataclasses.replace(TimmLoader().fill_spec(spec, model), arch=spec.timm_model)
