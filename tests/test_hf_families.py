"""The transformers families added for issue 23 (DINOv3, SigLIP2 with NaFlex input, AIMv2, TIPSv2, MetaCLIP 2, and
vision encoders saved alone), each a tiny random checkpoint of the real transformers class saved with `save_pretrained`
into the fake Hub cache or a local directory and loaded by registry id or path through `from_pretrained` (dual encoders
as their vision tower): patch tokens against the model's own forward (prefix tokens cut by count, final norm on every
block), keys/queries against the block's own projections (after DINOv3's rotary embedding, recomputed by hand), CLS
attention against the library's eager attention probabilities, and `ssl-segbench run` end to end; what cannot be had
exactly is refused, saying why, with nothing written."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hubfake import _snapshot, save_preprocessor
from test_backbone_families import _entry
from test_refusals import _nothing_written

from ssl_segbench.backbones import BackboneError, BackboneRef
from ssl_segbench.cli import main
from ssl_segbench.records import iter_records

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=7)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64)


def _build(family: str):
    """(saved model, its vision encoder, prefix tokens, the one input size it takes or None) of a tiny `family`."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "dinov3":  # CLS + 2 registers, RoPE
        m = tf.DINOv3ViTModel(tf.DINOv3ViTConfig(num_register_tokens=2, image_size=28, **VISION))
        return m, m, 3, None
    if family == "siglip2":  # image-text model, loaded as its NaFlex vision tower; no CLS
        m = tf.Siglip2Model(tf.Siglip2Config(text_config=TEXT, vision_config=dict(num_patches=16, **VISION)))
        return m, m.vision_model, 0, None
    if family == "tipsv2":  # image-text model, loaded as its vision tower; CLS + 1 register (its second CLS)
        m = tf.Tipsv2Model(tf.Tipsv2Config(text_config=TEXT, vision_config=dict(image_size=28, **VISION)))
        return m, m.vision_model, 2, None
    if family == "aimv2":  # native resolution: sinusoidal positions for any grid; no CLS, RMSNorm
        m = tf.Aimv2VisionModel(tf.Aimv2VisionConfig(is_native=True, image_size=28, **VISION))
        return m, m, 0, None
    if family == "aimv2_224":  # learned positions for exactly (28 / 7)² patches
        m = tf.Aimv2VisionModel(tf.Aimv2VisionConfig(image_size=28, **VISION))
        return m, m, 0, 28
    if family == "aimv2_lit":  # image-text AIMv2: its vision tower cannot be loaded alone
        m = tf.Aimv2Model(tf.Aimv2Config(text_config=TEXT, vision_config=dict(image_size=28, **VISION)))
        return m, m.vision_model, 0, None
    raise KeyError(family)


FAMILIES = ("dinov3", "siglip2", "tipsv2", "aimv2", "aimv2_224")
# the norm each family's transformers forward applies to its last block's output
FINAL_NORM = {"dinov3": "norm", "siglip2": "post_layernorm", "tipsv2": "layernorm", "aimv2": "rms_norm"}


@pytest.fixture(scope="module")
def hf_families(hub_cache, tmp_path_factory):
    """family → (vision encoder, prefix tokens, fixed size); the registry; a local checkpoint directory per family."""
    built, text, dirs = {}, "backbones:\n", {}
    root = tmp_path_factory.mktemp("hf-families")
    for fam in (*FAMILIES, "aimv2_lit"):
        model, vision, prefix, fixed = _build(fam)
        snap, _ = _snapshot(hub_cache, f"tiny-org/{fam}-hf", fam)
        model.eval().save_pretrained(snap)
        dirs[fam] = root / fam
        model.save_pretrained(dirs[fam])
        save_preprocessor(dirs[fam], ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
        built[fam] = (vision.eval(), prefix, fixed)
        text += _entry(f"tiny_{fam}", "transformers", f"tiny-org/{fam}-hf", 7, 32, prefix, 28,
                       "    fixed_input: true\n" if fixed else "")
    reg = root / "backbones.yaml"
    reg.write_text(text)
    return built, str(reg), dirs


def _input(fixed):
    torch.manual_seed(1)
    return torch.randn(2, 3, 28, 28) if fixed else torch.randn(2, 3, 35, 21)  # 5×3 patches: not square, not native


def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """SigLIP2's NaFlex layout by hand: patches row by row, each patch's pixels row by row, RGB innermost."""
    b, c, height, width = x.shape
    return x.reshape(b, c, height // p, p, width // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)


def _own_forward(model, x, **kw):
    if "Siglip2" in type(model).__name__:
        h, w = x.shape[-2] // 7, x.shape[-1] // 7
        return model(pixel_values=_patchify(x, 7), spatial_shapes=torch.tensor([[h, w]] * len(x)),
                     pixel_attention_mask=torch.ones(len(x), h * w, dtype=torch.long), **kw)
    return model(pixel_values=x, **kw)


def _layers(model):
    return model.model.layer if hasattr(model, "rope_embeddings") else getattr(model.encoder, "layer", None) or \
        model.encoder.layers


def _reference_qk(model, x, layer):
    """q, k (B, N, D) of block `layer` from its input, its pre-attention norm and its q/k projections; for DINOv3 the
    rotary embedding is applied to the patch tokens by hand (x·cos + rotate_half(x)·sin, per head)."""
    blk = _layers(model)[layer]
    seen = {}
    hook = blk.register_forward_pre_hook(lambda _m, a: seen.update(x=a[0]))
    with torch.no_grad():
        _own_forward(model, x)
    hook.remove()
    norm = next(getattr(blk, n) for n in ("norm1", "layer_norm1", "rms_norm1") if hasattr(blk, n))
    att = blk.attention if hasattr(blk, "attention") else blk.self_attn
    with torch.no_grad():
        y = norm(seen["x"])
        q, k = att.q_proj(y), att.k_proj(y)
        if hasattr(model, "rope_embeddings"):
            cos, sin = model.rope_embeddings(x)
            b, n, d = q.shape
            heads = model.config.num_attention_heads
            npt = n - cos.shape[0]

            def rope(t):
                t = t.reshape(b, n, heads, d // heads)
                pre, pat = t[:, :npt], t[:, npt:]
                half = pat.shape[-1] // 2
                rotated = torch.cat((-pat[..., half:], pat[..., :half]), -1)
                pat = pat * cos[None, :, None] + rotated * sin[None, :, None]
                return torch.cat((pre, pat), 1).reshape(b, n, d)

            q, k = rope(q), rope(k)
    return q, k


@pytest.mark.parametrize("fam", FAMILIES)
def test_tokens_keys_and_attention_equal_the_models_own_computation(hf_families, fam):
    built, registry, _ = hf_families
    vision, prefix, fixed = built[fam]
    bb = BackboneRef(f"tiny_{fam}", registry).load()
    x = _input(fixed)
    h, w = x.shape[-2] // 7, x.shape[-1] // 7
    first = {}  # the first block's own output, seen by a hook
    hook = _layers(vision)[0].register_forward_hook(
        lambda _m, _a, o: first.update(x=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        full = _own_forward(vision, x)
    hook.remove()
    assert full.last_hidden_state.shape[1] == prefix + h * w
    final_norm = getattr(vision, FINAL_NORM[fam.split("_")[0]])
    for layer in (-1, 0):
        out = bb(x, layer=layer, facets=("tokens", "keys", "queries"))
        with torch.no_grad():  # every block's tokens get the final norm, which the library applies to the last only
            ref = full.last_hidden_state if layer == -1 else final_norm(first["x"])
        torch.testing.assert_close(out["tokens"], ref[:, prefix:].reshape(2, h, w, 32))
        q, k = _reference_qk(vision, x, layer)
        torch.testing.assert_close(out["queries"], q[:, prefix:].reshape(2, h, w, 32))
        torch.testing.assert_close(out["keys"], k[:, prefix:].reshape(2, h, w, 32))
    if prefix == 0:
        with pytest.raises(BackboneError, match="no CLS token"):
            bb(x, facets=("attn",))
        return
    out = bb(x, facets=("cls", "attn"))
    torch.testing.assert_close(out["cls"], full.last_hidden_state[:, 0])
    vision.set_attn_implementation("eager")  # the library's own softmax attention probabilities
    try:
        with torch.no_grad():
            probs = _own_forward(vision, x, output_attentions=True).attentions[-1]
    finally:
        vision.set_attn_implementation("sdpa")
    torch.testing.assert_close(out["attn"], probs[:, :, 0, prefix:].reshape(2, 2, h, w))


# model_type of a checkpoint saved as a vision encoder alone, or (no "_vision_model") an image-text model whose vision
# tower is loaded alone → (transformers class prefix, vision config, prefix tokens)
VISION_ENCODERS = {
    "clip_vision_model": ("CLIPVision", dict(image_size=28), 1),
    "metaclip_2": ("MetaClip2", dict(image_size=28), 1),
    "siglip_vision_model": ("SiglipVision", dict(image_size=28), 0),
    "siglip2_vision_model": ("Siglip2Vision", dict(num_patches=16), 0),
    "tipsv2_vision_model": ("Tipsv2Vision", dict(image_size=28, num_register_tokens=1), 2),
}
CLIP_LAYOUT = ("clip_vision_model", "metaclip_2")  # final norm: post_layernorm, CLS only


@pytest.mark.parametrize("model_type", sorted(VISION_ENCODERS))
def test_vision_encoders_load_alone_with_their_tokens(model_type, tmp_path):
    import transformers as tf

    name, vision_cfg, prefix = VISION_ENCODERS[model_type]
    config = getattr(tf, f"{name}Config")
    torch.manual_seed(0)
    if model_type.endswith("_vision_model"):
        model = vision = getattr(tf, f"{name}Model")(config(**VISION, **vision_cfg))
    else:
        model = getattr(tf, f"{name}Model")(config(text_config=TEXT, vision_config=dict(VISION, **vision_cfg)))
        vision = model.vision_model
    assert model.config.model_type == model_type
    model.eval().save_pretrained(tmp_path / "ckpt")
    save_preprocessor(tmp_path / "ckpt", ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    bb = BackboneRef(str(tmp_path / "ckpt")).load()
    assert bb.spec.num_prefix_tokens == prefix
    x = _input(None)
    with torch.no_grad():
        kw = {} if "siglip2" in model_type or "tipsv2" in model_type else {"interpolate_pos_encoding": True}
        ref = _own_forward(vision, x, **kw).last_hidden_state
        if model_type in CLIP_LAYOUT:  # CLIP's post_layernorm, which transformers applies to the CLS only
            ref = vision.post_layernorm(ref)
    torch.testing.assert_close(bb(x)["tokens"], ref[:, prefix:].reshape(2, 5, 3, 32))


def test_a_registry_entry_that_hides_a_fixed_grid_is_refused(hf_families, tmp_path):
    _, registry, _ = hf_families
    text = Path(registry).read_text().replace("    fixed_input: true\n", "")
    (tmp_path / "backbones.yaml").write_text(text)
    with pytest.raises(BackboneError, match="backbones.yaml says fixed_input=False but .* has True: fix the registry"):
        BackboneRef("tiny_aimv2_224", str(tmp_path / "backbones.yaml")).load()


def test_fixed_grid_aimv2_refuses_another_size(hf_families):
    _, registry, _ = hf_families
    bb = BackboneRef("tiny_aimv2_224", registry).load()
    with pytest.raises(BackboneError, match=r"takes only 28×28 input.*--resize square --size 28"):
        bb(torch.randn(1, 3, 35, 21))


def test_adhoc_checkpoints_read_prefix_tokens_and_input_size_from_their_config(hf_families):
    built, _, dirs = hf_families
    for fam in FAMILIES:
        ref = BackboneRef(str(dirs[fam]))
        assert ref.spec.num_prefix_tokens == built[fam][1], fam
        assert ref.spec.fixed_input == (built[fam][2] is not None), fam
        if built[fam][2]:
            assert ref.spec.image_size == built[fam][2]


def _run(registry, backbone, data, results, protocols, *extra):
    return main(["run", "--backbone", backbone, "--registry", registry, "--dataset", "synthetic", "--data-root",
                 str(data), "--size", "28", "--protocol", protocols, "--seeds", "1", "--results-dir", str(results),
                 *extra])


ATTENTION = ["--param", "leopart-cd.cbfe_k=8", "--param", "leopart-cd.k=4", "--param", "leopart-cd.fit_splits=eval",
             "--param", "leopart-cd.pca_dim=16"]  # the tiny models are 32 wide


@pytest.mark.parametrize("fam", FAMILIES)
def test_each_family_runs_through_the_cli_or_refuses_the_cls_protocol(hf_families, fam, small_synthetic, tmp_path,
                                                                       capsys, monkeypatch):
    built, registry, _ = hf_families
    prefix = built[fam][1]
    if prefix == 0:
        monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
        assert _run(registry, f"tiny_{fam}", small_synthetic, tmp_path / "res", "leopart-cd", *ATTENTION) == 2
        msg = capsys.readouterr().err
        assert "needs attn of the backbone" in msg and "no CLS token" in msg
        _nothing_written(tmp_path)
        protocols, extra = "kmeans", []
    else:
        protocols, extra = "kmeans,leopart-cd", ATTENTION
    square = ["--resize", "square"] if built[fam][2] else []  # a fixed-grid model takes only 28×28
    assert _run(registry, f"tiny_{fam}", small_synthetic, tmp_path / "ok", protocols, *extra, *square) == 0
    recs = {r.protocol["name"]: r for _, r in iter_records(tmp_path / "ok")}
    assert set(recs) == set(protocols.split(","))
    assert recs["kmeans"].backbone["num_prefix_tokens"] == prefix


def test_fixed_grid_aimv2_run_at_another_size_is_refused_before_any_work(hf_families, small_synthetic, tmp_path,
                                                                         capsys, monkeypatch):
    _, _, dirs = hf_families
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    assert main(["run", "--backbone", str(dirs["aimv2_224"]), "--dataset", "synthetic", "--data-root",
                 str(small_synthetic), "--size", "35", "--protocol", "kmeans", "--seeds", "1", "--results-dir",
                 str(tmp_path / "res")]) == 2
    assert "takes only 28×28 input" in capsys.readouterr().err
    _nothing_written(tmp_path)


def test_image_text_aimv2_is_refused_naming_why_and_what_to_use(hf_families, small_synthetic, tmp_path, capsys,
                                                                monkeypatch):
    _, registry, _ = hf_families
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    assert _run(registry, "tiny_aimv2_lit", small_synthetic, tmp_path / "res", "kmeans") == 2
    msg = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "'aimv2' is not supported" in msg and "cannot load its vision tower on its own" in msg
    assert "aimv2_vision_model" in msg
    _nothing_written(tmp_path)
