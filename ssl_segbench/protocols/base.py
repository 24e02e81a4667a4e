"""Protocol interface and the shared step from per-image scores to a dataset-level confusion matrix.

A protocol has a name, a version (bumped whenever its numbers could change) and a parameter set; named presets
reproduce published settings exactly. Everything in the parameters goes into the record, so two rows are comparable
exactly when their parameters are equal.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import Backbone, BackboneRef
from ..data import SegmentationDataset
from ..features import ArrayStore, FeatureSet
from ..metrics import confusion
from ..transforms import Transform


class ProtocolError(Exception):
    """Bad protocol parameters or inputs; the message names the parameter and the allowed values."""


@dataclass
class Context:
    """What a protocol may use: the datasets, a way to get (cached) features of a split, seeds and the device."""

    eval_set: SegmentationDataset
    train_set: SegmentationDataset | None
    features: Callable[[SegmentationDataset, tuple[str, ...]], FeatureSet]
    seeds: list[int]
    device: str = "cpu"
    info: dict = field(default_factory=dict)  # facts the protocol adds to the record (e.g. which split it trained on)
    cache_hits: list[bool] = field(default_factory=list)
    backbone_ref: BackboneRef | None = None  # for protocols that need a second pass (e.g. CLS of segment crops)
    transform: Transform | None = None  # the geometry the cached features and labels were made with
    save_masks: Path | None = None  # where protocols that make pseudo masks write them (PNG, dataset palette)
    _backbone: Backbone | None = None

    def backbone(self) -> Backbone:
        """The loaded backbone, loaded once on first use (a cache-only protocol never calls this)."""
        if self._backbone is None:
            if self.backbone_ref is None:
                raise ProtocolError("this protocol needs the backbone itself, but the run gave none")
            self._backbone = self.backbone_ref.load(self.device)
        return self._backbone

    def get(self, dataset: SegmentationDataset, facets: tuple[str, ...]) -> FeatureSet:
        fs = self.features(dataset, facets)
        self.cache_hits.append(fs.cache_hit)
        return fs


class Protocol:
    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    defaults: ClassVar[dict] = {}
    presets: ClassVar[dict[str, dict]] = {}
    default_seeds: ClassVar[int] = 1
    # parameters that choose the input transform; they are recorded like any other
    transform_params: ClassVar[tuple[str, ...]] = ("resize", "size")

    def __init__(self, preset: str | None = None, **overrides):
        params = copy.deepcopy(self.defaults)
        if preset is not None:
            if preset not in self.presets:
                raise ProtocolError(f"protocol '{self.name}' has no preset '{preset}'; presets: "
                                    f"{', '.join(self.presets) or 'none'}")
            params.update(copy.deepcopy(self.presets[preset]))
        unknown = set(overrides) - set(params)
        if unknown:
            raise ProtocolError(f"protocol '{self.name}': unknown parameter(s) {sorted(unknown)}; "
                                f"parameters: {sorted(params)}")
        params.update(overrides)
        self.preset = preset
        self.params = params

    def run(self, ctx: Context) -> dict:
        """Return {"per_seed": [scores dict per seed], "info": {...}}; scores as metrics.scores() gives them."""
        raise NotImplementedError


def save_label_map(path: Path, labels: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> None:
    """Write an (H, W) label map as a palette PNG in the dataset's colours (pixel values = labels; `ignore_index` and
    any label beyond the palette are drawn black), atomically."""
    import os
    import tempfile

    from PIL import Image

    if labels.min() < 0 or labels.max() > 255:
        raise ProtocolError(f"label map for {path} has values outside 0..255; cannot store as a palette PNG")
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(palette)] = palette[:256]
    if 0 <= ignore_index < 256:
        pal[ignore_index] = 0
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(pal.ravel().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp.png", dir=path.parent)
    os.close(fd)
    try:
        img.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def eval_labels(labels: np.ndarray, eval_size: int | None) -> np.ndarray:
    """Ground truth at the evaluation resolution: as cached (transform resolution) or nearest-resized to a square."""
    if eval_size is None:
        return labels
    t = torch.from_numpy(labels.astype(np.float32))[None, None]
    return F.interpolate(t, size=(eval_size, eval_size), mode="nearest")[0, 0].long().numpy()


def scores_to_labels(scores: torch.Tensor, size: tuple[int, int], upsample: str) -> np.ndarray:
    """(K, h, w) scores → (H, W) argmax labels; 'bilinear' upsamples the scores first, 'nearest' the argmax."""
    if upsample == "bilinear":
        up = F.interpolate(scores[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        return up.argmax(0).numpy()
    if upsample == "nearest":
        lab = scores.argmax(0)[None, None].float()
        return F.interpolate(lab, size=size, mode="nearest")[0, 0].long().numpy()
    raise ProtocolError(f"upsample must be 'bilinear' or 'nearest', got {upsample!r}")


def accumulate_confusion(tokens: ArrayStore, labels: ArrayStore, score_fns: list[Callable[[np.ndarray], torch.Tensor]],
                         num_classes: int, num_preds: int, ignore_index: int, upsample: str,
                         eval_size: int | None, advance=lambda n=1: None,
                         prepare: Callable[[np.ndarray], np.ndarray] | None = None) -> list[np.ndarray]:
    """For each scoring function (one per seed): dataset-level (C, K) confusion of its upsampled argmax predictions.
    `prepare` maps an image's (h, w, D) tokens once before all scoring functions see them."""
    confs = [np.zeros((num_classes, num_preds), dtype=np.int64) for _ in score_fns]
    for i in range(len(tokens)):
        gt = eval_labels(labels.labels(i), eval_size)
        x = np.asarray(tokens.image(i), dtype=np.float32)
        if prepare is not None:
            x = prepare(x)
        for conf, fn in zip(confs, score_fns):
            pred = scores_to_labels(fn(x), gt.shape, upsample)
            conf += confusion(gt, pred, num_classes, num_preds, ignore_index)
        advance()
    return confs
