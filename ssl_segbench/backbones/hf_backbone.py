"""Hugging Face transformers ViTs (DINOv2 ± registers, DINOv3, ViT, MSN, I-JEPA, AIMv2, and the vision towers of CLIP,
MetaCLIP 2, SigLIP, SigLIP2 and TIPSv2) through `from_pretrained`. Tokens of every block get the model's final norm, as
timm does for all its ViTs (transformers' CLIP applies `post_layernorm` to the pooled CLS only)."""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

from .base import Backbone, BackboneError, cls_attention
from .hub import config_name, is_hub_error, offline_hint
from .loader import NORMALISATION_FIX, Loader, register_loader
from .weights import check_transformers_fit, describe_weights

SUPPORTED_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit", "vit", "vit_msn", "ijepa", "clip",
                   "clip_vision_model", "metaclip_2", "siglip", "siglip_vision_model", "siglip2",
                   "siglip2_vision_model", "aimv2_vision_model", "tipsv2", "tipsv2_vision_model")
# dual-encoder repos whose vision tower is loaded on its own
VISION_TOWERS = {"clip": "CLIPVisionModel", "metaclip_2": "MetaClip2VisionModel", "siglip": "SiglipVisionModel",
                 "siglip2": "Siglip2VisionModel", "tipsv2": "Tipsv2VisionModel"}
# vision encoders without a CLS token: every token is a patch
CLS_FREE_TYPES = ("ijepa", "siglip", "siglip_vision_model", "siglip2_vision_model", "aimv2_vision_model")
# types refused with the reason: their dense grid cannot be had exactly through transformers
REFUSED_TYPES = {
    "vit_mae": "MAE: use the timm loader; transformers' ViTMAE shuffles tokens",
    "aimv2": "AIMv2 image-text checkpoint: transformers' Aimv2VisionModel cannot load its vision tower on its own "
             "(the weights stay under 'vision_model.' and would be left random); use a vision-only AIMv2 checkpoint "
             "(model_type aimv2_vision_model) or the timm loader",
}


def vision_config(config):
    """The vision part of a config (the config itself for vision-only models)."""
    return getattr(config, "vision_config", None) or config


def prefix_tokens_from_config(config) -> int:
    """CLS + registers as the architecture defines them (I-JEPA, SigLIP, SigLIP2 and AIMv2 have no CLS); the registers
    follow the CLS (DINOv2 with registers, DINOv3, and TIPSv2, whose register is its second class token)."""
    if config.model_type in CLS_FREE_TYPES:
        return 0
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


def model_class(config):
    """The transformers class that loads this checkpoint's vision encoder."""
    import transformers

    if config.model_type in VISION_TOWERS:
        return getattr(transformers, VISION_TOWERS[config.model_type])
    if config.model_type not in SUPPORTED_TYPES:
        hint = f" ({REFUSED_TYPES[config.model_type]})" if config.model_type in REFUSED_TYPES else ""
        raise BackboneError(f"transformers model_type '{config.model_type}' is not supported; supported: "
                            f"{SUPPORTED_TYPES}{hint}")
    return transformers.AutoModel


def _first_attr(obj, names):
    for n in names:
        if hasattr(obj, n):
            return getattr(obj, n)
    raise BackboneError(f"{type(obj).__name__} has none of {names}: unsupported transformers layout")


def naflex_inputs(images, patch_size: int) -> dict:
    """SigLIP2's NaFlex input for a batch of same-size images: each image's patches in the processor's own order and
    layout (`convert_image_to_patches`), every patch valid (no padding) and the grid as its spatial shape, so the
    position embeddings are resized to exactly this grid and every output token is one patch of it."""
    import torch
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    b, _, height, width = images.shape
    patches = torch.stack([convert_image_to_patches(im, patch_size) for im in images])
    grid = torch.tensor([[height // patch_size, width // patch_size]] * b, device=images.device)
    return {"pixel_values": patches, "spatial_shapes": grid,
            "pixel_attention_mask": torch.ones(patches.shape[:2], dtype=torch.long, device=images.device)}


def rotate_patches(q, k, position_embeddings, num_heads: int):
    """DINOv3's queries and keys (B, N, D) after its rotary embedding, which the attention applies to the patch tokens
    only (after the q/k projections the hooks see), with the model's own `apply_rotary_pos_emb`."""
    from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

    b, n, d = q.shape
    heads = (t.reshape(b, n, num_heads, d // num_heads).transpose(1, 2) for t in (q, k))
    q, k = apply_rotary_pos_emb(*heads, *position_embeddings)
    return q.transpose(1, 2).reshape(b, n, d), k.transpose(1, 2).reshape(b, n, d)


class HFBackbone(Backbone):
    def __init__(self, model, spec, source, resolved_revision):
        super().__init__(spec, source, resolved_revision)
        cfg = vision_config(model.config)
        self.model = model.eval()
        self.fixed_size = fixed_input_size(cfg)
        for name, expected, actual in (("patch_size", spec.patch_size, cfg.patch_size),
                                       ("embed_dim", spec.embed_dim, cfg.hidden_size),
                                       ("num_prefix_tokens", spec.num_prefix_tokens, prefix_tokens_from_config(cfg)),
                                       ("fixed_input", spec.fixed_input, self.fixed_size is not None)):
            if expected != actual:
                raise BackboneError(f"backbone '{spec.id}': backbones.yaml says {name}={expected} but {source} has "
                                    f"{actual}: fix the registry entry")
        encoder = next((getattr(model, n) for n in ("encoder", "model") if hasattr(model, n)), model)  # DINOv3: model
        self.layers = _first_attr(encoder, ("layer", "layers"))
        self.final_norm = _first_attr(model, ("layernorm", "post_layernorm", "norm", "rms_norm"))
        self.num_heads = cfg.num_attention_heads
        self.model_type = cfg.model_type
        self._kwargs = {"interpolate_pos_encoding": True} \
            if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters else {}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _inputs(self, images) -> dict:
        """The model's keyword inputs for a batch of images (SigLIP2 takes them patchified, NaFlex style)."""
        if self.model_type == "siglip2_vision_model":
            return naflex_inputs(images, self.spec.patch_size)
        if self.fixed_size is not None and tuple(images.shape[-2:]) != (self.fixed_size, self.fixed_size):
            raise BackboneError(f"backbone '{self.spec.id}' ({type(self.model).__name__}) takes only "
                                f"{self.fixed_size}×{self.fixed_size} input (its position terms are fixed to that "
                                f"grid), got {images.shape[-2]}×{images.shape[-1]}: use --resize square --size "
                                f"{self.fixed_size}")
        return {"pixel_values": images, **self._kwargs}

    def _layer_tokens(self, images, layers):
        """One forward's hidden states of `layers`, final norm applied (hidden_states[0] is the embeddings)."""
        out = self.model(**self._inputs(images), output_hidden_states=True)
        return [self.final_norm(out.hidden_states[i + 1]) for i in layers]

    def _forward(self, images, layer, facets):
        captured = {}
        hooks = []
        if {"attn", "attn_logits", "keys", "queries"} & set(facets):
            att = _first_attr(self.layers[layer], ("attention", "self_attn"))
            for facet, proj in (("queries", att.q_proj), ("keys", att.k_proj)):
                hooks.append(proj.register_forward_hook(lambda _m, _i, o, f=facet: captured.__setitem__(f, o)))
            if self.model_type == "dinov3_vit":  # its rotary embedding, for the patch tokens' q and k
                hooks.append(att.register_forward_pre_hook(
                    lambda _m, _a, kw: captured.__setitem__("rope", kw["position_embeddings"]), with_kwargs=True))
        try:
            out = self.model(**self._inputs(images), output_hidden_states=True)
        finally:
            for h in hooks:
                h.remove()
        if "rope" in captured:
            captured["queries"], captured["keys"] = rotate_patches(captured["queries"], captured["keys"],
                                                                   captured["rope"], self.num_heads)
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


def fixed_input_fields(cfg) -> dict:
    """The spec fields that make the runner refuse, before any work, a size a fixed-input encoder cannot take."""
    size = fixed_input_size(cfg)
    return {} if size is None else {"fixed_input": True, "image_size": size}


def fixed_input_size(cfg) -> int | None:
    """The one square input size a vision encoder takes, or None when it takes any multiple of its patch size: AIMv2
    with learned position embeddings (not `is_native`) adds them to exactly image_size² / patch² tokens."""
    if cfg.model_type == "aimv2_vision_model" and not cfg.is_native:
        return int(cfg.image_size)
    return None


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
                                   arch=f"{config.model_type} (transformers)",
                                   **fixed_input_fields(cfg))

    def section(self, cfg, path, name):
        if cfg.get("do_normalize") is False:
            raise BackboneError(f"backbone '{name}': {path} says do_normalize false, which this benchmark does not "
                                f"read as a normalisation. To fix it, {NORMALISATION_FIX} (0,0,0 and 1,1,1 for none)")
        return cfg
