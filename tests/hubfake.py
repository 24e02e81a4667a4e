"""Tiny checkpoints written into a fake Hugging Face cache in the Hub's own layout:
`models--org--name/{refs/main, snapshots/<sha>/...}`, so `hf-hub:` and `from_pretrained` resolve them offline."""
from __future__ import annotations

import hashlib
from pathlib import Path

TIMM_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # the (mean, std) DINOv2's own preprocessor states


def save_preprocessor(directory: Path, normalisation=IMAGENET) -> Path:
    """A preprocessor_config.json stating `normalisation` (mean, std), written by transformers' own image processor
    (DINOv2's), as a downloaded checkpoint has it."""
    from transformers import BitImageProcessor

    mean, std = normalisation
    BitImageProcessor(image_mean=list(mean), image_std=list(std)).save_pretrained(directory)
    return Path(directory) / "preprocessor_config.json"


def _snapshot(cache: Path, repo_id: str, tag: str) -> tuple[Path, str]:
    sha = hashlib.sha1(f"{repo_id}:{tag}".encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return snap, sha


def make_timm_checkpoint(cache: Path, repo_id: str = "tiny-org/vit-tiny-test", reg_tokens: int = 0):
    """A random tiny timm ViT saved with timm's save_for_hf; returns (model, commit sha)."""
    import timm
    import torch
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    args = dict(TIMM_ARGS, reg_tokens=reg_tokens) if reg_tokens else dict(TIMM_ARGS)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **args).eval()
    snap, sha = _snapshot(cache, repo_id, "timm")
    save_for_hf(model, str(snap), model_args=args, safe_serialization=True)
    return model, sha


def make_timm_arch_checkpoint(cache: Path, repo_id: str, arch: str, args: dict):
    """A random tiny checkpoint of timm architecture `arch` (e.g. an Eva for DINOv3) with `args` overriding its size,
    saved with timm's save_for_hf so that `hf-hub:repo_id` rebuilds the same model; returns (model, commit sha)."""
    import timm
    import torch
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **args).eval()
    snap, sha = _snapshot(cache, repo_id, arch)
    save_for_hf(model, str(snap), model_args=args, safe_serialization=True)
    return model, sha


def make_dinov2_checkpoint(cache: Path, repo_id: str = "tiny-org/dinov2-tiny-test", registers: int = 0,
                           normalisation=IMAGENET):
    """A random tiny transformers DINOv2 (with `registers` register tokens when > 0) and its preprocessor_config.json
    stating `normalisation` (None: none); returns (model, commit sha)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28,
              patch_size=7)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)).eval()
    else:
        model = Dinov2Model(Dinov2Config(**kw)).eval()
    snap, sha = _snapshot(cache, repo_id, f"tf{registers}")
    model.save_pretrained(snap)
    if normalisation is not None:
        save_preprocessor(snap, normalisation)
    return model, sha


def registry_entry(id_, loader, repo_id, revision, patch, dim, prefix) -> str:
    return f"""  - id: {id_}
    loader: {loader}
    repo_id: {repo_id}
    revision: {revision or 'null'}
    patch_size: {patch}
    embed_dim: {dim}
    num_prefix_tokens: {prefix}
    mean: [0.485, 0.456, 0.406]
    std: [0.229, 0.224, 0.225]
    method: test
    paper: null
    license: test
"""
