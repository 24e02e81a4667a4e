"""Every architecture family of the registry, as a tiny random checkpoint of its own timm / transformers class in the
fake Hub cache, loaded by a registry id through the real `hf-hub:` / `from_pretrained` paths with HF_HUB_OFFLINE=1:
token grids and prefix stripping against the library's own forward, keys and CLS attention against a computation from
the block's own weights (after the rotary embedding where the model applies one), and `ssl-segbench run` end to end."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hubfake import make_dinov2_checkpoint, make_timm_arch_checkpoint

from ssl_segbench.backbones import BackboneError, BackboneRef
from ssl_segbench.cli import main
from ssl_segbench.records import iter_records

P8 = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
P7 = dict(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2)
# family → (timm architecture of the real checkpoints, tiny size, prefix tokens)
FAMILIES = {
    "dinov3": ("vit_small_patch16_dinov3", P8, 5),  # Eva: RoPE, CLS + 4 registers
    "eva02": ("eva02_tiny_patch14_224", P7, 1),  # Eva: RoPE, CLS
    "pe": ("vit_pe_spatial_tiny_patch16_512", P8, 1),  # Eva with AttentionRope
    "radio": ("vit_base_patch16_radio_v3", P8, 8),  # ViT: summary tokens + registers
    "siglip2": ("vit_base_patch16_siglip_224", P8, 0),  # ViT: no CLS
    "aimv2": ("aimv2_large_patch14_224", P7, 0),  # ViT: no CLS, RMSNorm, SwiGLU
    "deit3": ("deit3_small_patch16_224", P8, 1),  # ViT with layer scale
    "beitv2": ("beitv2_base_patch16_224", P8, 1),  # BEiT: relative position bias, fixed input size
}
CLS_FREE = {"siglip2", "aimv2"}


def _entry(id_, loader, repo, patch, dim, prefix, image_size, extra="") -> str:
    return (f"  - id: {id_}\n    loader: {loader}\n    repo_id: {repo}\n    revision: null\n    patch_size: {patch}\n"
            f"    embed_dim: {dim}\n    num_prefix_tokens: {prefix}\n    image_size: {image_size}\n"
            "    mean: [0.5, 0.5, 0.5]\n    std: [0.5, 0.5, 0.5]\n    method: test\n    paper: null\n"
            f"    license: test\n{extra}")


@pytest.fixture(scope="module")
def families(hub_cache, tmp_path_factory):
    models, text = {}, "backbones:\n"
    for fam, (arch, args, prefix) in FAMILIES.items():
        model, _ = make_timm_arch_checkpoint(hub_cache, f"tiny-org/{fam}-tiny", arch, args)
        models[fam] = model
        text += _entry(f"tiny_{fam}", "timm", f"tiny-org/{fam}-tiny", args["patch_size"], 32, prefix,
                       args["img_size"], "    fixed_input: true\n" if fam == "beitv2" else "")
    models["webssl"], _ = make_dinov2_checkpoint(hub_cache, "tiny-org/webssl-tiny")
    text += _entry("tiny_webssl", "transformers", "tiny-org/webssl-tiny", 7, 32, 1, 28)
    text += _entry("tiny_gated", "timm", "tiny-org/gated-absent", 8, 32, 5, 32,
                   "    gated: true\n    license_url: https://huggingface.co/tiny-org/gated-absent\n")
    reg = tmp_path_factory.mktemp("families") / "backbones.yaml"
    reg.write_text(text)
    return str(reg), models


def _input(fam: str) -> torch.Tensor:
    _, args, _ = FAMILIES.get(fam, (None, P7, 1))
    p = args["patch_size"]
    torch.manual_seed(1)
    if fam == "beitv2":  # its relative position bias is fixed to the native grid
        return torch.randn(2, 3, args["img_size"], args["img_size"])
    return torch.randn(2, 3, 5 * p, 3 * p)  # not the native size, not square


def _reference_qk(model, layer: int, x: torch.Tensor):
    """q, k (B, heads, N, hd) and the additive bias of timm block `layer`, recomputed from the block's input with its
    own weights: fused qkv (or separate projections), q/k biases, q/k norms, the model's rotary embedding on the
    patch tokens, BEiT's relative position bias."""
    blk = model.blocks[layer]
    attn = blk.attn
    seen = {}
    h = blk.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0]), with_kwargs=True)
    with torch.no_grad():
        model.forward_features(x)
    h.remove()
    with torch.no_grad():
        y = blk.norm1(seen["x"])
        b, n, _ = y.shape
        heads = attn.num_heads
        if getattr(attn, "qkv", None) is not None:
            bias = None
            if getattr(attn, "q_bias", None) is not None:
                k_bias = getattr(attn, "k_bias", None)
                bias = torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias) if k_bias is None else k_bias,
                                  attn.v_bias))
            qkv = F.linear(y, attn.qkv.weight, bias if bias is not None else attn.qkv.bias)
            q, k, _ = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = attn.q_proj(y).reshape(b, n, heads, -1).transpose(1, 2)
            k = attn.k_proj(y).reshape(b, n, heads, -1).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # BEiT's attention has no q/k norm
            q, k = attn.q_norm(q), attn.k_norm(k)
        rope = getattr(model, "rope", None)
        if rope is not None:
            from timm.layers import apply_rot_embed_cat

            grid = (x.shape[-2] // model.patch_embed.patch_size[0], x.shape[-1] // model.patch_embed.patch_size[1])
            emb = rope.get_embed(shape=grid)
            npt, half = model.num_prefix_tokens, getattr(attn, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], emb, half=half)], dim=2)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], emb, half=half)], dim=2)
        rel = attn._get_rel_pos_bias() if hasattr(attn, "_get_rel_pos_bias") else None
    return q, k, rel


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_timm_family_tokens_keys_and_attention_from_the_blocks_own_weights(families, fam):
    registry, models = families
    _, args, prefix = FAMILIES[fam]
    bb = BackboneRef(f"tiny_{fam}", registry).load()
    x = _input(fam)
    p = args["patch_size"]
    h, w = x.shape[-2] // p, x.shape[-1] // p
    facets = ("tokens", "keys", "queries") if fam in CLS_FREE else ("tokens", "cls", "keys", "queries", "attn")
    out = bb(x, facets=facets)
    with torch.no_grad():
        full = bb.model.forward_features(x)  # the library's own forward, final norm included
    assert full.shape[1] == prefix + h * w
    # every prefix token (CLS, registers, summary tokens) is dropped: a leaked register shifts every row
    torch.testing.assert_close(out["tokens"], full[:, prefix:].reshape(2, h, w, 32))
    q, k, rel = _reference_qk(bb.model, -1, x)
    heads, hd = q.shape[1], q.shape[-1]
    torch.testing.assert_close(out["keys"], k.transpose(1, 2).reshape(2, -1, heads * hd)[:, prefix:]
                               .reshape(2, h, w, -1))
    torch.testing.assert_close(out["queries"], q.transpose(1, 2).reshape(2, -1, heads * hd)[:, prefix:]
                               .reshape(2, h, w, -1))
    if fam in CLS_FREE:
        with pytest.raises(BackboneError, match="no CLS token"):
            bb(x, facets=("attn",))
        return
    torch.testing.assert_close(out["cls"], full[:, 0])
    ref = torch.empty(2, heads, q.shape[2])
    for head in range(heads):  # per head: softmax over all keys of q_cls · k / sqrt(hd) (+ the bias row)
        logits = torch.einsum("bd,bnd->bn", q[:, head, 0], k[:, head]) * hd ** -0.5
        if rel is not None:
            logits = logits + rel[0, head, 0] if rel.dim() == 4 else logits + rel[head, 0]
        ref[:, head] = logits.softmax(-1)
    torch.testing.assert_close(out["attn"], ref[:, :, prefix:].reshape(2, heads, h, w))


def test_beit_refuses_an_input_size_it_cannot_take(families):
    registry, _ = families
    bb = BackboneRef("tiny_beitv2", registry).load()
    with pytest.raises(BackboneError, match="takes only 32×32 input.*--resize square --size 32"):
        bb(torch.randn(1, 3, 40, 24))


def test_webssl_dinov2_architecture_tokens(families):
    registry, models = families
    bb = BackboneRef("tiny_webssl", registry).load()
    x = torch.randn(1, 3, 35, 21)
    with torch.no_grad():
        ref = models["webssl"](pixel_values=x).last_hidden_state
    torch.testing.assert_close(bb(x)["tokens"], ref[:, 1:].reshape(1, 5, 3, 32))


def test_gated_checkpoint_offline_error_names_the_license_page_and_the_download(families):
    registry, _ = families
    with pytest.raises(BackboneError, match=r"gated.*accept its license at https://huggingface.co/tiny-org/"
                                            r"gated-absent.*hf auth login.*`hf download tiny-org/gated-absent`"):
        BackboneRef("tiny_gated", registry)


def _run(registry, fam, data, results, protocols, *extra):
    size = ["--resize", "square", "--size", "32"] if fam == "beitv2" else ["--size", "32" if fam != "eva02" and
                                                                           fam != "aimv2" and fam != "webssl"
                                                                           else "28"]
    return main(["run", "--backbone", f"tiny_{fam}", "--registry", registry, "--dataset", "synthetic",
                 "--data-root", str(data), *size, "--protocol", protocols, "--seeds", "1",
                 "--results-dir", str(results), *extra])


@pytest.mark.parametrize("fam", [*sorted(FAMILIES), "webssl"])
def test_each_family_runs_kmeans_and_an_attention_protocol_or_is_refused_first(families, fam, small_synthetic,
                                                                                tmp_path, capsys):
    registry, _ = families
    attention = ["--param", "leopart-cd.cbfe_k=8", "--param", "leopart-cd.k=4", "--param", "leopart-cd.fit_splits=eval",
                 "--param", "leopart-cd.pca_dim=16"]  # the tiny models are 32 wide
    if fam in CLS_FREE:
        assert _run(registry, fam, small_synthetic, tmp_path / "res", "kmeans") == 0
        capsys.readouterr()
        assert _run(registry, fam, small_synthetic, tmp_path / "res2", "leopart-cd", *attention) == 2
        msg = capsys.readouterr().err
        assert "needs attn of the backbone" in msg and "no CLS token" in msg and "kmeans" in msg
        assert not (tmp_path / "res2").exists()  # refused before any work
        names = {r.protocol["name"] for _, r in iter_records(tmp_path / "res")}
        assert names == {"kmeans"}
        return
    assert _run(registry, fam, small_synthetic, tmp_path / "res", "kmeans,leopart-cd", *attention) == 0
    recs = {r.protocol["name"]: r for _, r in iter_records(tmp_path / "res")}
    assert set(recs) == {"kmeans", "leopart-cd"}
    assert recs["kmeans"].backbone["num_prefix_tokens"] == (FAMILIES[fam][2] if fam in FAMILIES else 1)


def test_a_fixed_input_backbone_is_refused_before_any_work_at_another_size(families, small_synthetic, tmp_path,
                                                                           capsys):
    registry, _ = families
    assert main(["run", "--backbone", "tiny_beitv2", "--registry", registry, "--dataset", "synthetic",
                 "--data-root", str(small_synthetic), "--size", "32", "--protocol", "kmeans",
                 "--results-dir", str(tmp_path / "res")]) == 2
    assert "takes only 32×32 input" in capsys.readouterr().err and not (tmp_path / "res").exists()
