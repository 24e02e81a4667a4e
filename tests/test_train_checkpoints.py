"""Training checkpoints as backbones (issue 23): files laid out as DINO, DINOv2, MAE and I-JEPA training code saves
them, built here from timm models, load back into `--arch` with the original module's exact tokens; the record names
the key set and the file's sha256; a wrong architecture, a checkpoint of another size and misplaced options are
refused by name with nothing written."""
from __future__ import annotations

import argparse
import hashlib
import json

import pytest
import timm
import torch
from test_refusals import _cli, _cli_refused, _run_args

from ssl_segbench.backbones import BackboneError, BackboneRef
from ssl_segbench.backbones.checkpoint import backbone_state, choose_key_set, key_sets, unchunk
from ssl_segbench.cli import build_parser, run_options
from ssl_segbench.runner import RunOptions

TINY = "vit_tiny_patch16_224"
DINOV2 = "vit_small_patch14_reg4_dinov2"
CHUNKS = 4  # DINOv2's block_chunks: 12 blocks in chunks of 3, named blocks.<chunk>.<global index>


def _model(arch: str, seed: int):
    """A randomly initialised timm model, its CLS token on a 1/1024 grid (so DINOv2's cls + pos[0] split is exact)."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    with torch.no_grad():
        model.cls_token.copy_(torch.round(torch.randn_like(model.cls_token) * 1024) / 1024)
    return model


def _tokens(model, x):
    """Reference tokens: the timm module's own forward_features (final norm), prefix tokens removed, as a grid."""
    p = model.patch_embed.patch_size[0]
    out = model.forward_features(x)[:, model.num_prefix_tokens:]
    return out.reshape(x.shape[0], x.shape[2] // p, x.shape[3] // p, -1)


def _official_dinov2(model) -> dict:
    """The timm DINOv2-with-registers weights in the names of facebookresearch/dinov2's DinoVisionTransformer:
    `register_tokens`, `pos_embed` with a CLS row (here 0.25, taken back out of `cls_token`), `mask_token`, and
    chunked blocks."""
    sd = model.state_dict()
    per_chunk = len(model.blocks) // CHUNKS
    pos0 = torch.full_like(sd["pos_embed"][:, :1], 0.25)
    out = {"cls_token": sd["cls_token"] - pos0, "pos_embed": torch.cat([pos0, sd["pos_embed"]], 1),
           "register_tokens": sd["reg_token"], "mask_token": torch.zeros(1, model.embed_dim)}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            out[f"blocks.{i // per_chunk}.{i}.{k.split('.', 2)[2]}"] = v
        elif k not in ("cls_token", "pos_embed", "reg_token"):
            out[k] = v
    return out


DINOV2_HEADS = {"dino_head.mlp.0.weight": torch.zeros(8, 384), "dino_head.last_layer.weight_g": torch.ones(16, 1),
                "ibot_head.mlp.0.weight": torch.zeros(8, 384)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{layout: (file, {key set: original module})} for DINOv2 (teacher_checkpoint.pth), DINO, MAE and I-JEPA."""
    root = tmp_path_factory.mktemp("ckpts")
    dinov2, student, teacher, mae, target, context = (_model(DINOV2, 0), _model(TINY, 1), _model(TINY, 2),
                                                      _model(TINY, 3), _model(TINY, 4), _model(TINY, 5))
    files = {
        "dinov2": ({"teacher": {**{f"backbone.{k}": v for k, v in _official_dinov2(dinov2).items()},
                                **DINOV2_HEADS}}, {"teacher": dinov2}),
        "dino": ({"student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                              "module.head.mlp.0.weight": torch.zeros(4, 192)},
                  "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                              "head.mlp.0.weight": torch.zeros(4, 192)},
                  "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "epoch": 7,
                  "args": argparse.Namespace(arch="vit_tiny", patch_size=16)},
                 {"teacher": teacher, "student": student}),
        "mae": ({"model": {**mae.state_dict(), "mask_token": torch.zeros(1, 1, 8),
                           "decoder_embed.weight": torch.zeros(8, 192), "decoder_pred.bias": torch.zeros(3)},
                 "epoch": 1, "args": argparse.Namespace(model="mae_vit_tiny")}, {"model": mae}),
        "ijepa": ({"target_encoder": {f"module.{k}": v for k, v in target.state_dict().items()},
                   "encoder": {f"module.{k}": v for k, v in context.state_dict().items()},
                   "predictor": {"module.predictor_embed.weight": torch.zeros(4, 192)}, "epoch": 3},
                  {"target_encoder": target, "encoder": context}),
    }
    out = {}
    for name, (obj, models) in files.items():
        torch.save(obj, root / f"{name}.pth")
        out[name] = (root / f"{name}.pth", models)
    return out


@pytest.mark.parametrize("layout, arch, key, facts", [
    ("dinov2", DINOV2, None, {"key_set": "teacher", "stripped_prefixes": ["backbone."], "unchunked_block_keys": 12 * 14,
                              "dropped": {"count": 3, "first": sorted(DINOV2_HEADS)}}),
    ("dino", TINY, None, {"key_set": "teacher", "stripped_prefixes": ["backbone."], "unchunked_block_keys": 0,
                          "dropped": {"count": 1, "first": ["head.mlp.0.weight"]}}),
    ("dino", TINY, "student", {"key_set": "student", "stripped_prefixes": ["module.", "backbone."],
                               "dropped": {"count": 1, "first": ["head.mlp.0.weight"]}}),
    ("mae", TINY, None, {"key_set": "model", "stripped_prefixes": [],
                         "dropped": {"count": 3, "first": ["decoder_embed.weight", "decoder_pred.bias",
                                                           "mask_token"]}}),
    ("ijepa", TINY, None, {"key_set": "target_encoder", "stripped_prefixes": ["module."], "dropped": {"count": 0,
                                                                                                     "first": []}}),
    ("ijepa", TINY, "encoder", {"key_set": "encoder"}),
])
def test_each_layout_loads_the_original_modules_tokens(ckpts, tmp_path, monkeypatch, layout, arch, key, facts):
    """The backbone read out of the file gives exactly the tokens of the module it was saved from (the one its key set
    names: teacher over student by default, I-JEPA's target encoder over its encoder); the facts say how."""
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    path, models = ckpts[layout]
    ref = BackboneRef(str(path), arch=arch, checkpoint_key=key)
    original = models[ref.checkpoint["key_set"]]
    size = (56, 42) if arch == DINOV2 else (64, 32)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ref.load()(x)["tokens"], _tokens(original, x))
    assert {k: ref.checkpoint[k] for k in facts} == facts
    others = [m for k, m in models.items() if k != ref.checkpoint["key_set"]]
    for other in others:  # the test can fail: the other network of the file gives other tokens
        assert not torch.equal(ref.load()(x)["tokens"], _tokens(other, x))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert ref.revision == f"sha256:{digest}" and ref.checkpoint["sha256"] == digest
    assert ref.weights_sha256() == {path.name: digest}
    assert ref.normalisation_source == f"timm pretrained_cfg of {arch}"
    cfg = timm.models.get_pretrained_cfg(arch)
    assert (ref.spec.mean, ref.spec.std) == (cfg.mean, cfg.std)


def test_the_extraction_steps_on_hand_made_key_sets():
    """The pure steps on small dicts whose answer is known: the trainer's whole-model state dict splits into teacher
    and student, the teacher is preferred, wrapper prefixes go only when on every key, heads are dropped, chunk names
    are flattened, and an unknown key set is refused listing the ones there."""
    t = torch.zeros(1)
    trainer = {"model": {"teacher.backbone.blocks.0.0.norm1.weight": t, "student.backbone.cls_token": t,
                         "teacher.dino_head.last_layer.weight_g": t, "dino_loss.center": t},
               "optimizer": {"state": {}}, "iteration": 5}
    sets = key_sets(trainer)
    assert list(sets) == ["model.teacher", "model.student"]
    assert choose_key_set(sets, None, "f") == "model.teacher"
    assert choose_key_set(sets, "model.student", "f") == "model.student"
    assert choose_key_set({"encoder": {}, "target_encoder": {}}, None, "f") == "target_encoder"
    assert list(key_sets({"cls_token": t})) == ["(top level)"]
    with pytest.raises(BackboneError, match=r"no state dict 'ema'.*model\.teacher, model\.student"):
        choose_key_set(sets, "ema", "f")
    state, stripped, dropped = backbone_state({"module.backbone.a": t, "module.head.b": t,
                                                "module.backbone.masked_embed": t})
    assert (list(state), stripped, dropped) == (["a"], ["module.", "backbone."], ["head.b", "masked_embed"])
    state, stripped, _ = backbone_state({"module.a": t, "b": t})  # not on every key: a real name, kept
    assert (sorted(state), stripped) == (["b", "module.a"], [])
    flat, renamed = unchunk({"blocks.1.4.attn.qkv.weight": t, "blocks.4.norm1.weight": t, "norm.weight": t})
    assert (list(flat), renamed) == (["blocks.4.attn.qkv.weight", "blocks.4.norm1.weight", "norm.weight"], 1)


def test_a_checkpoint_of_another_size_is_refused_naming_the_first_mismatched_key(ckpts, tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BackboneError, match=r"another shape: blocks\.0\.attn\.proj\.bias is \[192\] in the checkpoint "
                                            r"but \[384\] in the model.*--arch"):
        BackboneRef(str(ckpts["dino"][0]), arch="vit_small_patch16_224")


def test_a_cli_run_records_the_key_set_and_the_files_sha256(ckpts, small_synthetic, tmp_path):
    """Through `ssl-segbench run`: the record's backbone block names the key set, prefixes, dropped keys and the
    file's sha256; the student is another backbone identity (another record key) than the teacher."""
    path = ckpts["dino"][0]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    keys = {}
    for key in ("teacher", "student"):
        rc, err = _cli(tmp_path, *_run_args(tmp_path, small_synthetic, path), "--arch", TINY, "--checkpoint-key", key)
        assert rc == 0, err
        (record,) = [json.loads(p.read_text()) for p in (tmp_path / "res").rglob("*.json")
                     if json.loads(p.read_text())["backbone"]["checkpoint"]["key_set"] == key]
        block = record["backbone"]
        assert block["checkpoint"]["sha256"] == digest and block["revision_resolved"] == f"sha256:{digest}"
        assert block["weights_sha256"] == {path.name: digest} and block["arch"] == TINY
        assert block["normalisation_source"] == f"timm pretrained_cfg of {TINY}"
        assert record["identity"]["source"] == f"checkpoint:{path}#{key}@{TINY}"
        keys[key] = record["key"]
    assert keys["teacher"] != keys["student"]



def test_evaluate_takes_a_training_checkpoint_as_the_cli_does(ckpts, small_synthetic, tmp_path, monkeypatch):
    """`evaluate(path, arch=, checkpoint_key=)` writes the CLI's record for the same file and key set."""
    import ssl_segbench

    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    path = ckpts["dino"][0]
    rc, err = _cli(tmp_path, *_run_args(tmp_path, small_synthetic, path), "--arch", TINY, "--checkpoint-key", "student")
    assert rc == 0, err
    (cli_record,) = [json.loads(p.read_text()) for p in (tmp_path / "res").rglob("*.json")]
    res = ssl_segbench.evaluate(str(path), dataset="synthetic", data_root=small_synthetic, protocols=["kmeans"],
                                seeds=1, size=64, arch=TINY, checkpoint_key="student", write_records=False)
    record = res["kmeans"].record
    assert record.key == cli_record["key"] and record.metrics == cli_record["metrics"]
    assert record.backbone["checkpoint"]["key_set"] == "student"

@pytest.mark.parametrize("backbone, extra, expected", [
    ("dino", ["--arch", "vit_tiny_patch16_22"], ["--arch 'vit_tiny_patch16_22' is not a timm architecture",
                                                 "Did you mean 'vit_tiny_patch16_224'"]),
    ("dino", [], ["is a training checkpoint file", "--arch", "vit_small_patch14_dinov2"]),
    ("dino", ["--arch", TINY, "--checkpoint-key", "ema"], ["has no state dict 'ema'", "student, teacher"]),
    ("pixels", ["--arch", TINY], ["--arch and --checkpoint-key apply to a training checkpoint file",
                                  "not to backbone 'pixels'"]),
])
def test_cli_refusals_name_the_option_and_write_nothing(ckpts, small_synthetic, tmp_path, backbone, extra, expected):
    target = ckpts[backbone][0] if backbone in ckpts else backbone
    _cli_refused(tmp_path, [*_run_args(tmp_path, small_synthetic, target), *extra], *expected)


def test_arch_and_checkpoint_key_round_trip_through_argv(tmp_path):
    """A sweep job's command carries --arch and --checkpoint-key back to the same RunOptions."""
    opts = RunOptions(backbone=str(tmp_path / "run dir" / "checkpoint.pth"), dataset="voc", protocols=("kmeans",),
                      arch=DINOV2, checkpoint_key="model.teacher", params={}, dataset_options={})
    assert run_options(build_parser().parse_args(["run", *opts.argv()])) == opts


def test_a_file_that_needs_code_to_load_or_is_truncated_is_refused_naming_it(ckpts, tmp_path, monkeypatch):
    """Only torch's weights-only unpickler reads the file: an object that would need its code run (a numpy scalar
    here) is named, not executed; a truncated copy is named with the fix."""
    import numpy as np

    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    with_code = tmp_path / "with_code.pth"
    torch.save({"teacher": ckpts["dino"][1]["teacher"].state_dict(), "loss": np.float64(0.5)}, with_code)
    with pytest.raises(BackboneError, match=r"with_code\.pth could not be read .*it pickles numpy\S*scalar"):
        BackboneRef(str(with_code), arch=TINY)
    truncated = tmp_path / "truncated.pth"
    data = ckpts["dino"][0].read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(BackboneError, match=r"truncated\.pth could not be read .*copy it again"):
        BackboneRef(str(truncated), arch=TINY)
