"""Backbones load through the real Hub code paths from a fake offline cache, and their facets are what they claim."""
from __future__ import annotations

import pytest
import torch
from hubfake import make_dinov2_checkpoint, make_timm_checkpoint, registry_entry, save_preprocessor

from ssl_segbench.backbones import BackboneError, BackboneRef


@pytest.fixture(scope="module")
def checkpoints(hub_cache, tmp_path_factory):
    timm_model, timm_sha = make_timm_checkpoint(hub_cache)
    dino_model, dino_sha = make_dinov2_checkpoint(hub_cache)
    reg_model, reg_sha = make_dinov2_checkpoint(hub_cache, "tiny-org/dinov2-reg-test", registers=4)
    reg = tmp_path_factory.mktemp("reg") / "backbones.yaml"
    reg.write_text("backbones:\n"
                   + registry_entry("tiny_timm", "timm", "tiny-org/vit-tiny-test", timm_sha, 8, 32, 1)
                   + registry_entry("tiny_timm_unpinned", "timm", "tiny-org/vit-tiny-test", None, 8, 32, 1)
                   + registry_entry("tiny_dinov2", "transformers", "tiny-org/dinov2-tiny-test", dino_sha, 7, 32, 1)
                   + registry_entry("tiny_reg", "transformers", "tiny-org/dinov2-reg-test", None, 7, 32, 5)
                   + registry_entry("tiny_wrong_prefix", "transformers", "tiny-org/dinov2-reg-test", None, 7, 32, 1)
                   + registry_entry("not_cached", "timm", "tiny-org/absent", None, 8, 32, 1))
    return {"registry": str(reg), "timm": (timm_model, timm_sha), "dino": (dino_model, dino_sha),
            "reg": (reg_model, reg_sha)}


def _cls_attention_reference(q, k, heads):
    """Brute force: per head, softmax over keys of q_cls · k / sqrt(d)."""
    b, n, d = q.shape
    hd = d // heads
    out = torch.empty(b, heads, n)
    for h in range(heads):
        qh, kh = q[:, 0, h * hd:(h + 1) * hd], k[:, :, h * hd:(h + 1) * hd]
        out[:, h] = torch.softmax(torch.einsum("bd,bnd->bn", qh, kh) / hd ** 0.5, dim=-1)
    return out


def test_timm_hub_pinned_revision_matches_model(checkpoints):
    model, sha = checkpoints["timm"]
    ref = BackboneRef("tiny_timm", checkpoints["registry"])
    assert ref.revision == sha and ref.source == f"hf-hub:tiny-org/vit-tiny-test@{sha}"
    bb = ref.load()
    x = torch.randn(2, 3, 40, 24)
    out = bb(x, facets=("tokens", "cls", "attn", "keys"))
    ref_tokens = bb.model.forward_features(x)  # the library's own forward, final norm included
    assert out["tokens"].shape == (2, 5, 3, 32)
    torch.testing.assert_close(out["tokens"], ref_tokens[:, 1:].reshape(2, 5, 3, 32))
    torch.testing.assert_close(out["cls"], ref_tokens[:, 0])
    # the weights are the saved checkpoint's: same output as the original model at its native size
    x32 = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb(x32)["tokens"], model.forward_features(x32)[:, 1:].reshape(1, 4, 4, 32))
    # attention from the model's own (non-fused) softmax, captured at attn_drop
    attn_mod = bb.model.blocks[-1].attn
    attn_mod.fused_attn = False
    seen = {}
    h = attn_mod.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    bb.model.forward_features(x)
    h.remove()
    torch.testing.assert_close(out["attn"], seen["a"][:, :, 0, 1:].reshape(2, 2, 5, 3))


def test_timm_unpinned_records_resolved_commit(checkpoints):
    ref = BackboneRef("tiny_timm_unpinned", checkpoints["registry"])
    assert ref.revision == checkpoints["timm"][1]


def test_transformers_from_pretrained_tokens_and_attention(checkpoints):
    model, sha = checkpoints["dino"]
    ref = BackboneRef("tiny_dinov2", checkpoints["registry"])
    assert ref.revision == sha
    bb = ref.load()
    x = torch.randn(2, 3, 28, 21)
    out = bb(x, facets=("tokens", "cls", "attn", "keys", "queries"))
    with torch.no_grad():
        hf = model(pixel_values=x)
    torch.testing.assert_close(out["tokens"], hf.last_hidden_state[:, 1:].reshape(2, 4, 3, 32))
    torch.testing.assert_close(out["cls"], hf.last_hidden_state[:, 0])
    assert out["keys"].shape == (2, 4, 3, 32)
    # independent reference: recompute q, k from the last block's input with its own projections
    with torch.no_grad():
        hs = model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        layer = model.encoder.layer[-1]
        normed = layer.norm1(hs)
        qq, kk = layer.attention.q_proj(normed), layer.attention.k_proj(normed)
    torch.testing.assert_close(out["keys"], kk[:, 1:].reshape(2, 4, 3, 32))
    torch.testing.assert_close(out["queries"], qq[:, 1:].reshape(2, 4, 3, 32))
    torch.testing.assert_close(out["attn"], _cls_attention_reference(qq, kk, 2)[:, :, 1:].reshape(2, 2, 4, 3))


def test_register_tokens_are_dropped_by_count(checkpoints):
    model, _ = checkpoints["reg"]
    bb = BackboneRef("tiny_reg", checkpoints["registry"]).load()
    x = torch.randn(1, 3, 21, 28)
    out = bb(x, facets=("tokens",))
    with torch.no_grad():
        hf = model(pixel_values=x).last_hidden_state
    assert hf.shape[1] == 1 + 4 + 12
    torch.testing.assert_close(out["tokens"], hf[:, 5:].reshape(1, 3, 4, 32))


def test_wrong_prefix_count_in_registry_is_an_error(checkpoints):
    with pytest.raises(BackboneError, match="num_prefix_tokens=1"):
        BackboneRef("tiny_wrong_prefix", checkpoints["registry"]).load()


def test_missing_from_offline_cache_says_so(checkpoints):
    with pytest.raises(BackboneError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        BackboneRef("not_cached", checkpoints["registry"])


def test_unknown_backbone_lists_known(checkpoints):
    with pytest.raises(BackboneError, match="Known: tiny_timm"):
        BackboneRef("nope", checkpoints["registry"])


def test_adhoc_transformers_repo_id_and_local_dir(checkpoints, hub_cache, tmp_path):
    model, sha = checkpoints["dino"]
    ref = BackboneRef(f"tiny-org/dinov2-tiny-test@{sha}", checkpoints["registry"])
    assert (ref.spec.patch_size, ref.spec.embed_dim, ref.spec.num_prefix_tokens, ref.revision) == (7, 32, 1, sha)
    model.save_pretrained(tmp_path / "ckpt")
    save_preprocessor(tmp_path / "ckpt")
    local = BackboneRef(str(tmp_path / "ckpt"), checkpoints["registry"])
    assert local.revision.startswith("local-sha256:")
    x = torch.randn(1, 3, 14, 14)
    torch.testing.assert_close(local.load()(x)["tokens"], ref.load()(x)["tokens"])


def test_adhoc_timm_hf_hub_id(checkpoints):
    ref = BackboneRef("hf-hub:tiny-org/vit-tiny-test", checkpoints["registry"])
    assert (ref.spec.patch_size, ref.spec.num_prefix_tokens, ref.revision) == (8, 1, checkpoints["timm"][1])


def test_pixels_and_random_vit_baselines():
    pix = BackboneRef("pixels").load()
    x = torch.arange(2 * 3 * 32 * 48, dtype=torch.float32).reshape(2, 3, 32, 48)
    tok = pix(x)["tokens"]
    assert tok.shape == (2, 2, 3, 768)
    # patch (row 1, col 2) of image 1, channel 0, pixel (0, 0) is x[1, 0, 16, 32]
    assert tok[1, 1, 2, 0] == x[1, 0, 16, 32]
    torch.testing.assert_close(tok[1, 1, 2].reshape(3, 16, 16), x[1, :, 16:32, 32:48])
    a = BackboneRef("random_vits16").load()(torch.ones(1, 3, 32, 32))["tokens"]
    b = BackboneRef("random_vits16").load()(torch.ones(1, 3, 32, 32))["tokens"]
    torch.testing.assert_close(a, b)  # seeded: identical weights every time
