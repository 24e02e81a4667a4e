"""Weights that do not fit the model (issue 19), replayed through the command line: keys with a training wrapper's
prefix, a block's tensors missing, a config.json of another size than the weights, a truncated config.json, for
transformers and timm checkpoints, each end in exit 2 naming the keys, the files and the fix, with no record and no
complete cache entry; an intact checkpoint runs and its record lists the sha256 of its weight file."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from hubfake import TIMM_ARGS, make_dinov2_checkpoint, make_timm_checkpoint, save_preprocessor
from safetensors.torch import load_file, save_file
from test_refusals import _cli, _cli_refused, _dinov2_dir, _run_args

from ssl_segbench.backbones import BackboneError, BackboneRef
from ssl_segbench.records import iter_records


def _rewrite(weights, edit):
    """Replace a safetensors file by `edit(state dict)`; returns the keys before and after."""
    before = load_file(weights)
    after = edit(before)
    save_file(after, weights, metadata={"format": "pt"})
    return sorted(before), sorted(after)


def _edit_config(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))


def _model_keys(ckpt):
    """The tensor names of the transformers model its config.json builds (they can differ from the names in the file:
    transformers renames legacy keys such as `attention.attention.key` when loading)."""
    from transformers import Dinov2Config, Dinov2Model

    return sorted(Dinov2Model(Dinov2Config.from_pretrained(ckpt)).state_dict())


def _timm_dir(path):
    """A tiny random timm ViT in timm's save_for_hf layout (config.json with 'architecture', model.safetensors)."""
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TIMM_ARGS).eval()
    save_for_hf(model, str(path), model_args=TIMM_ARGS, safe_serialization=True)
    return path


def _prefixed(state):
    return {f"backbone.{k}": v for k, v in state.items()}


def _refused(tmp_path, data, backbone, *expected, size="64"):
    """Run the CLI on `backbone`; assert exit 2, every `expected` text in the message, no traceback, nothing written.
    Returns the message."""
    args = _run_args(tmp_path, data, backbone)
    args[args.index("--size") + 1] = size
    return _cli_refused(tmp_path, args, *expected)


# --- transformers ---------------------------------------------------------------------------------------------------

def test_keys_with_a_wrapper_prefix_are_refused_with_the_prefix_to_strip(small_synthetic, tmp_path):
    ckpt = _dinov2_dir(tmp_path / "prefixed")
    _rewrite(ckpt / "model.safetensors", _prefixed)
    keys = _model_keys(ckpt)
    _refused(tmp_path, small_synthetic, ckpt, str(ckpt / "model.safetensors"), str(ckpt / "config.json"),
             f"{len(keys)} tensor(s) of the model are missing from the checkpoint: {keys[0]}",
             f"fit no place in the model: backbone.{keys[0]}", f"({len(keys)} in all)",
             "starts with 'backbone.'", "strip that prefix")


def test_a_checkpoint_without_the_last_blocks_attention_and_mlp_is_refused(small_synthetic, tmp_path):
    ckpt = _dinov2_dir(tmp_path / "no-block-1")
    gone = ("encoder.layer.1.attention.", "encoder.layer.1.mlp.")  # in the file's names and the model's alike
    _rewrite(ckpt / "model.safetensors", lambda state: {k: v for k, v in state.items() if not k.startswith(gone)})
    removed = [k for k in _model_keys(ckpt) if k.startswith(gone)]
    assert len(removed) == 12  # q, k, v, o projections and two MLP layers, weight and bias each
    _refused(tmp_path, small_synthetic, ckpt, str(ckpt / "model.safetensors"),
             f"12 tensor(s) of the model are missing from the checkpoint: {', '.join(removed[:3])}, … (12 in all)",
             "would stay random", "complete export")


def test_a_config_with_fewer_layers_than_the_weights_is_refused(small_synthetic, tmp_path):
    ckpt = _dinov2_dir(tmp_path / "fewer-layers")
    extra = [k for k in _model_keys(ckpt) if k.startswith("encoder.layer.1.")]
    # one layer, with the stage names transformers derives from it (a consistent config, only smaller)
    _edit_config(ckpt / "config.json", num_hidden_layers=1, stage_names=None, out_features=None, out_indices=None)
    _refused(tmp_path, small_synthetic, ckpt, str(ckpt / "config.json"),
             f"{len(extra)} tensor(s) of the checkpoint fit no place in the model: {extra[0]}",
             "would be dropped", "use the config.json saved with these weights", "fewer layers")


def test_a_config_of_other_widths_than_the_weights_is_refused(small_synthetic, tmp_path):
    ckpt = _dinov2_dir(tmp_path / "wider-mlp")
    _edit_config(ckpt / "config.json", mlp_ratio=2)  # DINOv2's MLP is mlp_ratio × 32 wide: 128 in the weights
    _refused(tmp_path, small_synthetic, ckpt, "tensor(s) have another shape",
             "encoder.layer.0.mlp.fc1.bias is [128] in the checkpoint but [64] in the model",
             "use the config.json saved with these weights", "other widths")


def test_a_config_transformers_cannot_build_names_the_file(small_synthetic, tmp_path):
    ckpt = _dinov2_dir(tmp_path / "inconsistent")
    _edit_config(ckpt / "config.json", num_hidden_layers=1)  # its stage names still list two layers
    _refused(tmp_path, small_synthetic, ckpt, f"{ckpt / 'config.json'} is not a configuration transformers can build",
             "use the config.json saved with these weights")


@pytest.mark.parametrize("loader", ["transformers", "timm"])
def test_a_truncated_config_json_names_the_file_not_a_json_traceback(small_synthetic, tmp_path, loader):
    ckpt = _dinov2_dir(tmp_path / "cut") if loader == "transformers" else _timm_dir(tmp_path / "cut")
    config = ckpt / "config.json"
    config.write_text(config.read_text()[:60])
    err = _refused(tmp_path, small_synthetic, ckpt, f"checkpoint file {config} is damaged: it is not valid JSON",
                   "config.json saved with these weights")
    assert "JSONDecodeError" not in err


def test_a_truncated_config_json_in_the_hub_cache_says_how_to_download_again(small_synthetic, tmp_path, hub_cache):
    _, sha = make_dinov2_checkpoint(hub_cache, "tiny-org/dinov2-cut-config")
    config = hub_cache / "models--tiny-org--dinov2-cut-config" / "snapshots" / sha / "config.json"
    config.write_text(config.read_text()[:60])
    _refused(tmp_path, small_synthetic, "tiny-org/dinov2-cut-config", f"{config} is damaged", "not valid JSON",
             "hf download tiny-org/dinov2-cut-config", size="56")


# --- timm -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["prefixed", "no-block-1"])
def test_a_timm_local_directory_that_does_not_fit_is_refused(small_synthetic, tmp_path, case):
    ckpt = _timm_dir(tmp_path / case)
    if case == "prefixed":
        keys, _ = _rewrite(ckpt / "model.safetensors", _prefixed)
        expected = [f"{len(keys)} tensor(s) of the model are missing", f"fit no place in the model: backbone.{keys[0]}",
                    "strip that prefix"]
    else:
        before, after = _rewrite(ckpt / "model.safetensors",
                                 lambda s: {k: v for k, v in s.items() if not k.startswith(("blocks.1.attn.",
                                                                                           "blocks.1.mlp."))})
        removed = sorted(set(before) - set(after))
        assert len(removed) == 8  # qkv, proj, fc1, fc2: weight and bias each
        expected = [f"8 tensor(s) of the model are missing from the checkpoint: {removed[0]}", "complete export"]
    _refused(tmp_path, small_synthetic, ckpt, str(ckpt / "model.safetensors"), "timm VisionTransformer", *expected)


def test_a_timm_hub_checkpoint_with_a_missing_block_is_refused(small_synthetic, tmp_path, hub_cache):
    _, sha = make_timm_checkpoint(hub_cache, "tiny-org/vit-no-block-1")
    weights = hub_cache / "models--tiny-org--vit-no-block-1" / "snapshots" / sha / "model.safetensors"
    _rewrite(weights, lambda s: {k: v for k, v in s.items() if not k.startswith("blocks.1.")})
    _refused(tmp_path, small_synthetic, "hf-hub:tiny-org/vit-no-block-1", str(weights),
             "tensor(s) of the model are missing from the checkpoint: blocks.1.attn.proj.bias")


# --- intact checkpoints: they run, and the record names their weights --------------------------------------------

def test_an_intact_checkpoint_runs_and_its_record_lists_the_weights_sha256(small_synthetic, tmp_path):
    ckpt = _dinov2_dir(tmp_path / "intact")
    rc, err = _cli(tmp_path, *_run_args(tmp_path, small_synthetic, ckpt))
    assert rc == 0, err
    (_, record), = iter_records(tmp_path / "res")
    expected = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    assert record.backbone["weights_sha256"] == {"model.safetensors": expected}
    assert "weights_sha256" not in record.identity  # provenance only: the record's key does not depend on it


def test_weights_sha256_is_read_from_the_files_once_and_none_without_weights(hub_cache, monkeypatch):
    _, sha = make_timm_checkpoint(hub_cache, "tiny-org/vit-hashed")
    weights = hub_cache / "models--tiny-org--vit-hashed" / "snapshots" / sha / "model.safetensors"
    ref = BackboneRef("hf-hub:tiny-org/vit-hashed")
    assert ref.weights_sha256() == {"model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}

    def unread(path):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr("ssl_segbench.fingerprint.sha256_file", unread)
    assert BackboneRef("hf-hub:tiny-org/vit-hashed").weights_sha256() == ref.weights_sha256()  # remembered
    assert BackboneRef("pixels").weights_sha256() is None


def test_a_prefixed_copy_of_the_shared_dinov2_is_refused(shared, small_synthetic, tmp_path):
    source = shared / "models" / "dinov2-small-imgfocus"
    ckpt = tmp_path / "dinov2-prefixed"
    shutil.copytree(source, ckpt)
    (ckpt / "model.safetensors").chmod(0o644)
    _rewrite(ckpt / "model.safetensors", _prefixed)
    _refused(tmp_path, small_synthetic, ckpt, str(ckpt / "model.safetensors"), "starts with 'backbone.'",
             "backbone.embeddings.cls_token", size="56")


# --- what may legitimately be absent or extra: modules the benchmark never reads ------------------------------------

def _clip_dir(path):
    """A tiny CLIP dual encoder (text tower, projections, logit scale) saved whole, as openai/clip-* repos are."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = CLIPModel(CLIPConfig(vision_config=dict(tower, image_size=32, patch_size=8), text_config=tower,
                                 projection_dim=16)).eval()
    model.save_pretrained(path)
    save_preprocessor(path)
    return model


def test_a_dual_encoder_loads_its_vision_tower_but_not_without_one_of_its_blocks(tmp_path):
    clip = _clip_dir(tmp_path / "clip")
    loaded = BackboneRef(str(tmp_path / "clip")).load().model.state_dict()  # the text tower is extra, and allowed
    tower = clip.vision_model.state_dict()
    assert loaded.keys() == tower.keys() and all(torch.equal(loaded[k], tower[k]) for k in tower)

    _rewrite(tmp_path / "clip" / "model.safetensors",
             lambda state: {k: v for k, v in state.items() if not k.startswith("vision_model.encoder.layers.1.")})
    # layer 1 of the tower: two layer norms, fc1, fc2 and the q, k, v, out projections, weight and bias each: 16
    with pytest.raises(BackboneError, match=r"16 tensor\(s\) of the model are missing from the checkpoint: "
                                            r"encoder\.layers\.1\.") as e:
        BackboneRef(str(tmp_path / "clip")).load()
    assert "text_model" not in str(e.value)  # the other tower is not what is wrong


def test_an_image_classifier_loads_as_its_encoder_without_pooler_and_head(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    classifier = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, image_size=32, patch_size=8,
                                                     num_labels=5)).eval()
    classifier.save_pretrained(tmp_path / "vit-cls")  # keys 'vit.*' and 'classifier.*', no pooler
    save_preprocessor(tmp_path / "vit-cls")
    bb = BackboneRef(str(tmp_path / "vit-cls")).load()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = classifier.vit(pixel_values=x).last_hidden_state[:, 1:].reshape(1, 4, 4, 32)
        assert torch.allclose(bb(x)["tokens"], expected, atol=1e-5)
