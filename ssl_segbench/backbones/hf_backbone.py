"""Hugging Face transformers ViTs (DINOv2 ± registers, ViT, MSN, I-JEPA, and the vision towers of CLIP and SigLIP)
through `from_pretrained`. Tokens of every block get the model's final norm, as timm does for all its ViTs
(transformers' CLIP applies `post_layernorm` to the pooled CLS only)."""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

from .base import Backbone, BackboneError, cls_attention
from .hub import config_name, is_hub_error, offline_hint
from .loader import NORMALISATION_FIX, Loader, register_loader
from .weights import check_transformers_fit, describe_weights

SUPPORTED_TYPES = ("dinov2", "dinov2_with_registers", "vit", "vit_msn", "ijepa", "clip", "siglip")
# dual-encoder repos whose vision tower is loaded on its own
VISION_TOWERS = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}


def vision_config(config):
    """The vision part of a config (the config itself for vision-only models)."""
    return getattr(config, "vision_config", None) or config


def prefix_tokens_from_config(config) -> int:
    """CLS + registers as the architecture defines them (I-JEPA and SigLIP have no CLS)."""
    if config.model_type in ("ijepa", "siglip", "siglip_vision_model"):
        return 0
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


def model_class(config):
    """The transformers class that loads this checkpoint's vision encoder."""
    import transformers

    if config.model_type in VISION_TOWERS:
        return getattr(transformers, VISION_TOWERS[config.model_type])
    if config.model_type not in SUPPORTED_TYPES:
        hint = " (MAE: use the timm loader; transformers' ViTMAE shuffles tokens)" if config.model_type == "vit_mae" \
            else ""
        raise BackboneError(f"transformers model_type '{config.model_type}' is not supported; supported: "
                            f"{SUPPORTED_TYPES}{hint}")
    return transformers.AutoModel


def _first_attr(obj, names):
    for n in names:
        if hasattr(obj, n):
            return getattr(obj, n)
    raise BackboneError(f"{type(obj).__name__} has none of {names}: unsupported transformers layout")


class HFBackbone(Backbone):
    def __init__(self, model, spec, source, resolved_revision):
        super().__init__(spec, source, resolved_revision)
        cfg = vision_config(model.config)
        self.model = model.eval()
        for name, expected, actual in (("patch_size", spec.patch_size, cfg.patch_size),
                                       ("embed_dim", spec.embed_dim, cfg.hidden_size),
                                       ("num_prefix_tokens", spec.num_prefix_tokens, prefix_tokens_from_config(cfg))):
            if expected != actual:
                raise BackboneError(f"backbone '{spec.id}': backbones.yaml says {name}={expected} but {source} has "
                                    f"{actual}: fix the registry entry")
        encoder = model.encoder if hasattr(model, "encoder") else model
        self.layers = _first_attr(encoder, ("layer", "layers"))
        self.final_norm = _first_attr(model, ("layernorm", "post_layernorm"))
        self.num_heads = cfg.num_attention_heads
        self._kwargs = {"interpolate_pos_encoding": True} \
            if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters else {}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _forward(self, images, layer, facets):
        captured = {}
        hooks = []
        if {"attn", "attn_logits", "keys", "queries"} & set(facets):
            att = _first_attr(self.layers[layer], ("attention", "self_attn"))
            for facet, proj in (("queries", att.q_proj), ("keys", att.k_proj)):
                hooks.append(proj.register_forward_hook(lambda _m, _i, o, f=facet: captured.__setitem__(f, o)))
        try:
            out = self.model(pixel_values=images, output_hidden_states=True, **self._kwargs)
        finally:
            for h in hooks:
                h.remove()
        seq = self.final_norm(out.hidden_states[layer + 1])
        res = {}
        if "tokens" in facets:
            res["tokens"] = seq
        if "cls" in facets:
            res["cls"] = seq[:, 0]
        if {"attn", "attn_logits"} & set(facets):
            res.update(cls_attention(captured["queries"], captured["keys"], self.num_heads, None, facets))
        for f in ("keys", "queries"):
            if f in facets:
                res[f] = captured[f]
        return res



@register_loader
class TransformersLoader(Loader):
    """transformers checkpoints: `org/name[@rev]` on the Hub or a local directory, loaded strictly. An ad-hoc
    checkpoint's shape is read from its config, its normalisation from preprocessor_config.json."""

    name = "transformers"
    backbone_class = HFBackbone
    normalisation_file = normalisation_where = "preprocessor_config.json"
    normalisation_keys = ("image_mean", "image_std")

    def config(self, spec):
        """The transformers config of a checkpoint; one transformers cannot build (values that contradict each other)
        is a BackboneError naming the file."""
        from transformers import AutoConfig

        local = Path(spec.repo_id).is_dir()
        try:
            return AutoConfig.from_pretrained(spec.repo_id, revision=None if local else spec.revision)
        except Exception as e:
            if not local and is_hub_error(e):
                raise offline_hint(spec.repo_id, spec.revision, e, spec) from e
            raise BackboneError(f"{config_name(spec, self.snapshot(spec))} is not a configuration transformers can "
                                f"build ({type(e).__name__}: {str(e)[:300]}). To fix it, use the config.json saved "
                                "with these weights.") from e

    def model(self, spec, snapshot):
        local = Path(spec.repo_id).is_dir()
        config = self.config(spec)
        cls = model_class(config)
        try:
            model, info = cls.from_pretrained(spec.repo_id, revision=None if local else spec.revision,
                                              output_loading_info=True, ignore_mismatched_sizes=True)
        except Exception as e:
            if not local and is_hub_error(e):
                raise offline_hint(spec.repo_id, spec.revision, e, spec) from e
            raise
        check_transformers_fit(model, info, describe_weights(snapshot), config_name(spec, snapshot),
                               vision_tower=config.model_type in VISION_TOWERS)
        return model

    def fill_spec(self, spec, model):
        config = self.config(spec)
        cfg = vision_config(config)
        return dataclasses.replace(spec, patch_size=int(cfg.patch_size), embed_dim=int(cfg.hidden_size),
                                   num_prefix_tokens=prefix_tokens_from_config(cfg),
                                   num_layers=int(cfg.num_hidden_layers), num_heads=int(cfg.num_attention_heads),
                                   arch=f"{config.model_type} (transformers)")

    def section(self, cfg, path, name):
        if cfg.get("do_normalize") is False:
            raise BackboneError(f"backbone '{name}': {path} says do_normalize false, which this benchmark does not "
                                f"read as a normalisation. To fix it, {NORMALISATION_FIX} (0,0,0 and 1,1,1 for none)")
        return cfg
