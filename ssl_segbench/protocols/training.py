"""Helpers shared by the protocols that train on a train split (linear, maskdistill, retrieval): resolving the
`train_split` parameter, checking RandomResizedCrop ranges, and training and applying a head on tokens with Leopart's
SGD recipe (PROTOCOLS.md §3)."""
from __future__ import annotations

from typing import Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import is_number
from .base import Context, ProtocolError, eval_labels

# per SGD step: groups of (tokens (B, D, h, w), labels (B, S, S)) that together make one batch
Steps = Callable[[int, np.random.Generator], Iterator[list[tuple[torch.Tensor, torch.Tensor]]]]


class TrainingParams(Protocol):
    """The parameters the helpers below read: Leopart's SGD recipe, the batch size and the label size heads train
    against (fields of `linear.LinearParams` and `maskdistill.MaskDistillParams`)."""

    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    lr_step: int
    batch_size: int
    train_size: int


def check_train_split(protocol: str, value) -> None:
    """`train_split`: 'default', a split name, or a non-empty list of them."""
    names = [value] if isinstance(value, str) else value
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ProtocolError(f"{protocol}: train_split must be 'default', a split name, or a list of them, "
                            f"got {value!r}")


def split_candidates(value) -> list[str]:
    """`train_split` as the list of split names to try, in order."""
    return [value] if isinstance(value, str) else list(value)


def check_crop_ranges(protocol: str, **ranges) -> None:
    """The ranges of a RandomResizedCrop (`aug_scale`, `aug_ratio`), each [low, high] with 0 < low <= high."""
    for key, v in ranges.items():
        if not (len(v) == 2 and all(is_number(t) for t in v)
                and 0 < v[0] <= v[1]):
            raise ProtocolError(f"{protocol}: {key} must be [low, high] with 0 < low <= high, got {v!r}")


def train_split_info(ctx: Context):
    """(the dataset a protocol trains on, record info saying which split it is and why)."""
    ds = ctx.eval_set
    if ctx.train_set is None:
        return ds, {"train_split": f"{ds.split} (same images as evaluation: "
                                   f"{ctx.train_note or 'no train split under this root'})"}
    info = {"train_split": ctx.train_set.split + (f" ({ctx.train_note})" if ctx.train_note else ""),
            "train_content_sha256": ctx.train_set.content_sha256()}
    return ctx.train_set, info


def _batch(store, label_of, idx, train_size: int):
    """Tokens (B, D, h, w) and labels (B, S, S) of images `idx` (all of one grid size)."""
    x = torch.from_numpy(np.stack([np.asarray(store.image(i), dtype=np.float32) for i in idx])).permute(0, 3, 1, 2)
    y = torch.from_numpy(np.stack([eval_labels(label_of(i), train_size) for i in idx]))
    return x, y


def cached_steps(tokens, label_of: Callable[[int], np.ndarray], p: TrainingParams) -> Steps:
    """Batches of p.batch_size images in a random order per epoch, from cached (h, w, D) tokens and `label_of(i)`
    ((H, W) labels, resized nearest to p.train_size²); images of one grid size share a forward pass."""
    grids = [tokens.grid(i) for i in range(len(tokens))]

    def steps(epoch: int, rng: np.random.Generator):
        order = rng.permutation(len(tokens))
        for start in range(0, len(order), p.batch_size):
            by_grid: dict[tuple, list[int]] = {}
            for i in order[start: start + p.batch_size]:
                by_grid.setdefault(grids[i], []).append(int(i))
            yield [_batch(tokens, label_of, idx, p.train_size) for idx in by_grid.values()]

    return steps


def train_head(make_head: Callable[[int], torch.nn.Module], dim: int, steps: Steps, ignore_index: int,
               p: TrainingParams, seed: int, device: str, advance) -> torch.nn.Module:
    """Train `make_head(dim)` on the batches `steps(epoch, rng)` yields, with CE on bilinearly upsampled logits and
    SGD (p: lr, momentum, weight_decay, epochs, lr_step); seeded by `seed` (weights and batch order). Returns the head
    on the CPU in eval mode."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = make_head(dim).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=p.lr_step, gamma=0.1)
    head.train()
    for epoch in range(p.epochs):
        for groups in steps(epoch, rng):
            opt.zero_grad()
            loss_sum, n_valid = 0.0, 0
            for x, y in groups:
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


def conv_head_scorer(head: torch.nn.Module):
    """(B, h, w, D) tokens → (B, C, h, w) logits, on the tokens' device."""

    def score(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return head.to(x.device)(x.permute(0, 3, 1, 2))

    return score
