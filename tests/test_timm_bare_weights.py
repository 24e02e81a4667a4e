"""A registry entry whose Hub repo holds bare weights without timm's config (MoCo v3's copies, which MTEB loads as
timm's `vit_base_patch16_224` with the repo as weight source): `timm_model` names the architecture, the weights come
from `repo_id@revision`, strictly checked; the same repo without `timm_model` is a clear error, not a traceback."""
from __future__ import annotations

import json

import pytest
import torch
from hubfake import _snapshot, registry_entry

from ssl_segbench.backbones import BackboneError, BackboneRef

REPO = "tiny-org/bare-weights-vit"


@pytest.fixture(scope="module")
def bare_repo(hub_cache):
    """timm's `test_vit` (patch 16, width 64, 6 blocks) with a 1000-class head, saved as a bare model.safetensors and a
    hub-mixin style config.json that timm cannot build from (no `architecture`)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("test_vit", pretrained=False, num_classes=1000).eval()
    snap, sha = _snapshot(hub_cache, REPO, "bare")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({"num_classes": 1000, "img_size": 160}))
    return model, sha


def _registry(tmp_path, sha, timm_model: str | None):
    text = "backbones:\n" + registry_entry("bare", "timm", REPO, sha, 16, 64, 1)
    if timm_model:
        text += f"    timm_model: {timm_model}\n"
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    return path


def test_timm_model_reads_the_repos_weights_at_the_pinned_revision(bare_repo, tmp_path):
    saved, sha = bare_repo
    ref = BackboneRef("bare", _registry(tmp_path, sha, "test_vit"))
    assert ref.revision == sha
    model = ref.load().model
    expected = {k: v for k, v in saved.state_dict().items() if not k.startswith("head.")}
    got = model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert list(ref.weights_sha256()) == ["model.safetensors"]


def test_without_timm_model_the_repo_is_a_named_error(bare_repo, tmp_path):
    _, sha = bare_repo
    ref = BackboneRef("bare", _registry(tmp_path, sha, None))
    with pytest.raises(BackboneError, match=r"config.json is not a timm config \(it names no 'architecture'\).*"
                                            r"name it in the registry entry's timm_model"):
        ref.load()


def test_timm_model_is_only_for_the_timm_loader(tmp_path):
    from ssl_segbench.registry import RegistryError, load_registry

    path = tmp_path / "registry.yaml"
    path.write_text("backbones:\n" + registry_entry("bare", "transformers", REPO, None, 16, 64, 1)
                    + "    timm_model: test_vit\n")
    with pytest.raises(RegistryError, match="key 'timm_model': names a timm architecture, so the loader must be timm"):
        load_registry(path)
