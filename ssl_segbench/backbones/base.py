"""One dense-feature interface for every loader.

`Backbone.forward(images, layer, facets)` returns a dict with any of:
- ``tokens``: (B, h, w, D) patch tokens of block `layer` (−1 = last), with the model's final norm applied and every
  prefix token (CLS, registers) removed by count from the spec, never by guessing from the sequence length; `layer`
  may also be a list of blocks (e.g. DINOv2's last four), whose tokens come from one model forward, concatenated along
  the channels in the listed order (repeats included): (B, h, w, D·L), each part what that layer alone gives;
- ``cls``: (B, D) the CLS token of the same block (final norm applied);
- ``attn``: (B, heads, h, w) attention of the CLS query over the patch keys in block `layer` (softmax over all tokens);
- ``attn_logits``: (B, heads, h, w) the same attention before the softmax: q_cls · k_j times the attention's scale
  (MaskDistill's released code thresholds these raw logits; any positive scale leaves its mask unchanged);
- ``keys`` / ``queries``: (B, h, w, D) that block's keys / queries, heads concatenated, prefix tokens removed.
Every facet but ``tokens`` describes one block, so it is read with one layer only.
"""
from __future__ import annotations

import torch

from ..errors import SegbenchError
from ..registry import BackboneSpec

FACETS = ("tokens", "cls", "attn", "attn_logits", "keys", "queries")


class BackboneError(SegbenchError):
    """A backbone cannot be loaded or cannot give what was asked; the message says why and what to do."""


class Backbone(torch.nn.Module):
    """Base class; subclasses implement `_forward(images, layer, facets) -> dict` on token sequences for one
    non-negative block index (the contract of every loader, built-in or plugin). A loader that can read several blocks
    in one model forward also implements `_layer_tokens(images, layers)`; the default calls `_forward` once per block.
    `forward` checks the request, shapes each output (`_shaped`) and puts listed layers in the caller's order."""

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

    def layer_indices(self, layer, facets) -> tuple[int, ...]:
        """`layer` (one block index, or a list / tuple of them) → the non-negative indices in the listed order, each
        checked by `layer_index`; several only for the 'tokens' facet (the others describe one block)."""
        listed = tuple(layer) if isinstance(layer, (list, tuple)) else (layer,)
        if not listed:
            raise BackboneError(f"backbone '{self.spec.id}': an empty list of layers was given; give a block index "
                                "(-1 = last) or a non-empty list of them")
        single = set(facets) - {"tokens"}
        if len(listed) > 1 and single:
            raise BackboneError(f"backbone '{self.spec.id}': several layers {list(listed)} can be read in one call "
                                f"for the 'tokens' facet only, and {sorted(single)} describe one block: ask for "
                                "those one layer at a time")
        return tuple(self.layer_index(i) for i in listed)

    def forward(self, images: torch.Tensor, layer: int | list[int] | tuple[int, ...] = -1,
                facets=("tokens",)) -> dict[str, torch.Tensor]:
        """The facets of `images` at `layer` (module docstring); a list of layers gives their tokens concatenated
        along the channels in the listed order, from one model forward."""
        self.check_facets(facets)
        _, _, height, width = images.shape
        p = self.spec.patch_size
        if height % p or width % p:
            raise BackboneError(f"input {height}x{width} is not a multiple of patch size {p}")
        listed = self.layer_indices(layer, facets)
        taken = tuple(sorted(set(listed)))
        if len(taken) == 1:
            res = {k: self._shaped(v, k, images) for k, v in self._forward(images, taken[0], tuple(facets)).items()}
            if len(listed) > 1:  # one block listed several times (tokens only: `layer_indices`)
                res["tokens"] = torch.cat([res["tokens"]] * len(listed), -1)
            return res
        grids = dict(zip(taken, (self._shaped(t, "tokens", images) for t in self._layer_tokens(images, taken)),
                         strict=True))
        return {"tokens": torch.cat([grids[i] for i in listed], -1)}

    def _forward(self, images, layer: int, facets) -> dict:
        raise NotImplementedError

    def _layer_tokens(self, images, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """The (B, N, D) token sequences of distinct blocks `layers` (ascending), in that order; one `_forward` per
        block here, one model forward where a loader overrides it."""
        return [self._forward(images, i, ("tokens",))["tokens"] for i in layers]

    def _shaped(self, v: torch.Tensor, facet: str, images: torch.Tensor) -> torch.Tensor:
        """One facet's output for `images` → its documented shape (`_grid`)."""
        p = self.spec.patch_size
        return _grid(v, images.shape[-2] // p, images.shape[-1] // p, self.spec.num_prefix_tokens, facet)


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
