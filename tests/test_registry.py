"""backbones.yaml: the shipped registry is valid and complete; malformed entries are named precisely."""
from __future__ import annotations

import re

import pytest
import yaml

from ssl_segbench.registry import RegistryError, default_registry_path, load_registry


def test_shipped_registry_has_at_least_15_real_checkpoints():
    reg = load_registry()
    real = [s for s in reg.values() if s.loader != "builtin"]
    assert len(real) >= 15
    methods = {s.method for s in real}
    assert {"DINO", "DINOv2", "MAE", "MSN", "I-JEPA"} <= methods
    for s in real:
        assert "/" in s.repo_id and s.license
        assert s.revision is None or re.fullmatch(r"[0-9a-f]{40}", s.revision)
        assert s.revision is None or s.revision_source, f"{s.id}: a pinned sha needs its source"
    assert reg["dinov2_vits14"].revision == "ed25f3a31f01632728cabb09d1542f84ab7b0056"  # MTEB's pin


def test_shipped_registry_facts_that_move_numbers():
    reg = load_registry()
    # registers are prefix tokens; architectures without CLS have none
    assert reg["dinov2_vits14_reg"].num_prefix_tokens == 5
    assert reg["dinov2_vits14"].num_prefix_tokens == 1 and reg["dino_vitb8"].patch_size == 8
    assert reg["siglip_vitb16"].num_prefix_tokens == 0 and reg["siglip_vitb16"].mean == (0.5, 0.5, 0.5)
    assert reg["ijepa_vith14_in1k"].num_prefix_tokens == 0
    for s in reg.values():  # width follows the architecture name
        size = {"ViT-S": 384, "ViT-B": 768, "ViT-L": 1024, "ViT-H": 1280, "ViT-g": 1536}.get(s.arch.split("/")[0])
        if size and s.loader != "builtin":
            assert s.embed_dim == size, s.id


def _entry(**over):
    e = dict(id="x", loader="timm", repo_id="org/x", revision=None, patch_size=16, embed_dim=384,
             num_prefix_tokens=1, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], method="m", paper=None, license="l")
    e.update(over)
    return {k: v for k, v in e.items() if v != "DROP"}


@pytest.mark.parametrize("entry, message", [
    (_entry(colour="red"), r"backbone 'x': unknown key\(s\) \['colour'\]"),
    (_entry(patch_size="DROP"), r"backbone 'x': missing key\(s\) \['patch_size'\]"),
    (_entry(loader="onnx"), r"backbone 'x', key 'loader'"),
    (_entry(revision="main"), r"backbone 'x', key 'revision': must be a full 40-hex"),
    (_entry(num_prefix_tokens=-1), r"key 'num_prefix_tokens'"),
    (_entry(std=[1, 0, 1]), r"key 'std': must be positive"),
    (_entry(mean=[1, 2]), r"key 'mean': must be a list of 3"),
    (_entry(gated=True), r"key 'license_url': a gated checkpoint names the license page"),
    (_entry(gated="yes", license_url="u"), r"key 'gated': must be true or false"),
    (_entry(family="DINO v3"), r"key 'family': must be a lowercase name"),
    (_entry(fixed_input=True), r"key 'image_size': a fixed-input model states its input size"),
    (_entry(min_gpu_memory=0), r"key 'min_gpu_memory'"),
])
def test_malformed_entries_name_entry_and_key(tmp_path, entry, message):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"backbones": [entry]}))
    with pytest.raises(RegistryError, match=message) as err:
        load_registry(path)
    assert str(path) in str(err.value)


def test_duplicate_ids_rejected(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"backbones": [_entry(), _entry()]}))
    with pytest.raises(RegistryError, match="'x' appears twice"):
        load_registry(path)


def test_default_registry_is_the_repository_file():
    assert default_registry_path().name == "backbones.yaml" and default_registry_path().is_file()


def test_the_registry_covers_the_current_families():
    import timm

    reg = load_registry()
    real = [s for s in reg.values() if s.loader != "builtin"]
    assert len(real) >= 50
    dinov3 = {s.repo_id.removeprefix("timm/") for s in reg.values() if s.family == "dinov3"}
    vit_tags = {t for t in timm.list_pretrained("vit_*_dinov3*") if "_qkvb" not in t}
    assert vit_tags <= dinov3  # every DINOv3 ViT timm knows
    for s in reg.values():
        if s.family == "dinov3":
            assert s.num_prefix_tokens == 5 and s.patch_size == 16
        if s.family in ("siglip2", "aimv2"):
            assert s.num_prefix_tokens == 0
    assert reg["dinov3_vitl16_sat"].mean != reg["dinov3_vitl16"].mean  # the satellite model's own statistics
    assert reg["dinov3_vit7b16"].min_gpu_memory and reg["beitv2_vitb16"].fixed_input
    assert {"dinov3", "radio", "pe", "siglip2", "aimv2", "eva02", "deit3", "beitv2", "webssl", "mocov3"} <= \
        {s.family for s in reg.values()}


def test_timm_entries_match_timms_own_model_definitions():
    """Each timm entry's shape facts against the model timm builds for its tag (meta device: no weights)."""
    import timm
    import torch

    for s in load_registry().values():
        if s.loader != "timm" or s.family not in ("dinov3", "radio", "pe", "siglip2", "aimv2", "eva02", "deit3",
                                                  "beitv2"):
            continue
        tag = s.repo_id.removeprefix("timm/")
        with torch.device("meta"):
            m = timm.create_model(tag, pretrained=False, num_classes=0)
        cfg = timm.get_pretrained_cfg(tag)
        assert (s.patch_size, s.embed_dim, s.num_prefix_tokens, s.num_layers) == \
            (m.patch_embed.patch_size[0], m.embed_dim, m.num_prefix_tokens, len(m.blocks)), s.id
        assert s.mean == tuple(cfg.mean) and s.std == tuple(cfg.std) and s.image_size == cfg.input_size[-1], s.id
        assert s.n_parameters == sum(p.numel() for p in m.parameters()), s.id


def test_list_backbones_by_family_shows_params_and_license(capsys):
    from ssl_segbench.cli import main

    assert main(["list", "backbones", "--family", "dinov3"]) == 0
    text = capsys.readouterr().out
    assert "dinov3_vit7b16" in text and "dinov2_vits14" not in text and "dinov3-license" in text
    assert "gated" not in text  # the timm copies ask no one to accept a license first
    assert "6,716.0 M" in text  # parameters
    assert main(["list", "backbones", "--family", "nope"]) == 2
    assert "families:" in capsys.readouterr().err


DINOV3_LICENSE = "https://ai.meta.com/resources/models-and-libraries/dinov3-license/"


def test_dinov3_timm_copies_are_not_gated_and_name_the_dinov3_license():
    """The timm cards carry `license_link` to the DINOv3 license and no access gate."""
    dinov3 = [s for s in load_registry().values() if s.family == "dinov3"]
    assert len(dinov3) == 8
    for s in dinov3:
        assert s.repo_id.startswith("timm/") and not s.gated, s.id
        assert (s.license, s.license_url) == ("dinov3-license", DINOV3_LICENSE), s.id


@pytest.mark.parametrize("entry, revision, width, depth, heads", [
    ("webssl_dino300m", "8529cdb3fb75014932af3b896455fc21c386168e", 1024, 24, 16),
    ("webssl_dino1b", "d3bf033d9c8cc62ea9e73c40956642cad2ec568a", 1536, 40, 24),
])
def test_webssl_entries_carry_mtebs_pins_and_swiglu_parameter_counts(entry, revision, width, depth, heads):
    """Pinned where MTEB pins them; the parameter count is the one a SwiGLU-MLP Dinov2 of that shape has (counted
    here from transformers' own model on the meta device), which a GELU MLP would not give."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    s = load_registry()[entry]
    assert s.revision == revision and "mteb" in s.revision_source.lower()
    assert (s.embed_dim, s.num_layers, s.num_heads) == (width, depth, heads)

    def count(swiglu: bool) -> int:
        cfg = Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                           image_size=s.image_size, patch_size=s.patch_size, use_swiglu_ffn=swiglu)
        with torch.device("meta"):
            return sum(p.numel() for p in Dinov2Model(cfg).parameters())

    assert s.n_parameters == count(swiglu=True) != count(swiglu=False)
    assert "SwiGLU" in s.notes


def test_papers_methods_and_licenses_state_the_release_facts():
    reg = load_registry()
    for s in reg.values():
        if s.family == "radio":  # v4 has its own tech report; v3 cites the AM-RADIO method paper
            v4 = "_radio_v4." in s.repo_id
            assert s.paper == ("https://arxiv.org/abs/2601.17237" if v4 else "https://arxiv.org/abs/2312.06709"), s.id
        if s.family in ("beitv2", "deit3"):  # ImageNet-1k label training is in the method column, not only notes
            assert "supervised" in s.method, s.id
        if s.family == "beitv2":
            assert "fine-tuning" in s.method and s.repo_id.endswith(".in1k_ft_in1k"), s.id
        if s.family == "msn":  # upstream facebookresearch/msn license, not the Hub card's apache-2.0
            assert s.license == "cc-by-nc-4.0" and "apache-2.0" in s.notes, s.id
    assert sum(s.family == "radio" and s.paper.endswith("2601.17237") for s in reg.values()) == 2
    assert sum(s.family == "msn" for s in reg.values()) == 3


def test_mocov3_entries_are_the_mteb_pinned_copies_in_timms_vit_architecture():
    """nyu-visionx/moco-v3-vit-b / -vit-l, at MTEB's pins, are timm ViT-B/16 and ViT-L/16 (CLS only, 224 input): shape
    and parameter count from timm's own model definitions; ImageNet statistics as the MoCo v3 recipe normalises."""
    import timm
    import torch
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    reg = load_registry()
    for id_, repo, rev, arch in [
        ("mocov3_vitb16", "nyu-visionx/moco-v3-vit-b", "7d091cd70772c5c0ecf7f00b5f12ca609a99d69d",
         "vit_base_patch16_224"),
        ("mocov3_vitl16", "nyu-visionx/moco-v3-vit-l", "7bf75358d616f39b9716148bf4e3425f3bd35b47",
         "vit_large_patch16_224"),
    ]:
        s = reg[id_]
        assert (s.loader, s.repo_id, s.revision, s.family) == ("timm", repo, rev, "mocov3")
        assert "mteb" in s.revision_source.lower()
        assert (s.method, s.paper, s.license) == ("MoCo v3", "https://arxiv.org/abs/2104.02057", "cc-by-nc-4.0")
        assert not s.gated and not s.fixed_input
        with torch.device("meta"):
            m = timm.create_model(arch, pretrained=False, num_classes=0)
        assert (s.patch_size, s.embed_dim, s.num_prefix_tokens, s.num_layers, s.num_heads, s.image_size) == \
            (m.patch_embed.patch_size[0], m.embed_dim, m.num_prefix_tokens, len(m.blocks),
             m.blocks[0].attn.num_heads, m.patch_embed.img_size[0])
        assert s.n_parameters == sum(p.numel() for p in m.parameters())
        assert s.mean == tuple(IMAGENET_DEFAULT_MEAN) and s.std == tuple(IMAGENET_DEFAULT_STD)
