"""Weight-free baselines that are real leaderboard rows: raw patch pixels, and a seeded random-init timm ViT."""
from __future__ import annotations

import torch

from .base import Backbone, BackboneError
from .loader import Loader, register_loader
from .timm_backbone import TimmBackbone


class PixelsBackbone(Backbone):
    """Each p×p patch's normalised RGB values, flattened: (B, h, w, 3·p²). No CLS, no attention."""

    @property
    def num_layers(self) -> int:
        return 1

    def __init__(self, spec, source, resolved_revision):
        super().__init__(spec, source, resolved_revision)
        if spec.embed_dim != 3 * spec.patch_size ** 2:
            raise BackboneError(f"backbone '{spec.id}': embed_dim must be 3·patch_size² = {3 * spec.patch_size ** 2}")

    def check_facets(self, facets) -> None:
        super().check_facets(facets)
        if set(facets) - {"tokens"}:
            raise BackboneError(f"backbone '{self.spec.id}' (raw pixels) has only the 'tokens' facet")

    def _forward(self, images, layer, facets):
        p = self.spec.patch_size
        patches = torch.nn.functional.unfold(images, kernel_size=p, stride=p)  # (B, 3·p², h·w)
        return {"tokens": patches.transpose(1, 2)}


def random_init_model(arch: str, seed: int):
    """timm `arch` with weights drawn from torch.manual_seed(seed): the same weights on every machine."""
    import timm

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)
    finally:
        torch.random.set_rng_state(state)


@register_loader
class BuiltinLoader(Loader):
    """`pixels` and `random-init:<timm arch>` (seeded by the entry's revision, `seed<N>`): no files, no Hub."""

    name = "builtin"

    def snapshot(self, spec):
        return None

    def pin(self, spec):
        if spec.repo_id != "pixels" and not spec.repo_id.startswith("random-init:"):
            raise BackboneError(f"backbone '{spec.id}': unknown builtin '{spec.repo_id}' "
                                "(use 'pixels' or 'random-init:<timm arch>')")
        return f"builtin:{spec.repo_id}", spec.revision

    def model(self, spec, snapshot):
        if spec.repo_id == "pixels":
            return None
        seed = int((spec.revision or "seed0").removeprefix("seed"))
        return random_init_model(spec.repo_id.removeprefix("random-init:"), seed)

    def backbone(self, spec, source, revision, model):
        if model is None:
            return PixelsBackbone(spec, source, revision)
        return TimmBackbone(model, spec, source, revision)
