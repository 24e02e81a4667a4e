"""`linear`: a linear probe (1×1 convolution) on frozen patch tokens, trained on a train split and scored on the
evaluation split (PROTOCOLS.md §3).

Logits are computed at token resolution and upsampled bilinearly; a 1×1 convolution commutes with bilinear upsampling,
so this equals Leopart's "upsample the tokens, then classify" exactly, at a fraction of the cost (tested). Optimiser
and schedule are Leopart's: SGD lr 0.01, momentum 0.9, weight decay 1e-4, 25 epochs, lr × 0.1 at epoch 20, batch 60,
loss against labels at 100×100.

Variants (`variant`):
- `cached-features` (default, fast): trains on the cached tokens of the run's transform, no augmentation;
- `augmented` (Leopart's training): every epoch, every train image goes through RandomResizedCrop(size, scale
  0.8–1) + horizontal flip (p 0.5) and through the backbone again (batched, bf16 autocast on CUDA); crops are drawn
  from a generator seeded by (seed, epoch, image), so they do not depend on batch sizes. Evaluation still reads the
  cached tokens of the evaluation split.
Sliding-window evaluation (`slide_crop`, `slide_stride`, both or neither; for images too large to embed whole, as
Cityscapes at 1024×2048): each evaluation image at the run's transform goes through windows of the backbone, the
head scores each window, its logits are resized to the window and averaged over overlaps (`base.eval_predictions`);
training is unchanged. Unset (the default), the evaluation split's cached whole-image tokens are scored.
Train split (`train_split`): 'default' (the dataset's own train split), a split name, or a list of candidates of which
the first available under the root is used; preset `leopart` asks for VOC's `trainaug` (10,582 images) and falls back
to the default train split elsewhere. The record's info says which split trained the probe and why; when the root has
no train split at all the probe trains on the evaluation images themselves, and the record says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch

from ..metrics import match
from ..progress import progress_bar
from ..transforms import RandomResizedCropFlip
from .base import (
    Context,
    MaskSaver,
    Protocol,
    ProtocolError,
    ProtocolResult,
    SharedParams,
    added_param,
    backbone_tokens,
    check_sliding,
    count_confusions,
    eval_labels,
    eval_predictions,
    register_protocol,
    score_seeds,
    sliding_axis,
)
from .training import (
    Steps,
    cached_steps,
    check_crop_ranges,
    check_train_split,
    conv_head_scorer,
    split_candidates,
    train_head,
    train_split_info,
)


@dataclass(frozen=True)
class LinearParams(SharedParams):
    """Parameters of the linear probe (module docstring): variant, train split, Leopart's SGD recipe, the label size
    it trains against, upsampling, the RandomResizedCrop + flip of the augmented variant, and sliding-window
    evaluation (added after records existed: unset, they leave the record key as it was)."""

    variant: Literal["cached-features", "augmented"] = "cached-features"
    train_split: str | list = "default"
    epochs: int = 25
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int = 20
    batch_size: int = 60
    train_size: int = 100
    upsample: Literal["bilinear", "nearest"] = "bilinear"
    aug_scale: list = field(default_factory=lambda: [0.8, 1.0])
    aug_ratio: list = field(default_factory=lambda: [0.75, 4 / 3])
    aug_flip: float = 0.5
    slide_crop: int | None = added_param(None)
    slide_stride: int | None = added_param(None)


@register_protocol
class LinearProtocol(Protocol):
    name = "linear"
    version = "1"
    description = "linear probe on frozen patch tokens (train split → eval split)"
    default_seeds = 1
    Params = LinearParams
    axes = {"sliding": sliding_axis}
    presets = {"leopart": {"resize": "square", "size": 448, "eval_size": 100, "train_split": ["trainaug", "default"]},
               "leopart-augmented": {"resize": "square", "size": 448, "eval_size": 100,
                                     "train_split": ["trainaug", "default"], "variant": "augmented"}}

    def check(self) -> None:
        p = self.p
        self.positive("epochs", "lr", "lr_step", "batch_size", "train_size")
        check_train_split(self.name, p.train_split)
        check_crop_ranges(self.name, aug_scale=p.aug_scale, aug_ratio=p.aug_ratio)
        if not 0 <= p.aug_flip <= 1:
            raise ProtocolError(f"linear: aug_flip must be a probability in [0, 1], got {p.aug_flip!r}")
        check_sliding(self.name, p.slide_crop, p.slide_stride)

    def check_data(self, eval_set, train_set, transform) -> None:
        if transform is not None:
            check_sliding(self.name, self.p.slide_crop, self.p.slide_stride, transform.patch_size)

    def facets_needed(self) -> dict[str, tuple[str, ...]]:
        evaluation = () if self.p.slide_crop else ("tokens",)  # sliding windows embed the images themselves
        if self.p.variant == "augmented":  # trains on fresh backbone passes (a second pass of its own)
            return {"eval": evaluation}
        return {"eval": evaluation, "train": ("tokens",)}

    def backbone_facets(self) -> set[str]:
        return {"tokens"}

    def train_split_wanted(self) -> list[str]:
        return split_candidates(self.p.train_split)

    def evaluate(self, ctx: Context) -> ProtocolResult:
        p = self.p
        ds = ctx.eval_set
        if p.variant == "augmented" and ctx.transform is None:
            raise ProtocolError("linear: variant=augmented crops train images at the run's input size, but the run "
                                "gave no transform")
        train_set, info = train_split_info(ctx)
        heads = []
        with progress_bar(len(ctx.seeds) * p.epochs, f"linear probe ({p.variant}) on "
                                                         f"{train_set.id}/{train_set.split}") as adv:
            if p.variant == "cached-features":
                train = ctx.get(train_set, ("tokens",))
                steps = cached_steps(train["tokens"], train.labels.labels, p)
                for seed in ctx.seeds:
                    heads.append(train_head(_linear_head(ds.num_classes), train["tokens"].data.shape[1], steps,
                                            ds.ignore_index, p, seed, ctx.device, adv))
            else:
                dim = ctx.backbone().spec.embed_dim  # the width of its tokens (the cache's rows)
                for seed in ctx.seeds:
                    steps = augmented_steps(ctx, train_set, p, seed)
                    heads.append(train_head(_linear_head(ds.num_classes), dim, steps, ds.ignore_index, p, seed,
                                            ctx.device, adv))
                ctx.record_pass("augmented training", True, split=train_set.split, facets=["tokens"],
                                images=len(train_set) * p.epochs * len(ctx.seeds),
                                augmentation=f"RandomResizedCrop({ctx.transform.size}, scale {p.aug_scale}, "
                                             f"ratio {p.aug_ratio}) + flip p {p.aug_flip}")
        saver = MaskSaver(ctx)
        with progress_bar(len(ds), f"predicting {ds.id}/{ds.split}") as advance:
            stream = eval_predictions(ctx, [conv_head_scorer(h) for h in heads], ds.num_classes, p.upsample,
                                      p.eval_size, "linear-head logits",
                                      (p.slide_crop, p.slide_stride) if p.slide_crop else None)
            confs, per_image = count_confusions(stream, ds.num_classes, ds.ignore_index, saver, advance)
        per_seed, stats = score_seeds(confs, per_image, lambda j, conf: match(conf, "identity"), saver,
                                      record_mapping=False)
        return ProtocolResult(per_seed, info, confs, stats)


def _linear_head(num_classes: int) -> Callable[[int], torch.nn.Module]:
    return lambda dim: torch.nn.Conv2d(dim, num_classes, kernel_size=1)


def augmented_steps(ctx: Context, ds, p: LinearParams, seed: int) -> Steps:
    """Batches of p.batch_size freshly augmented train images (module docstring) through the backbone: tokens of
    the run's layer and labels at p.train_size²."""
    aug = RandomResizedCropFlip(ctx.transform.size, tuple(p.aug_scale), tuple(p.aug_ratio), p.aug_flip)
    spec = ctx.backbone().spec

    def steps(epoch: int, rng: np.random.Generator):
        order = rng.permutation(len(ds))
        for start in range(0, len(order), p.batch_size):
            xs, ys = [], []
            for i in order[start: start + p.batch_size]:
                img = ds.load_image(int(i))
                box, flipped = aug.sample(np.random.default_rng([seed, epoch, int(i)]), *img.size)
                x, y = aug.apply(img, ds.load_mask(int(i)), box, flipped, spec.mean, spec.std)
                xs.append(x)
                ys.append(eval_labels(y, p.train_size))
            t = backbone_tokens(ctx, xs, lambda j, first=start, epoch=epoch: (
                f"the augmented crop of image '{ds.samples[int(order[first + j])].name}' of {ds.id}/{ds.split} "
                f"(linear, epoch {epoch})"))
            yield [(t.permute(0, 3, 1, 2).contiguous(), torch.from_numpy(np.stack(ys)))]

    return steps
