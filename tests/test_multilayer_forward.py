"""Several layers from one backbone forward (issue 25, `dinov2-ms`): for timm (a ViT with registers, an Eva),
transformers (DINOv2 with registers, DINOv3) and the seeded `random_vits16`, tokens of a listed set of layers in a
non-sorted order with a repeat equal each layer's own call concatenated and each block's output in the library's own
forward (final norm, prefix cut by count); the blocks run once per call; other facets with several layers, an
out-of-range layer in the list and an empty list are refused before any block runs; an Adapter gives its one block
for a list of -1s only; linear-dinov2 embeds a batch for its `dinov2-ms` layers in one backbone call, to the tensor
the per-layer calls gave; a non-finite output names the layers."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hubfake import TIMM_ARGS, _snapshot, make_timm_arch_checkpoint, save_preprocessor
from test_backbone_families import _entry

import ssl_segbench
from ssl_segbench.backbones import BackboneError, BackboneRef
from ssl_segbench.features import embed
from ssl_segbench.protocols import get_protocol
from ssl_segbench.protocols.linear_dinov2 import backbone_features, centre_pad

LISTED = [-1, 1, -1]  # not in block order, one layer twice
HF = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=7)
# family → (loader, depth, prefix tokens, patch)
FAMILIES = {"timm_reg": ("timm", 4, 5, 8), "eva": ("timm", 4, 5, 8), "dinov2_reg": ("transformers", 4, 5, 7),
            "dinov3_hf": ("transformers", 4, 3, 7), "random_vits16": ("builtin", 12, 1, 16)}


def _hf_model(fam: str):
    import transformers as tf

    torch.manual_seed(0)
    if fam == "dinov2_reg":
        return tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(num_register_tokens=4, num_hidden_layers=4,
                                                                        **HF)).eval()
    return tf.DINOv3ViTModel(tf.DINOv3ViTConfig(num_register_tokens=2, num_hidden_layers=4, **HF)).eval()


@pytest.fixture(scope="module")
def backbones(hub_cache, tmp_path_factory):
    """family → loaded Backbone, from tiny checkpoints in the fake Hub cache (random_vits16: the real registry)."""
    text = "backbones:\n"
    make_timm_arch_checkpoint(hub_cache, "tiny-org/vit-reg-multilayer", "vit_small_patch16_224",
                              dict(TIMM_ARGS, depth=4, reg_tokens=4))
    make_timm_arch_checkpoint(hub_cache, "tiny-org/eva-multilayer", "vit_small_patch16_dinov3",
                              dict(TIMM_ARGS, depth=4))
    for fam, repo in (("timm_reg", "tiny-org/vit-reg-multilayer"), ("eva", "tiny-org/eva-multilayer")):
        text += _entry(fam, "timm", repo, 8, 32, 5, 32)
    for fam in ("dinov2_reg", "dinov3_hf"):
        snap, _ = _snapshot(hub_cache, f"tiny-org/{fam}-multilayer", fam)
        _hf_model(fam).save_pretrained(snap)
        save_preprocessor(snap)
        text += _entry(fam, "transformers", f"tiny-org/{fam}-multilayer", 7, 32, FAMILIES[fam][2], 28)
    reg = tmp_path_factory.mktemp("multilayer") / "backbones.yaml"
    reg.write_text(text)
    loaded = {fam: BackboneRef(fam, str(reg)).load() for fam in FAMILIES if fam != "random_vits16"}
    loaded["random_vits16"] = BackboneRef("random_vits16").load()
    for fam, (_, depth, prefix, patch) in FAMILIES.items():  # the fixtures are what the tests assume
        assert (loaded[fam].num_layers, loaded[fam].spec.num_prefix_tokens, loaded[fam].spec.patch_size) == \
            (depth, prefix, patch)
    return loaded


def _input(fam: str) -> torch.Tensor:
    p = FAMILIES[fam][3]
    torch.manual_seed(1)
    return torch.randn(2, 3, 5 * p, 3 * p)  # not square, not the native size


def _blocks(backbone) -> torch.nn.ModuleList:
    return backbone.model.blocks if hasattr(backbone.model, "blocks") else backbone.layers


def _reference(fam: str, backbone, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's (B, h, w, D) patch tokens from the library's own forward: timm's forward_features with each
    block's output caught by a hook, transformers' hidden_states; the model's final norm, prefix tokens cut by the
    family's count."""
    model, prefix, p = backbone.model, FAMILIES[fam][2], FAMILIES[fam][3]
    if FAMILIES[fam][0] == "transformers":
        states = model(pixel_values=x, output_hidden_states=True).hidden_states[1:]
        norm = model.layernorm if fam == "dinov2_reg" else model.norm
    else:
        states = []
        hooks = [blk.register_forward_hook(lambda _m, _a, o: states.append(o)) for blk in model.blocks]
        try:
            model.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        norm = model.norm
    h, w = x.shape[-2] // p, x.shape[-1] // p
    return [norm(s)[:, prefix:].reshape(len(x), h, w, -1) for s in states]


class _Runs:
    """Counts the runs of a module (a forward hook) while in use."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.n = module, 0

    def __enter__(self):
        self.hook = self.module.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))
        return self

    def __exit__(self, *exc):
        self.hook.remove()


@pytest.mark.parametrize("fam", FAMILIES)
def test_listed_layers_are_the_single_layer_tokens_concatenated_from_one_forward(backbones, fam):
    backbone, x = backbones[fam], _input(fam)
    with torch.inference_mode():
        with _Runs(_blocks(backbone)[0]) as first:
            tokens = backbone(x, LISTED)["tokens"]
        assert first.n == 1  # one model forward for the three layers
        single = [backbone(x, layer)["tokens"] for layer in LISTED]
        reference = _reference(fam, backbone, x)
    d = backbone.spec.embed_dim
    assert tokens.shape == (2, 5, 3, 3 * d)
    assert torch.equal(tokens, torch.cat(single, -1))
    assert not torch.equal(single[0], single[1])  # the layers differ, so the order is checked
    for k, layer in enumerate(LISTED):
        torch.testing.assert_close(tokens[..., k * d:(k + 1) * d], reference[layer], rtol=1e-5, atol=1e-5)
    # the four-layer list of dinov2-ms, in block order, against the same single-layer calls
    with torch.inference_mode():
        last4 = backbone(x, [-4, -3, -2, -1])["tokens"]
        assert torch.equal(last4, torch.cat([backbone(x, layer)["tokens"] for layer in (-4, -3, -2, -1)], -1))


@pytest.mark.parametrize("fam", ["timm_reg", "dinov2_reg"])
@pytest.mark.parametrize("layers, facets, message", [
    ([-1, 1], ("tokens", "attn"), r"several layers \[-1, 1\] can be read in one call for the 'tokens' facet only, "
                                  r"and \['attn'\] describe one block"),
    ([-1, -1], ("cls",), r"several layers \[-1, -1\] .* \['cls'\] describe one block"),
    ([-1, 4], ("tokens",), r"layer 4 out of range for '(timm_reg|dinov2_reg)' with 4 blocks"),
    ([-5, -1], ("tokens",), r"layer -5 out of range for '(timm_reg|dinov2_reg)' with 4 blocks"),
    ([], ("tokens",), r"an empty list of layers was given; give a block index \(-1 = last\) or a non-empty list"),
])
def test_refused_layer_lists_name_the_fault_before_any_block_runs(backbones, fam, layers, facets, message):
    backbone = backbones[fam]
    with _Runs(_blocks(backbone)[0]) as first, pytest.raises(BackboneError, match=message):
        backbone(_input(fam), layers, facets)
    assert first.n == 0


def test_one_layer_in_a_list_is_the_int_call_for_every_facet(backbones):
    backbone, x = backbones["timm_reg"], _input("timm_reg")
    facets = ("tokens", "cls", "attn", "keys")
    with torch.inference_mode():
        listed, single = backbone(x, [1], facets), backbone(x, 1, facets)
    assert list(listed) == list(single) and all(torch.equal(listed[f], single[f]) for f in facets)


def test_an_adapter_repeats_its_one_block_and_refuses_any_other(backbones):
    vit = backbones["timm_reg"].model

    class Mine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = vit

        def tokens(self, x):
            return self.vit.forward_features(x)[:, 5:].reshape(len(x), x.shape[2] // 8, x.shape[3] // 8, -1)

    mine = Mine()
    adapter = ssl_segbench.Adapter(mine, patch_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, embed_dim=32,
                                   features=mine.tokens)
    backbone, x = BackboneRef(adapter).load(), _input("timm_reg")
    with torch.inference_mode():
        own = mine.tokens(x)
        assert torch.equal(backbone(x, [-1, -1])["tokens"], torch.cat([own, own], -1))
    with pytest.raises(BackboneError, match=r"is an Adapter: its features callable gives one block, so --layer 0 "
                                            r"cannot be read; use layer -1"):
        backbone(x, [-1, 0])


def test_pixels_have_one_layer_under_either_index():
    pixels, x = BackboneRef("pixels").load(), torch.randn(1, 3, 32, 48)
    one = pixels(x)["tokens"]
    assert torch.equal(pixels(x, [0, -1])["tokens"], torch.cat([one, one], -1))
    with pytest.raises(BackboneError, match="layer 1 out of range for 'pixels' with 1 blocks"):
        pixels(x, [-1, 1])


class _ThreeBlocks(ssl_segbench.backbones.base.Backbone):
    """A loader written against the one-block contract alone (`_forward`, no `_layer_tokens`), as a plugin may be:
    block k's tokens are the patch means times k + 1; it counts its calls."""

    calls: list

    @property
    def num_layers(self) -> int:
        return 3

    def _forward(self, images, layer, facets):
        self.calls.append(layer)
        means = torch.nn.functional.avg_pool2d(images, kernel_size=self.spec.patch_size)
        return {"tokens": means.flatten(2).transpose(1, 2) * (layer + 1)}


def test_a_one_block_loader_gives_listed_layers_by_one_call_per_distinct_block():
    spec = SimpleNamespace(id="three", patch_size=4, num_prefix_tokens=0)
    backbone = _ThreeBlocks(spec, "test", None)
    backbone.calls = []
    x = torch.randn(2, 3, 8, 12)
    means = torch.nn.functional.avg_pool2d(x, kernel_size=4).permute(0, 2, 3, 1)  # (B, h, w, 3)
    out = backbone(x, [2, 0, -1])["tokens"]
    assert torch.equal(out, torch.cat([means * 3, means * 1, means * 3], -1))
    assert sorted(backbone.calls) == [0, 2]


def _per_layer_features(backbone, images, layers):
    """linear-dinov2's `backbone_features` before the change, as the reference: one embed call per layer, the
    (B, D, h, w) tokens concatenated along the channels."""
    x = centre_pad(images, backbone.spec.patch_size)
    out = [next(embed(backbone, [(x, range(len(x)))], layer, ("tokens",), "cpu", on_device=True))[0]["tokens"]
           .permute(0, 3, 1, 2) for layer in layers]
    return torch.cat(out, 1).clone()


def test_linear_dinov2_embeds_the_dinov2_ms_layers_in_one_backbone_call(backbones):
    backbone = backbones["random_vits16"]
    p = get_protocol("linear-dinov2:dinov2-ms").p
    layers = [-1 - k for k in reversed(range(p.layers))]  # as evaluate() lists them for --layer -1
    assert layers == [-4, -3, -2, -1]
    torch.manual_seed(2)
    images = torch.randn(2, 3, 40, 56)  # centre-padded to 48 × 64
    with _Runs(backbone) as calls, _Runs(backbone.model.blocks[0]) as first:
        feats = backbone_features(SimpleNamespace(device="cpu"), backbone, images, layers, "a test batch")
    assert (calls.n, first.n) == (1, 1)
    with _Runs(backbone) as calls:
        before = _per_layer_features(backbone, images, layers)
    assert calls.n == 4
    # bit-identical and laid out alike, so a head trained on them is unchanged (HEAD_VERSION stays)
    assert feats.shape == (2, 4 * 384, 3, 4) and torch.equal(feats, before) and feats.stride() == before.stride()
    assert not feats.is_inference()  # usable with autograd, as before


def test_non_finite_tokens_of_several_layers_name_the_layers(backbones):
    backbone = backbones["random_vits16"]
    images = torch.full((1, 3, 32, 32), float("nan"))
    with pytest.raises(BackboneError, match=r"gave NaN or infinite values for facet 'tokens' of layers \[-4, -1\] "
                                            r"on item 0: nothing was cached"):
        next(embed(backbone, [(images, [0])], (-4, -1), ("tokens",), "cpu", name_of=lambda i: f"item {i}"))
