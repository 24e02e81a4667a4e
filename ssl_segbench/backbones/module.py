"""In-memory models as backbones (`ssl_segbench.evaluate(model)`): a timm VisionTransformer / Eva object, a transformers
vision model object of a supported type, or any `nn.Module` behind an `Adapter` that states what the harness cannot
read from it. timm and transformers objects are wrapped by the same `TimmBackbone` / `HFBackbone` as their Hub
checkpoints, so they give the same tokens.

Identity: an object has no Hub commit, so its revision is the sha256 of its state dict (every tensor's name, dtype,
shape and bytes) and of the facts the harness was told or read (class, patch size, prefix tokens, width,
normalisation, the adapter's facets): two epochs of one model never share a feature-cache entry or a record key. The
model is used in place, not copied; `preserved` puts back its train/eval mode, `requires_grad` flags and device after
a run, so a training loop continues as it was.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

from ..digest import sha256_hex
from ..registry import BackboneSpec
from .base import FACETS, Backbone, BackboneError
from .hf_backbone import SUPPORTED_TYPES, HFBackbone, prefix_tokens_from_config, vision_config
from .loader import Loader, register_loader
from .timm_backbone import TimmBackbone
from .weights import read_json

GRID_FACETS = ("tokens", "keys", "queries")  # (B, h, w, D) outputs; cls is (B, D), attention (B, heads, h, w)


class Adapter:
    """Any `nn.Module` as a backbone: its patch size, input normalisation (mean, std per RGB channel), token width
    (`embed_dim`) and a `features(images) -> (B, h, w, D)` callable giving the patch tokens of a normalised batch
    (B, 3, H, W), h = H / patch_size. Protocols that read more take it from the optional callables: `cls(images) ->
    (B, D)`, `attn` / `attn_logits(images) -> (B, heads, h, w)` (the CLS query's attention over the patches, after /
    before the softmax), `keys` / `queries(images) -> (B, h, w, D)`; a protocol needing one that is not given is
    refused before any work. `name`: the backbone id in records (default: the module's class name)."""

    def __init__(self, module: torch.nn.Module, *, patch_size: int, mean, std, embed_dim: int, features,
                 cls=None, attn=None, attn_logits=None, keys=None, queries=None, name: str | None = None):
        self.module, self.patch_size, self.embed_dim, self.name = module, patch_size, embed_dim, name
        self.mean, self.std = mean, std
        given = {"tokens": features, "cls": cls, "attn": attn, "attn_logits": attn_logits, "keys": keys,
                 "queries": queries}
        self.callables = {f: fn for f, fn in given.items() if fn is not None}
        for f, fn in self.callables.items():
            if not callable(fn):
                raise BackboneError(f"Adapter: {'features' if f == 'tokens' else f}= must be a callable taking the "
                                    f"image batch, got {type(fn).__name__}")

    @property
    def facets(self) -> tuple[str, ...]:
        """The facets this adapter gives (tokens always), in `FACETS` order."""
        return tuple(f for f in FACETS if f in self.callables)


class AdapterBackbone(Backbone):
    """An `Adapter` behind the dense interface: each facet from its callable, its shape checked against the spec. The
    callables give one block's outputs, so only --layer -1 exists (a list of -1s repeats its tokens)."""

    def __init__(self, adapter: Adapter, spec, source, resolved_revision):
        super().__init__(spec, source, resolved_revision)
        self.adapter = adapter
        self.module = adapter.module  # a submodule, so the loader's eval/to/requires_grad reach its parameters

    @property
    def num_layers(self) -> int:
        return 1

    def layer_index(self, layer: int) -> int:
        if layer != -1:
            raise BackboneError(f"backbone '{self.spec.id}' is an Adapter: its features callable gives one block, so "
                                f"--layer {layer} cannot be read; use layer -1")
        return 0

    def check_facets(self, facets) -> None:
        super().check_facets(facets)
        lacking = [f for f in facets if f not in self.adapter.callables]
        if lacking:
            raise BackboneError(f"backbone '{self.spec.id}' (Adapter) gives {', '.join(self.adapter.facets)} but "
                                f"not {', '.join(lacking)}: pass {', '.join(f + '=' for f in lacking)} callables to "
                                "ssl_segbench.Adapter")

    def _forward(self, images, layer, facets):
        return {f: self.adapter.callables[f](images) for f in facets}

    def _shaped(self, v, facet, images):
        """The callable's output as it is, once its shape is checked: the facet's documented shape for `images`."""
        b, _, height, width = images.shape
        p = self.spec.patch_size
        heads = v.shape[1] if isinstance(v, torch.Tensor) and v.ndim == 4 else -1
        expected = ((b, height // p, width // p, self.spec.embed_dim) if facet in GRID_FACETS else
                    (b, self.spec.embed_dim) if facet == "cls" else (b, heads, height // p, width // p))
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != expected:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise BackboneError(f"backbone '{self.spec.id}' (Adapter): the {facet} callable gave {got} for a "
                                f"{b}x3x{height}x{width} batch; expected {expected} (h, w = input / patch_size "
                                f"{p}, D = embed_dim {self.spec.embed_dim})")
        return v


def _is_timm_vit(obj) -> bool:
    """A timm VisionTransformer or Eva (checked only when timm is already imported: the object would come from it)."""
    timm = sys.modules.get("timm")
    return timm is not None and isinstance(obj, (timm.models.VisionTransformer, timm.models.Eva))


def _is_transformers_model(obj) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(obj, transformers.PreTrainedModel)


def state_digest(module: torch.nn.Module, facts: dict) -> str:
    """sha256 over `facts` (JSON) and every state-dict tensor's name, dtype, shape and bytes, in state-dict order."""
    def chunks():
        yield json.dumps(facts, sort_keys=True).encode()
        for name, t in module.state_dict().items():
            t = t.detach()
            yield json.dumps([name, str(t.dtype), list(t.shape)]).encode()
            yield t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

    return sha256_hex(chunks())


def _hf_normalisation(model):
    """(mean, std) from the preprocessor_config.json next to a transformers model loaded from a local directory, or
    None."""
    path = Path(str(getattr(model.config, "_name_or_path", "") or "")) / "preprocessor_config.json"
    if not path.is_file():
        return None
    cfg = read_json(path, "replace it with the preprocessor_config.json saved with these weights")
    if cfg.get("image_mean") is None or cfg.get("image_std") is None:
        return None
    return cfg["image_mean"], cfg["image_std"], f"preprocessor_config.json ({path})"


def in_memory_spec(obj, normalisation, normalisation_problem) -> tuple[BackboneSpec, str]:
    """The spec of an in-memory model object and where its normalisation came from; `normalisation`: (mean, std)
    stated by the caller, replacing the model's, checked by `normalisation_problem` (backbones/__init__'s, passed in:
    that package imports this module). An object of another kind, or one whose normalisation is unknown or unusable,
    is refused naming the fix."""
    name = None
    if isinstance(obj, Adapter):
        module, cls = obj.module, type(obj.module).__name__
        facts = {"patch_size": obj.patch_size, "embed_dim": obj.embed_dim,
                 "num_prefix_tokens": int("cls" in obj.facets),  # the CLS checks read a prefix count
                 "facets": list(obj.facets)}
        own, source, arch = (obj.mean, obj.std), "Adapter", "adapter"
        name = obj.name
    elif _is_timm_vit(obj):
        module, cls = obj, type(obj).__name__
        cfg = getattr(obj, "pretrained_cfg", None) or {}
        facts = {"patch_size": obj.patch_embed.patch_size[0], "embed_dim": obj.embed_dim,
                 "num_prefix_tokens": obj.num_prefix_tokens, "num_layers": len(obj.blocks)}
        arch = cfg.get("architecture", "timm")
        own = (cfg["mean"], cfg["std"]) if cfg.get("mean") and cfg.get("std") else None
        source = "timm pretrained_cfg"
        if not getattr(obj, "dynamic_img_size", False):
            facts["image_size"] = obj.patch_embed.img_size[0]
    elif _is_transformers_model(obj):
        module, cls = obj, type(obj).__name__
        cfg = vision_config(obj.config)
        kind = cfg.model_type.removesuffix("_vision_model")
        if kind not in SUPPORTED_TYPES:
            raise BackboneError(f"transformers model {cls} (model_type '{cfg.model_type}') is not supported; "
                                f"supported: {SUPPORTED_TYPES}; any other nn.Module can be given as "
                                "ssl_segbench.Adapter(module, patch_size=, mean=, std=, embed_dim=, features=)")
        facts = {"patch_size": int(cfg.patch_size), "embed_dim": int(cfg.hidden_size),
                 "num_prefix_tokens": prefix_tokens_from_config(cfg), "num_layers": int(cfg.num_hidden_layers),
                 "num_heads": int(cfg.num_attention_heads)}
        found = _hf_normalisation(obj)
        own, source = (found[:2], found[2]) if found else (None, "")
        arch = f"{cfg.model_type} (transformers)"
    else:
        raise BackboneError(f"ssl_segbench.evaluate cannot read a backbone from a {type(obj).__name__}: give a "
                            "registry id or --backbone string, a timm VisionTransformer/Eva, a transformers vision "
                            "model, or ssl_segbench.Adapter(module, patch_size=, mean=, std=, embed_dim=, "
                            "features=)")
    if normalisation is not None:
        own, source = normalisation, "mean/std given"
    if own is None:
        raise BackboneError(f"in-memory {cls}: no normalisation (mean/std) is known for it. To fix it, pass "
                            "mean=(R, G, B), std=(R, G, B) to ssl_segbench.evaluate (the values it was trained with)")
    if problem := normalisation_problem(*own):
        raise BackboneError(f"in-memory {cls}: normalisation from {source}: {problem}. To fix it, pass mean=(R, G, "
                            "B), std=(R, G, B) to ssl_segbench.evaluate (the values it was trained with)")
    mean, std = (tuple(float(x) for x in v) for v in own)
    facts.update(model_class=cls, mean=list(mean), std=list(std))
    digest = state_digest(module, facts)
    image_size = facts.pop("image_size", None)
    spec = BackboneSpec(id=(name or cls).lower(), loader="module", repo_id=f"module:{cls}",
                        revision=f"state-sha256:{digest}", patch_size=facts["patch_size"],
                        embed_dim=facts["embed_dim"], num_prefix_tokens=facts["num_prefix_tokens"], mean=mean, std=std,
                        method=f"in-memory model ({cls})", paper=None, license="unknown", arch=arch,
                        num_layers=facts.get("num_layers"), num_heads=facts.get("num_heads"), image_size=image_size,
                        fixed_input=image_size is not None)
    return spec, source


@register_loader
class ModuleLoader(Loader):
    """In-memory model objects (`ssl_segbench.evaluate(model)`): the object itself is the model, its spec comes from
    `in_memory_spec`, its pin is (`module:<class>`, `state-sha256:<digest>`). No files: a backbones.yaml entry
    cannot name this loader."""

    name = "module"

    def snapshot(self, spec):
        return None

    def pin(self, spec):
        return spec.repo_id, spec.revision

    def model(self, spec, snapshot):
        raise BackboneError(f"backbone '{spec.id}': loader 'module' serves model objects given to "
                            "ssl_segbench.evaluate, not backbones.yaml entries: use loader timm, transformers or "
                            "builtin there")

    def backbone(self, spec, source, revision, model):
        if isinstance(model, Adapter):
            return AdapterBackbone(model, spec, source, revision)
        return (TimmBackbone if _is_timm_vit(model) else HFBackbone)(model, spec, source, revision)

    def fill_spec(self, spec, model):
        return spec


@contextlib.contextmanager
def preserved(module: torch.nn.Module):
    """Run a block that may switch `module` to eval mode, freeze its parameters or move it, then put back each
    submodule's mode, each parameter's requires_grad and the device of its parameters and buffers."""
    modes = {m: m.training for m in module.modules()}
    grads = {p: p.requires_grad for p in module.parameters()}
    device = next((p.device for p in module.parameters()), None)
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)
        for p, flag in grads.items():
            p.requires_grad_(flag)
        if device is not None:
            module.to(device)  # a no-op where the run left it there
