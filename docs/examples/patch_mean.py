"""`patch-mean`: a weight-free baseline backbone whose token is each patch's mean normalised colour, (B, h, w, 3). The
example loader of docs/extending.md: saved as ssl_segbench/backbones/patch_mean.py, a backbones.yaml entry with
`loader: patch-mean` runs through it with no other edit."""
from __future__ import annotations

import torch

from .base import Backbone, BackboneError
from .loader import Loader, register_loader


class PatchMeanBackbone(Backbone):
    @property
    def num_layers(self) -> int:
        return 1

    def check_facets(self, facets) -> None:
        super().check_facets(facets)
        if set(facets) - {"tokens"}:
            raise BackboneError(f"backbone '{self.spec.id}' (patch means) has only the 'tokens' facet")

    def _forward(self, images, layer, facets):
        p = self.spec.patch_size
        means = torch.nn.functional.avg_pool2d(images, kernel_size=p)  # (B, 3, h, w)
        return {"tokens": means.flatten(2).transpose(1, 2)}  # (B, h·w, 3), as the other backbones' patch tokens


@register_loader
class PatchMeanLoader(Loader):
    name = "patch-mean"
    backbone_class = PatchMeanBackbone

    def snapshot(self, spec):
        return None  # no files

    def pin(self, spec):
        return "builtin:patch-mean", spec.revision

    def model(self, spec, snapshot):
        return None

    def backbone(self, spec, source, revision, model):
        return PatchMeanBackbone(spec, source, revision)
