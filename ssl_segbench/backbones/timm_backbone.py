"""timm vision transformers: plain ViTs (DINO, MAE, DeiT III, CLIP, SigLIP 2, AIMv2, RADIO), `Eva` models with rotary
position embeddings (DINOv3, EVA-02, Perception Encoder) and BEiT v2. Tokens come from `forward_intermediates`; keys,
queries and attention are what the chosen block's attention passes to `scaled_dot_product_attention`: after its q/k
norms and its rotary embedding, with its additive bias (BEiT's relative position bias), captured during the model's
own forward (`capture_attention`), so no architecture's attention is re-implemented here."""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from .base import Backbone, BackboneError, cls_attention
from .hub import config_name, is_hub_error, offline_hint, repair_hint
from .loader import Loader, register_loader
from .weights import checked_timm_load, describe_weights, read_json


class TimmBackbone(Backbone):
    def __init__(self, model, spec, source, resolved_revision):
        super().__init__(spec, source, resolved_revision)
        self.model = model.eval()
        for name, expected, actual in (("patch_size", spec.patch_size, model.patch_embed.patch_size[0]),
                                       ("embed_dim", spec.embed_dim, model.embed_dim),
                                       ("num_prefix_tokens", spec.num_prefix_tokens, model.num_prefix_tokens)):
            if expected != actual:
                raise BackboneError(f"backbone '{spec.id}': backbones.yaml says {name}={expected} but the timm model "
                                    f"{source} has {actual}: fix the registry entry")

    @property
    def num_layers(self) -> int:
        return len(self.model.blocks)

    def _sequences(self, images, layers) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(patch tokens, prefix tokens) of blocks `layers` (ascending), final norm applied, from one forward that
        stops after the last of them."""
        fixed = getattr(self.model.patch_embed, "img_size", None)
        if not getattr(self.model, "dynamic_img_size", False) and fixed is not None and \
                tuple(images.shape[-2:]) != tuple(fixed):
            raise BackboneError(f"backbone '{self.spec.id}' ({type(self.model).__name__}) takes only "
                                f"{fixed[0]}×{fixed[1]} input (its position terms are fixed to that grid), got "
                                f"{images.shape[-2]}×{images.shape[-1]}: use --resize square --size {fixed[0]}")
        found = self.model.forward_intermediates(  # in block order, which `layers` is
            images, indices=list(layers), norm=True, output_fmt="NLC", intermediates_only=True,
            return_prefix_tokens=self.model.num_prefix_tokens > 0, stop_early=True)
        return [f if isinstance(f, tuple) else (f, f[:, :0]) for f in found]

    def _layer_tokens(self, images, layers):
        return [torch.cat([prefix, spatial], dim=1) for spatial, prefix in self._sequences(images, layers)]

    def _forward(self, images, layer, facets):
        need_attention = bool({"attn", "attn_logits", "keys", "queries"} & set(facets))
        attn_mod = self.model.blocks[layer].attn
        with capture_attention(attn_mod, self.spec.id) if need_attention else contextlib.nullcontext({}) as seen:
            ((spatial, prefix),) = self._sequences(images, (layer,))
        out = {}
        if "tokens" in facets:
            out["tokens"] = torch.cat([prefix, spatial], dim=1)
        if "cls" in facets:
            out["cls"] = prefix[:, 0]
        if need_attention:
            b, heads, n, hd = seen["q"].shape
            q = seen["q"].transpose(1, 2).reshape(b, n, heads * hd)
            k = seen["k"].transpose(1, 2).reshape(b, n, heads * hd)
            if {"attn", "attn_logits"} & set(facets):
                out.update(cls_attention(q, k, heads, seen["scale"], facets, bias=seen["bias"]))
            if "keys" in facets:
                out["keys"] = k
            if "queries" in facets:
                out["queries"] = q
        return out


@contextlib.contextmanager
def capture_attention(module: torch.nn.Module, backbone_id: str):
    """While `module` runs, record the q and k (B, heads, N, head_dim), additive mask and scale it hands to
    `F.scaled_dot_product_attention` (its fused path is switched on for the call; the result is unchanged)."""
    seen: dict = {}
    inside = [False]
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if inside[0] and "q" not in seen:
            seen.update(q=q, k=k, bias=attn_mask, scale=scale)
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    fused = getattr(module, "fused_attn", None)
    pre = module.register_forward_pre_hook(lambda m, a: inside.__setitem__(0, True))
    post = module.register_forward_hook(lambda m, a, o: inside.__setitem__(0, False))
    F.scaled_dot_product_attention = sdpa  # the modules call it through the `F` module, looked up at call time
    if fused is not None:
        module.fused_attn = True
    try:
        yield seen
    finally:
        F.scaled_dot_product_attention = original
        pre.remove()
        post.remove()
        if fused is not None:
            module.fused_attn = fused
    if "q" not in seen:
        raise BackboneError(f"'{backbone_id}': attention module {type(module).__name__} did not call "
                            "scaled_dot_product_attention, so its keys, queries and attention cannot be read")


def create_timm(name: str, weights: str, config: str, **kwargs):
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


@register_loader
class TimmLoader(Loader):
    """timm checkpoints: `hf-hub:org/name[@rev]` on the Hub (timm's own layout, or bare weights read into the
    registry's `timm_model`), or a local directory (`local-dir:<path>`). An ad-hoc checkpoint's shape is read from the
    built model, its normalisation from config.json's pretrained_cfg."""

    name = "timm"
    backbone_class = TimmBackbone
    source_prefix = "hf-hub:"
    shape_from_model = True
    normalisation_file, normalisation_keys, normalisation_where = "config.json", ("mean", "std"), "timm pretrained_cfg"

    def model(self, spec, snapshot):
        where = describe_weights(snapshot), config_name(spec, snapshot)
        if spec.repo_id.startswith("local-dir:"):
            return create_timm(spec.repo_id, *where)
        hub_id = spec.repo_id + (f"@{spec.revision}" if spec.revision else "")
        config = snapshot / "config.json" if snapshot is not None else None
        if not spec.timm_model and config is not None and config.is_file() \
                and "architecture" not in read_json(config, repair_hint(spec)):
            raise BackboneError(f"{config} is not a timm config (it names no 'architecture'), so timm cannot build "
                                f"hf-hub:{hub_id}. If the repo holds bare weights of a timm architecture, name it in "
                                f"the registry entry's timm_model (e.g. timm_model: vit_base_patch16_224); otherwise "
                                f"load it with its own library.")
        try:
            if spec.timm_model:  # bare weights without timm's config: timm's architecture, the repo's weights
                return create_timm(spec.timm_model, *where, pretrained_cfg_overlay={"hf_hub_id": hub_id})
            return create_timm(f"hf-hub:{hub_id}", *where)
        except Exception as e:  # the hub raises several unrelated types for "not cached"
            if is_hub_error(e):
                raise offline_hint(spec.repo_id, spec.revision, e, spec) from e
            raise

    def fill_spec(self, spec, model):
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        return dataclasses.replace(spec, patch_size=model.patch_embed.patch_size[0], embed_dim=model.embed_dim,
                                   num_prefix_tokens=model.num_prefix_tokens, num_layers=len(model.blocks),
                                   arch=cfg.get("architecture", "timm"))

    def section(self, cfg, path, name):
        return cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), dict) else {}
