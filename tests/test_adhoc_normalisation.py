"""Issue 20: an ad-hoc backbone is normalised from its own files (a transformers checkpoint's preprocessor_config.json,
a timm checkpoint's pretrained_cfg), from the registry entry its Hub id names, or from --mean/--std; with none of
them the run is refused. The record states the mean/std used and where they came from."""
from __future__ import annotations

import json

import pytest
from hubfake import IMAGENET, make_dinov2_checkpoint, make_timm_checkpoint, registry_entry
from test_refusals import _cli, _dinov2_dir, _run_args
from test_refusals import _cli_refused as _refused

from ssl_segbench.backbones import BackboneRef, registry_match
from ssl_segbench.data import get_dataset
from ssl_segbench.features import extract
from ssl_segbench.records import iter_records
from ssl_segbench.registry import BackboneSpec
from ssl_segbench.transforms import Transform

HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # SigLIP's normalisation, not ImageNet's


def _args(tmp_path, data, backbone, *extra, size="56"):
    """A one-seed kmeans run; size 56 fits the fake DINOv2's patch 7 and the fake timm ViT's patch 8."""
    args = _run_args(tmp_path, data, backbone, "kmeans", *extra)
    args[args.index("--size") + 1] = size
    return args


def _records(tmp_path):
    """The run's valid records (an unreadable one fails the test)."""
    found = [rec for _, rec in iter_records(tmp_path / "res")]
    assert all(not isinstance(rec, Exception) for rec in found), found
    return found


def _feature_keys(tmp_path):
    """The keys of the complete feature entries in the run's cache."""
    return [json.loads(p.read_text())["key"] for p in (tmp_path / "cache").rglob("meta.json") if "features" in p.parts]


def test_hub_id_is_normalised_from_its_preprocessor_config(small_synthetic, tmp_path, hub_cache):
    _, sha = make_dinov2_checkpoint(hub_cache, "tiny-org/siglip-like-test", normalisation=HALF)
    pre = hub_cache / "models--tiny-org--siglip-like-test" / "snapshots" / sha / "preprocessor_config.json"
    rc, err = _cli(tmp_path, *_args(tmp_path, small_synthetic, "tiny-org/siglip-like-test"))
    assert rc == 0, err
    [rec] = _records(tmp_path)
    assert rec.backbone["mean"] == [0.5, 0.5, 0.5] and rec.backbone["std"] == [0.5, 0.5, 0.5]
    assert rec.backbone["normalisation_source"] == f"preprocessor_config.json ({pre})"
    assert rec.identity["normalisation"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    [key] = _feature_keys(tmp_path)
    assert key["mean"] == [0.5] * 3 and key["std"] == [0.5] * 3  # the features were computed with them


def test_hub_id_without_any_normalisation_is_refused(small_synthetic, tmp_path, hub_cache):
    make_dinov2_checkpoint(hub_cache, "tiny-org/no-preprocessor-test", normalisation=None)
    _refused(tmp_path, _args(tmp_path, small_synthetic, "tiny-org/no-preprocessor-test"),
             "backbone 'tiny-org/no-preprocessor-test': no normalisation (mean/std) found",
             "hf download tiny-org/no-preprocessor-test preprocessor_config.json", "--mean R,G,B --std R,G,B",
             "registry (backbones.yaml, keys mean and std)")


def test_local_directory_without_preprocessor_config_needs_mean_std(small_synthetic, tmp_path):
    ckpt = _dinov2_dir(tmp_path / "bare-ckpt")
    (ckpt / "preprocessor_config.json").unlink()
    args = _args(tmp_path, small_synthetic, ckpt, size="64")
    _refused(tmp_path, args, "no normalisation (mean/std) found: the checkpoint has no preprocessor_config.json. To "
             "fix it, state it with the run options --mean R,G,B --std R,G,B")
    rc, err = _cli(tmp_path, *args, "--mean", "0.2,0.3,0.4", "--std", "0.5,0.25,2")
    assert rc == 0, err
    [rec] = _records(tmp_path)
    assert rec.backbone["mean"] == [0.2, 0.3, 0.4] and rec.backbone["std"] == [0.5, 0.25, 2.0]
    assert rec.backbone["normalisation_source"] == "--mean/--std"


@pytest.mark.parametrize("edit, expected", [
    (lambda cfg: cfg.pop("mean"), "it has no mean"),
    (lambda cfg: cfg.update(std=[0.5, 0.0, 0.5]), "std [0.5, 0.0, 0.5] has a value <= 0"),
    (lambda cfg: cfg.update(mean=[0.5, 0.5]), "mean [0.5, 0.5] is not 3 finite numbers"),
])
def test_timm_pretrained_cfg_without_usable_mean_std_is_refused(small_synthetic, tmp_path, hub_cache, edit, expected):
    repo = f"tiny-org/vit-badcfg-{len(expected)}"
    _, sha = make_timm_checkpoint(hub_cache, repo)
    config = hub_cache / f"models--{repo.replace('/', '--')}" / "snapshots" / sha / "config.json"
    doc = json.loads(config.read_text())
    edit(doc["pretrained_cfg"])
    config.write_text(json.dumps(doc))
    _refused(tmp_path, _args(tmp_path, small_synthetic, f"hf-hub:{repo}"),
             f"no usable normalisation in {config} (timm pretrained_cfg): {expected}", "--mean R,G,B --std R,G,B")


def test_timm_checkpoint_is_normalised_from_its_pretrained_cfg(small_synthetic, tmp_path, hub_cache):
    _, sha = make_timm_checkpoint(hub_cache, "tiny-org/vit-norm-test")
    config = hub_cache / "models--tiny-org--vit-norm-test" / "snapshots" / sha / "config.json"
    doc = json.loads(config.read_text())
    doc["pretrained_cfg"].update(mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6])
    config.write_text(json.dumps(doc))
    rc, err = _cli(tmp_path, *_args(tmp_path, small_synthetic, "hf-hub:tiny-org/vit-norm-test"))
    assert rc == 0, err
    [rec] = _records(tmp_path)
    assert rec.backbone["mean"] == [0.1, 0.2, 0.3] and rec.backbone["std"] == [0.4, 0.5, 0.6]
    assert rec.backbone["normalisation_source"] == f"timm pretrained_cfg ({config})"


def test_hub_id_of_a_registry_entry_uses_the_entry_and_its_pin(small_synthetic, tmp_path, hub_cache):
    _, pinned = make_dinov2_checkpoint(hub_cache, "tiny-org/dinov2-entry-test", normalisation=HALF)
    registry = tmp_path / "reg.yaml"
    registry.write_text("backbones:\n" + registry_entry("tiny_entry", "transformers", "tiny-org/dinov2-entry-test",
                                                        pinned, 7, 32, 1))
    args = _args(tmp_path, small_synthetic, "tiny-org/dinov2-entry-test", "--registry", str(registry))
    rc, err = _cli(tmp_path, *args)
    assert rc == 0, err
    assert "backbone 'tiny-org/dinov2-entry-test' is the registry entry 'tiny_entry'" in err
    [rec] = _records(tmp_path)
    assert rec.backbone["id"] == "tiny_entry" and rec.backbone["revision_resolved"] == pinned
    # the entry's ImageNet values, not the 0.5 of the checkpoint's preprocessor_config.json
    assert (tuple(rec.backbone["mean"]), tuple(rec.backbone["std"])) == IMAGENET
    assert rec.backbone["normalisation_source"] == "registry" and "normalisation" not in rec.identity
    rc, err = _cli(tmp_path, *_args(tmp_path, small_synthetic, "tiny_entry", "--registry", str(registry)))
    assert rc == 0 and "skipped" in err, err  # the registry id names the very same record
    assert len(_records(tmp_path)) == 1

    # another revision is another checkpoint: ad-hoc, normalised from its own preprocessor_config.json
    _, other = make_dinov2_checkpoint(hub_cache, "tiny-org/dinov2-entry-test", registers=4, normalisation=HALF)
    rc, err = _cli(tmp_path, *_args(tmp_path, small_synthetic, f"tiny-org/dinov2-entry-test@{other}", "--registry",
                                    str(registry)))
    assert rc == 0, err
    [adhoc] = [r for r in _records(tmp_path) if r.backbone["id"] != "tiny_entry"]
    assert adhoc.backbone["revision_resolved"] == other and adhoc.backbone["mean"] == [0.5] * 3
    assert adhoc.backbone["normalisation_source"].startswith("preprocessor_config.json")


def test_registry_match_needs_the_same_loader_kind_and_revision():
    spec = BackboneSpec(id="e", loader="timm", repo_id="org/m", revision="a" * 40, patch_size=16, embed_dim=8,
                        num_prefix_tokens=1, mean=IMAGENET[0], std=IMAGENET[1], method="t", paper=None, license="t")
    registry = {"e": spec}
    assert registry_match("hf-hub:org/m", registry) is spec
    assert registry_match(f"hf-hub:org/m@{'a' * 40}", registry) is spec
    assert registry_match("org/m", registry) is None  # a transformers id of the same repo is another loader
    assert registry_match(f"hf-hub:org/m@{'b' * 40}", registry) is None


@pytest.mark.parametrize("extra, expected", [
    (["--mean", "0.5,0.5,0.5"], "--mean and --std are given together"),
    (["--std", "0.5,0.5,0.5"], "--mean and --std are given together"),
    (["--mean", "0.5,0.5", "--std", "0.5,0.5,0.5"], "--mean/--std: mean (0.5, 0.5) is not 3 finite numbers"),
    (["--mean", "nan,0.5,0.5", "--std", "0.5,0.5,0.5"], "is not 3 finite numbers"),
    (["--mean", "0.5,0.5,0.5", "--std", "0.5,0,0.5"], "--mean/--std: std [0.5, 0.0, 0.5] has a value <= 0"),
    (["--mean", "a,b,c", "--std", "0.5,0.5,0.5"], "takes one number per RGB channel, R,G,B"),
])
def test_bad_mean_std_options_are_refused(small_synthetic, tmp_path, extra, expected):
    _refused(tmp_path, _args(tmp_path, small_synthetic, "pixels", *extra, size="64"), expected)


def test_mean_std_reach_the_features_and_only_then_the_record_key(small_synthetic, tmp_path):
    """Pixels tokens are the normalised pixels themselves: (raw - mean) / std, checked by hand."""
    ds, t = get_dataset("synthetic", small_synthetic), Transform("square", 32, 16)
    mean, std = (0.2, 0.3, 0.4), (0.5, 0.25, 2.0)
    tokens = extract(BackboneRef("pixels", normalisation=(mean, std)), ds, t, root=tmp_path / "c")["tokens"].image(0)
    raw = t.image(ds.load_image(0), (0, 0, 0), (1, 1, 1)).numpy()  # [0, 1] pixels, geometry only
    for c in range(3):  # token (0, 0), channel c, pixel (0, 0) sits at c * 256 of its 768 values
        want = (raw[c, 0, 0] - mean[c]) / std[c]
        assert tokens[0, 0, c * 256] == pytest.approx(want, rel=1e-3, abs=1e-3)  # stored as float16
    assert abs((raw[0, 0, 0] - mean[0]) / std[0] - (raw[0, 0, 0] - 0.5) / 0.5) > 0.05  # the setting changes it

    plain = _args(tmp_path, small_synthetic, "pixels", size="64")
    assert _cli(tmp_path, *plain)[0] == 0
    [default] = _records(tmp_path)
    assert "normalisation" not in default.identity and default.backbone["normalisation_source"] == "registry"
    rc, err = _cli(tmp_path, *plain, "--mean", ",".join(map(str, mean)), "--std", ",".join(map(str, std)))
    assert rc == 0, err
    [stated] = [r for r in _records(tmp_path) if r.key != default.key]  # a new record, not the default's
    assert stated.identity["normalisation"] == {"mean": list(mean), "std": list(std)}
    assert stated.backbone["normalisation_source"] == "--mean/--std"
    # the leaderboard keeps the two apart: one row each, not one cell the last record wins
    from ssl_segbench.leaderboard import render

    assert default.row_label() == "pixels @ builtin"
    assert stated.row_label() == "pixels @ builtin (mean [0.2, 0.3, 0.4], std [0.5, 0.25, 2.0])"
    page = render([default, stated], published=[])["synthetic.md"]
    overview = page.split("### Overview")[1].split("###")[0]
    assert sum("pixels @ builtin" in line for line in overview.splitlines()) == 2


def test_a_damaged_preprocessor_config_names_the_file(small_synthetic, tmp_path):
    ckpt = _dinov2_dir(tmp_path / "cut-pre")
    pre = ckpt / "preprocessor_config.json"
    pre.write_text(pre.read_text()[:40])
    _refused(tmp_path, _args(tmp_path, small_synthetic, ckpt, size="64"), f"checkpoint file {pre} is damaged")


def test_a_preprocessor_that_does_not_normalise_is_refused(small_synthetic, tmp_path):
    """do_normalize false: the image_mean/image_std beside it are not what the model saw, so they are not used."""
    ckpt = _dinov2_dir(tmp_path / "no-normalize")
    pre = ckpt / "preprocessor_config.json"
    pre.write_text(json.dumps({**json.loads(pre.read_text()), "do_normalize": False}))
    _refused(tmp_path, _args(tmp_path, small_synthetic, ckpt, size="64"), f"{pre} says do_normalize false",
             "--mean R,G,B --std R,G,B (the values the checkpoint was trained with)", "0,0,0 and 1,1,1 for none")
