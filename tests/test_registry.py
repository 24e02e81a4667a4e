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
