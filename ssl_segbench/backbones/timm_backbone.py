"""timm vision transformers (DINO, MAE, CLIP, supervised, random-init): tokens via `forward_intermediates`, keys and
queries from a hook on the block's fused qkv projection."""
from __future__ import annotations

import torch

from .base import Backbone, BackboneError, cls_attention


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

    def _forward(self, images, layer, facets):
        attn_mod = self.model.blocks[layer].attn
        captured = {}
        hook = None
        if {"attn", "attn_logits", "keys", "queries"} & set(facets):
            if not hasattr(attn_mod, "qkv"):
                raise BackboneError(f"'{self.spec.id}': attention module {type(attn_mod).__name__} has no fused qkv; "
                                    "attn/attn_logits/keys/queries are not available for it")

            def grab(_mod, _inp, out):
                b, n, _ = out.shape
                heads = attn_mod.num_heads
                q, k, _v = out.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
                q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
                captured["queries"] = q.transpose(1, 2).reshape(b, n, -1)
                captured["keys"] = k.transpose(1, 2).reshape(b, n, -1)

            hook = attn_mod.qkv.register_forward_hook(grab)
        try:
            (spatial, prefix), = self.model.forward_intermediates(
                images, indices=[layer], norm=True, output_fmt="NLC", intermediates_only=True,
                return_prefix_tokens=True, stop_early=True)
        finally:
            if hook is not None:
                hook.remove()
        out = {}
        if "tokens" in facets:
            out["tokens"] = torch.cat([prefix, spatial], dim=1)
        if "cls" in facets:
            out["cls"] = prefix[:, 0]
        if {"attn", "attn_logits"} & set(facets):
            out.update(cls_attention(captured["queries"], captured["keys"], attn_mod.num_heads, attn_mod.scale, facets))
        for f in ("keys", "queries"):
            if f in facets:
                out[f] = captured[f]
        return out
