"""Issue 23, the Python API: `ssl_segbench.evaluate(model)` with a registry id, a loaded timm model object, an Adapter
around a custom nn.Module and a transformers model object gives the CLI record's numbers; an in-memory model's
identity is its state dict's digest; `cache=False` and `write_records=False` write nothing; an Adapter lacking a facet
a protocol needs is refused naming it."""
from __future__ import annotations

import json

import pytest
import torch
from hubfake import IMAGENET, make_dinov2_checkpoint, make_timm_checkpoint, registry_entry
from test_refusals import _cli, _run_args

import ssl_segbench
from ssl_segbench.backbones import BackboneError
from ssl_segbench.protocols import ProtocolError
from ssl_segbench.records import iter_records

REPO = "tiny-org/vit-api-test"
MEAN, STD = IMAGENET


@pytest.fixture(scope="module")
def tiny_vit(hub_cache, tmp_path_factory):
    """The tiny timm ViT of a fake Hub checkpoint, a registry naming it 'tiny-api' (ImageNet normalisation), and the
    model loaded from the Hub cache as a user would (position terms following the input size)."""
    import timm

    _, sha = make_timm_checkpoint(hub_cache, REPO)
    registry = tmp_path_factory.mktemp("reg") / "backbones.yaml"
    registry.write_text("backbones:\n" + registry_entry("tiny-api", "timm", REPO, sha, 8, 32, 1))
    model = timm.create_model(f"hf-hub:{REPO}", pretrained=True, num_classes=0, dynamic_img_size=True)
    return model, registry


def _options(data, tmp_path, **more):
    """evaluate()'s options for the run `_run_args` gives the CLI (synthetic data, kmeans, --size 64, --seeds 1)."""
    return {**dict(dataset="synthetic", data_root=data, protocols=["kmeans"], size=64, seeds=1,
                   results_dir=tmp_path / "res", device="cpu"), **more}


def _cli_record(tmp_path, data, backbone, *extra):
    rc, err = _cli(tmp_path, *_run_args(tmp_path / "cli", data, backbone, "kmeans", *extra))
    assert rc == 0, err
    (rec,) = [r for _, r in iter_records(tmp_path / "cli" / "res")]
    return rec


def _same_numbers(a, b):
    """Identical metrics, compared as the bytes of the records' metrics blocks."""
    assert json.dumps(a.metrics, sort_keys=True) == json.dumps(b.metrics, sort_keys=True)
    assert a.per_seed == b.per_seed


def _tokens_adapter(model, **facets):
    """An Adapter around a custom nn.Module whose features callable gives the ViT's last-block tokens (final norm,
    prefix removed) through its own code path (forward_features, not the harness's forward_intermediates)."""
    class Mine(torch.nn.Module):
        def __init__(self, vit):
            super().__init__()
            self.vit = vit

        def patch_tokens(self, x):
            t = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]
            return t.reshape(x.shape[0], x.shape[2] // 8, x.shape[3] // 8, -1)

    mine = Mine(model)
    return ssl_segbench.Adapter(mine, patch_size=8, mean=MEAN, std=STD, embed_dim=32, features=mine.patch_tokens,
                                **facets)


def test_registry_id_timm_object_and_adapter_give_the_cli_record(tiny_vit, small_synthetic, tmp_path):
    model, registry = tiny_vit
    cli = _cli_record(tmp_path, small_synthetic, "tiny-api", "--registry", str(registry))
    by_id = ssl_segbench.evaluate("tiny-api", registry=str(registry), **_options(small_synthetic, tmp_path))
    rec = by_id["kmeans"].record
    assert by_id["kmeans"].status == "written" and rec.key == cli.key and rec.identity == cli.identity
    _same_numbers(rec, cli)
    assert by_id["kmeans"].miou == cli.metrics["miou"]["mean"] and by_id.records == [rec]
    assert by_id["kmeans"].pixel_acc == cli.metrics["pixel_acc"]["mean"]

    obj = ssl_segbench.evaluate(model, mean=MEAN, std=STD, **_options(small_synthetic, tmp_path))["kmeans"]
    _same_numbers(obj.record, cli)
    backbone = obj.record.backbone
    assert backbone["source"] == "module:VisionTransformer" and backbone["method"] == "in-memory model " \
        "(VisionTransformer)" and backbone["revision_resolved"].startswith("state-sha256:")
    assert len(backbone["revision_resolved"]) == len("state-sha256:") + 64 and obj.record.key != cli.key

    adapted = ssl_segbench.evaluate(_tokens_adapter(model), **_options(small_synthetic, tmp_path))["kmeans"]
    _same_numbers(adapted.record, cli)
    assert adapted.record.backbone["source"] == "module:Mine"
    assert len({p.name for p in (tmp_path / "res").rglob("*.json")}) == 3  # three identities, three records


def test_a_transformers_model_object_gives_the_cli_record_and_needs_a_stated_normalisation(hub_cache, small_synthetic,
                                                                                          tmp_path):
    model, _ = make_dinov2_checkpoint(hub_cache, "tiny-org/dinov2-api-test")
    cli = _cli_record(tmp_path, small_synthetic, "tiny-org/dinov2-api-test", "--size", "56")
    opts = _options(small_synthetic, tmp_path, size=56)
    with pytest.raises(BackboneError, match=r"in-memory Dinov2Model: no normalisation .* pass mean=\(R, G, B\)"):
        ssl_segbench.evaluate(model, **opts)
    res = ssl_segbench.evaluate(model, mean=MEAN, std=STD, **opts)["kmeans"]
    _same_numbers(res.record, cli)
    assert res.record.backbone["source"] == "module:Dinov2Model"


def test_two_state_dicts_are_two_identities_and_the_training_state_is_left_as_it_was(tiny_vit, small_synthetic,
                                                                                      tmp_path):
    import copy

    model, _ = tiny_vit
    twin, changed = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        changed.blocks[0].mlp.fc1.weight[0, 0] += 1e-3  # one number of one tensor
    changed.train()
    opts = _options(small_synthetic, tmp_path, mean=MEAN, std=STD)
    first, same = (ssl_segbench.evaluate(m, **opts)["kmeans"] for m in (model, twin))
    assert same.status == "skipped" and same.record.key == first.record.key  # same weights: the record is reused
    other = ssl_segbench.evaluate(changed, **opts)["kmeans"]
    assert other.status == "written" and other.record.key != first.record.key
    assert other.record.backbone["revision_resolved"] != first.record.backbone["revision_resolved"]
    assert len(list((tmp_path / "res").rglob("*.json"))) == 2
    # the training loop's model is as it was: train mode, trainable, where it was
    assert changed.training and all(m.training for m in changed.modules())
    assert all(p.requires_grad for p in changed.parameters())
    half = ssl_segbench.evaluate(model, **_options(small_synthetic, tmp_path, mean=(0.5,) * 3, std=(0.5,) * 3))
    assert half["kmeans"].record.backbone["revision_resolved"] != first.record.backbone["revision_resolved"]


def test_cache_false_writes_nothing_under_the_cache_and_gives_the_cached_numbers(tiny_vit, small_synthetic, tmp_path,
                                                                                   monkeypatch):
    import tempfile

    model, _ = tiny_vit
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    opts = _options(small_synthetic, tmp_path, mean=MEAN, std=STD, write_records=False)
    res = ssl_segbench.evaluate(model, cache=False, **opts)["kmeans"]
    assert not (tmp_path / "cache").exists() and not list((tmp_path / "tmp").iterdir())  # and the temporary removed
    assert res.record.provenance["cache_hit"] is False
    cached = ssl_segbench.evaluate(model, **opts)["kmeans"]
    assert [p.name for p in (tmp_path / "cache").iterdir()]  # the default run does cache
    _same_numbers(res.record, cached.record)


def test_write_records_false_returns_the_record_and_writes_no_file(tiny_vit, small_synthetic, tmp_path):
    model, _ = tiny_vit
    res = ssl_segbench.evaluate(model, write_records=False, **_options(small_synthetic, tmp_path, mean=MEAN,
                                                                       std=STD))["kmeans"]
    assert res.status == "computed" and 0 <= res.miou <= 1 and not (tmp_path / "res").exists()


@pytest.mark.parametrize("protocol", ["datus", "maskdistill"])
def test_an_adapter_without_cls_is_refused_for_a_protocol_reading_it(tiny_vit, small_synthetic, tmp_path, protocol):
    model, _ = tiny_vit
    opts = _options(small_synthetic, tmp_path, protocols=[protocol])
    with pytest.raises(ProtocolError, match=rf"protocol '{protocol}' needs .*cls.* but the Adapter of 'mine' gives "
                                            r"only tokens: pass .*cls=.* to ssl_segbench.Adapter.*kmeans"):
        ssl_segbench.evaluate(_tokens_adapter(model), **opts)
    assert not (tmp_path / "res").exists()


def test_what_an_object_cannot_say_is_refused_by_name(tiny_vit, small_synthetic, tmp_path):
    import copy

    model, _ = tiny_vit
    opts = _options(small_synthetic, tmp_path)
    with pytest.raises(BackboneError, match="cannot read a backbone from a Linear: .*ssl_segbench.Adapter"):
        ssl_segbench.evaluate(torch.nn.Linear(2, 2), **opts)
    bare = copy.deepcopy(model)
    bare.pretrained_cfg = {}
    with pytest.raises(BackboneError, match="no normalisation"):
        ssl_segbench.evaluate(bare, **opts)
    wrong = ssl_segbench.Adapter(model, patch_size=8, mean=MEAN, std=STD, embed_dim=32,
                                 features=lambda x: model.forward_features(x))
    with pytest.raises(BackboneError, match=r"the tokens callable gave \(8, 65, 32\) .* expected \(8, 8, 8, 32\)"):
        ssl_segbench.evaluate(wrong, batch_size=8, **opts)
    with pytest.raises(ssl_segbench.api.RunOptionsError, match="name the protocol"):
        ssl_segbench.evaluate(model, params={"epochs": 5}, **opts)
    assert not (tmp_path / "res").exists()


def test_params_nested_or_dotted_are_the_same_run(tiny_vit, small_synthetic, tmp_path):
    model, _ = tiny_vit
    opts = _options(small_synthetic, tmp_path, mean=MEAN, std=STD, write_records=False)
    dotted = ssl_segbench.evaluate(model, params={"kmeans.k": 4}, **opts)["kmeans"].record
    nested = ssl_segbench.evaluate(model, params={"kmeans": {"k": 4}}, **opts)["kmeans"].record
    default = ssl_segbench.evaluate(model, **opts)["kmeans"].record
    assert dotted.key == nested.key != default.key and dotted.protocol["params"]["k"] == 4


def test_import_ssl_segbench_stays_light():
    import subprocess
    import sys

    code = "import ssl_segbench, sys; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
