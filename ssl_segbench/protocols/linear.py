"""`linear`: a linear probe (1×1 convolution) on frozen patch tokens, trained on the train split and scored on the
evaluation split (PROTOCOLS.md §3).

Logits are computed at token resolution and upsampled bilinearly; a 1×1 convolution commutes with bilinear upsampling,
so this equals Leopart's "upsample the tokens, then classify" exactly, at a fraction of the cost. This is the fast
variant: it trains on cached features without augmentation (recorded as `variant: cached-features`). Optimiser and
schedule are Leopart's: SGD lr 0.01, momentum 0.9, weight decay 1e-4, 25 epochs, lr × 0.1 at epoch 20, batch 60, loss
against labels at 100×100. When the dataset root has no train split the probe trains on the evaluation images
themselves, and the record says so.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..progress import progress_bar
from . import register_protocol
from .base import Context, MaskSaver, Protocol, accumulate_confusion, eval_labels, match_seeds


@register_protocol
class LinearProtocol(Protocol):
    name = "linear"
    version = "1"
    description = "linear probe on frozen patch tokens (train split → eval split)"
    default_seeds = 1
    defaults = {"resize": None, "size": None, "variant": "cached-features", "epochs": 25, "lr": 0.01, "momentum": 0.9,
                "weight_decay": 1e-4, "lr_step": 20, "batch_size": 60, "train_size": 100, "upsample": "bilinear",
                "eval_size": None, "crf": False}
    presets = {"leopart": {"resize": "square", "size": 448, "eval_size": 100}}

    def run(self, ctx: Context) -> dict:
        p = self.params
        ds = ctx.eval_set
        train_set = ctx.train_set
        info = {}
        if train_set is None:
            train_set = ds
            info["train_split"] = f"{ds.split} (same images as evaluation: no train split under this root)"
        else:
            info["train_split"] = train_set.split
            info["train_files_sha256"] = train_set.file_list_sha256()
        train = ctx.get(train_set, ("tokens",))
        evalfs = ctx.get(ds, ("tokens",))
        heads = []
        with progress_bar(len(ctx.seeds) * p["epochs"], f"linear probe on {train_set.id}/{train_set.split}") as adv:
            for seed in ctx.seeds:
                heads.append(_train(train, ds.num_classes, ds.ignore_index, p, seed, ctx.device, adv))
        score_fns = [_scorer(h) for h in heads]
        per_image, saver = [], MaskSaver(ctx)
        with progress_bar(len(ds), f"predicting {ds.id}/{ds.split}") as advance:
            confs = accumulate_confusion(evalfs["tokens"], evalfs.labels, score_fns, ds.num_classes, ds.num_classes,
                                         ds.ignore_index, p["upsample"], p["eval_size"], advance,
                                         on_labels=saver, per_image=per_image)
        per_seed, stats = match_seeds(confs, per_image, "identity", saver)
        return {"per_seed": per_seed, "info": info, "confusions": [c.tolist() for c in confs], "image_stats": stats}


def _batch(store, label_of, idx, train_size: int):
    """Tokens (B, D, h, w) and labels (B, S, S) of images `idx` (all of one grid size)."""
    x = torch.from_numpy(np.stack([np.asarray(store.image(i), dtype=np.float32) for i in idx])).permute(0, 3, 1, 2)
    y = torch.from_numpy(np.stack([eval_labels(label_of(i), train_size) for i in idx]))
    return x, y


def _train(fs, num_classes: int, ignore_index: int, p: dict, seed: int, device: str, advance) -> torch.nn.Conv2d:
    return train_head(fs["tokens"], fs.labels.labels, lambda dim: torch.nn.Conv2d(dim, num_classes, kernel_size=1),
                      ignore_index, p, seed, device, advance)


def train_head(tokens, label_of: Callable[[int], np.ndarray], make_head: Callable[[int], torch.nn.Module],
               ignore_index: int, p: dict, seed: int, device: str, advance) -> torch.nn.Module:
    """Train `make_head(D)` on cached (h, w, D) tokens against `label_of(i)` ((H, W) labels of image i, resized nearest
    to p["train_size"]²), with CE on bilinearly upsampled logits, SGD (p: lr, momentum, weight_decay, epochs, lr_step,
    batch_size); images of one grid size share a forward pass. Returns the head on the CPU in eval mode."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = make_head(tokens.data.shape[1]).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=p["lr"], momentum=p["momentum"], weight_decay=p["weight_decay"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=p["lr_step"], gamma=0.1)
    grids = [tuple(g) for g in tokens.index[:, 1:].tolist()]
    head.train()
    for _epoch in range(p["epochs"]):
        order = rng.permutation(len(tokens))
        for start in range(0, len(order), p["batch_size"]):
            chunk = order[start: start + p["batch_size"]]
            by_grid: dict[tuple, list[int]] = {}
            for i in chunk:
                by_grid.setdefault(grids[i], []).append(int(i))
            opt.zero_grad()
            loss_sum, n_valid = 0.0, 0
            for idx in by_grid.values():
                x, y = _batch(tokens, label_of, idx, p["train_size"])
                x, y = x.to(device), y.to(device)
                logits = F.interpolate(head(x), size=y.shape[-2:], mode="bilinear", align_corners=False)
                valid = int((y != ignore_index).sum())
                if valid:
                    loss_sum = loss_sum + F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
                    n_valid += valid
            if n_valid:
                (loss_sum / n_valid).backward()
                opt.step()
        sched.step()
        advance()
    return head.cpu().eval()


def _scorer(head: torch.nn.Module):
    """(h, w, D) tokens → (C, h, w) logits."""

    def score(x: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return head(torch.from_numpy(x).permute(2, 0, 1)[None])[0]

    return score
