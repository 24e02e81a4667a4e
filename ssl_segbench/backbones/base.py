"""One dense-feature interface for every loader.

`Backbone.forward(images, layer, facets)` returns a dict with any of:
- ``tokens``: (B, h, w, D) patch tokens of block `layer` (−1 = last), with the model's final norm applied and every
  prefix token (CLS, registers) removed by count from the spec, never by guessing from the sequence length;
- ``cls``: (B, D) the CLS token of the same block (final norm applied);
- ``attn``: (B, heads, h, w) attention of the CLS query over the patch keys in block `layer` (softmax over all tokens);
- ``attn_logits``: (B, heads, h, w) the same attention before the softmax: q_cls · k_j times the attention's scale
  (MaskDistill's released code thresholds these raw logits; any positive scale leaves its mask unchanged);
- ``keys`` / ``queries``: (B, h, w, D) that block's keys / queries, heads concatenated, prefix tokens removed.
"""
from __future__ import annotations

import torch

from ..errors import SegbenchError
from ..registry import BackboneSpec

FACETS = ("tokens", "cls", "attn", "attn_logits", "keys", "queries")


class BackboneError(SegbenchError):
    """A backbone cannot be loaded or cannot give what was asked; the message says why and what to do."""


class Backbone(torch.nn.Module):
    """Base class; subclasses implement `_forward(x, layer, facets) -> dict` on token sequences."""

    def __init__(self, spec: BackboneSpec, source: str, resolved_revision: str | None):
        super().__init__()
        self.spec = spec
        self.source = source
        self.resolved_revision = resolved_revision

    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    def check_facets(self, facets) -> None:
        unknown = set(facets) - set(FACETS)
        if unknown:
            raise BackboneError(f"unknown facet(s) {sorted(unknown)}; available: {FACETS}")
        if {"cls", "attn", "attn_logits"} & set(facets) and self.spec.num_prefix_tokens == 0:
            raise BackboneError(f"backbone '{self.spec.id}' has no CLS token, so it has no 'cls', 'attn' or "
                                "'attn_logits' facet")

    def layer_index(self, layer: int) -> int:
        n = self.num_layers
        if not -n <= layer < n:
            raise BackboneError(f"layer {layer} out of range for '{self.spec.id}' with {n} blocks")
        return layer % n

    def forward(self, images: torch.Tensor, layer: int = -1, facets=("tokens",)) -> dict[str, torch.Tensor]:
        self.check_facets(facets)
        b, _, height, width = images.shape
        p = self.spec.patch_size
        if height % p or width % p:
            raise BackboneError(f"input {height}x{width} is not a multiple of patch size {p}")
        out = self._forward(images, self.layer_index(layer), tuple(facets))
        h, w = height // p, width // p
        return {k: _grid(v, h, w, self.spec.num_prefix_tokens, k) for k, v in out.items()}

    def _forward(self, images, layer, facets) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _grid(v: torch.Tensor, h: int, w: int, n_prefix: int, facet: str) -> torch.Tensor:
    """Sequence (B, n_prefix + h·w, ...) → the facet's documented shape."""
    if facet == "cls":
        return v
    if facet in ("attn", "attn_logits"):  # (B, heads, N) CLS row
        if v.shape[-1] != n_prefix + h * w:
            raise BackboneError(f"attention has {v.shape[-1]} keys, expected {n_prefix} prefix + {h * w} patches")
        return v[..., n_prefix:].reshape(v.shape[0], v.shape[1], h, w)
    if v.shape[1] != n_prefix + h * w:
        raise BackboneError(f"model returned {v.shape[1]} tokens, but the spec says {n_prefix} prefix tokens + "
                            f"{h}x{w} patches: check num_prefix_tokens in backbones.yaml")
    return v[:, n_prefix:].reshape(v.shape[0], h, w, v.shape[-1])


def cls_attention(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float | None,
                  facets, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """(B, N, D) queries and keys → the requested of 'attn' ((B, heads, N) softmax attention of token 0, the CLS, over
    all tokens) and 'attn_logits' (the same before the softmax). `bias`: the attention's additive term ((…, N, N),
    e.g. BEiT's relative position bias), whose CLS row is added to the logits."""
    b, n, d = q.shape
    hd = d // num_heads
    q0 = q[:, :1].reshape(b, 1, num_heads, hd).transpose(1, 2)  # (B, H, 1, hd)
    kk = k.reshape(b, n, num_heads, hd).transpose(1, 2)  # (B, H, N, hd)
    logits = ((q0 @ kk.transpose(-1, -2)).squeeze(2) * (scale if scale is not None else hd ** -0.5)).float()
    if bias is not None:
        if bias.dtype == torch.bool:
            raise BackboneError("a boolean attention mask cannot be read as CLS attention")
        logits = logits + bias[..., 0, :].float().expand_as(logits)
    out = {"attn": logits.softmax(-1), "attn_logits": logits}
    return {f: out[f] for f in ("attn", "attn_logits") if f in facets}
