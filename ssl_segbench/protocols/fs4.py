"""`fs4`: a documented reconstruction of FS⁴ (Wang et al. 2022, "Fully Self-Supervised Learning for Semantic
Segmentation", arXiv 2202.11981) over the cached patch tokens: pyramid-global-guided (PGG) pseudo labels, a
context-aware embedding (CAE) and bootstrapped self-training of a linear head (PROTOCOLS.md §7; docs/fs4.md).

FS⁴ has no public code and its full text was not reachable: the abstract fixes the three ideas, nothing else. Every
choice marked GUESS below is ours, a recorded parameter, and listed with its reason in docs/fs4.md.

Per seed, on the evaluation split itself (transductive, as `kmeans`):
1. Features: last-layer patch tokens, L2-normalised (everything below compares cosines). [fixed by this design]
2. CAE (`cae`): each token becomes the mean of the tokens within `cae_radius` patches (a Euclidean disc) whose cosine
   to it is at least `cae_threshold`, weighted by exp(cos / `cae_temperature`), itself always included; neighbours
   beyond the grid do not exist; the result is renormalised. [GUESS: radius 2, threshold 0.5, temperature 0.1]
3. PGG pseudo labels (`pgg`): each image's grid is cut into L × L cells for every L in `pyramid_levels` (patch row r
   of h lies in cell row ⌊r·L/h⌋); each cell's mean token, renormalised, is a cell feature; one spherical k-means with
   K clusters over the cells of all levels together (one label space for image, cells and patches) gives each cell a
   soft pseudo label q = softmax(cos(cell, centroid) / `temperature`); a patch's prior q̄ is the mean of the q of its
   cells, one per level. [GUESS: joint k-means, soft labels, levels weighted equally]
4. Bootstrapped self-training, `rounds` rounds. Each round clusters the pixels with `cluster_iters` Lloyd steps of
   spherical k-means whose assignment is argmax_k cos(f, μ_k) / `temperature` + `pgg_prior` · log q̄(k); the centroids
   start, in the first round, at the PGG cell centroids (without PGG: a plain spherical k-means of the patches,
   faiss, best of `nredo`), later at the means of the current head's classes. The assignments are the targets of
   `steps` Adam steps (lr `lr`, `batch_size` images a step, in a seeded order) on a linear head (a 1 × 1 convolution:
   the same map on every patch), set after the first round's clustering to its centroids / temperature (the
   nearest-centroid classifier) and carried across rounds, with loss
   CE(head, targets) + `pgg_weight` · PGG consistency; the consistency of a cell is CE(q_cell, the mean of the head's
   softmax over the cell's patches), averaged over the cells of a level, then over levels. Without PGG both the prior
   and the consistency term are off: plain bootstrapped clustering. [GUESS: all of step 4's form and numbers]
5. Evaluation: the head's logits bilinearly upsampled to label resolution, argmax; `matching` 'auto' is Hungarian on
   pixel counts when K ≤ C and many-to-one (majority) when K > C; mean ± std over seeds. Per seed the record keeps
   how much of the split the largest predicted cluster covers (`largest_cluster_share`: collapse into one region
   shows there) and how many clusters the head uses.

Cost: the embedded tokens of the split are held once in float32 on the run's device (tokens × width × 4 bytes: VOC val
at 448 with a ViT-S/14 is 1.5 M tokens, 2.3 GB); every step is batched tensor work (no Python loop over patches), on the
GPU when the run has one, and deterministic there too (segment sums are one-hot matrix products).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..cluster import KMEANS_BACKENDS, kmeans, kmeans_backend, subsample_rows, update_centroids
from ..metrics import match
from ..progress import progress_bar
from ..registry import is_int
from .base import (
    Context,
    MaskSaver,
    Predictions,
    Protocol,
    ProtocolError,
    ProtocolResult,
    SharedParams,
    auto_matching,
    count_confusions,
    kmeans_backend_axis,
    matching_axis,
    register_protocol,
    score_seeds,
)

_ROWS = 1 << 16  # rows per chunk when scoring or assigning the whole split


@dataclass(frozen=True)
class FS4Params(SharedParams):
    """Parameters of the FS⁴ reconstruction (module docstring; the GUESSes are in docs/fs4.md): K, CAE (step 2), PGG
    (3), self-training (4), the k-means that starts it without PGG, upsampling and matching (5)."""

    k: int | None = None  # None: number of classes
    cae: bool = True
    cae_radius: int = 2
    cae_threshold: float = 0.5
    cae_temperature: float = 0.1
    pgg: bool = True
    pyramid_levels: list = field(default_factory=lambda: [1, 2, 4])
    temperature: float = 0.1
    pgg_prior: float = 1.0
    pgg_weight: float = 1.0
    rounds: int = 3
    cluster_iters: int = 10
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    niter: int = 100
    nredo: int = 5
    max_fit_points: int | None = 2_000_000
    kmeans_backend: Literal[KMEANS_BACKENDS] = "auto"
    upsample: Literal["bilinear", "nearest"] = "bilinear"
    matching: Literal["auto", "hungarian-pixels", "hungarian-iou", "many-to-one"] = "auto"


@register_protocol
class FS4Protocol(Protocol):
    name = "fs4"
    axes = {"matching": matching_axis, "kmeans": kmeans_backend_axis}
    version = "1"
    description = "FS⁴ reconstruction: PGG pseudo labels + CAE + bootstrapped head, Hungarian (guesses recorded)"
    default_seeds = 5
    Params = FS4Params
    resolvers = {"kmeans_backend": kmeans_backend}
    presets = {
        "no-cae": {"cae": False},
        "no-pgg": {"pgg": False},
        "cocostuff27": {"resize": "shorter", "size": 320},  # STEGO's COCO-Stuff-27 geometry: shorter side 320, crop
    }

    def check(self) -> None:
        p = self.p
        self.positive("k", "max_fit_points", allow_none=True)
        self.positive("temperature", "cae_temperature", "lr", "rounds", "batch_size", "niter", "nredo")
        for key, value in (("cae_radius", p.cae_radius), ("cluster_iters", p.cluster_iters), ("steps", p.steps),
                           ("pgg_prior", p.pgg_prior), ("pgg_weight", p.pgg_weight)):
            if not value >= 0:
                raise ProtocolError(f"fs4: {key} must be >= 0, got {value!r}")
        if not -1 <= p.cae_threshold <= 1:
            raise ProtocolError(f"fs4: cae_threshold is a cosine, in [-1, 1]; got {p.cae_threshold!r}")
        levels = p.pyramid_levels
        if not (levels and all(is_int(v) and v > 0 for v in levels)
                and len(set(levels)) == len(levels)):
            raise ProtocolError(f"fs4: pyramid_levels must be distinct positive integers, e.g. [1, 2, 4]; got "
                                f"{levels!r}")
        if p.k is not None and p.k < 2:
            raise ProtocolError(f"fs4: k must be at least 2, got {p.k}")

    def evaluate(self, ctx: Context) -> ProtocolResult:
        p = self.p
        ds = ctx.eval_set
        k = p.k or ds.num_classes
        matching = auto_matching(p.matching, k, ds.num_classes)
        fs = ctx.get(ds, ("tokens",))
        layout = Layout(fs["tokens"], p.pyramid_levels if p.pgg else [])
        with progress_bar(len(ds), f"fs4 embedding {ds.id}/{ds.split}" + (" (CAE)" if p.cae else "")) as adv:
            emb = embed_split(fs["tokens"], p, ctx.device, adv)
        cells = layout.cell_features(emb) if p.pgg else None
        if cells is not None and sum(len(c) for c in cells) < k:
            raise ProtocolError(f"fs4: PGG clusters {sum(len(c) for c in cells)} cells of {len(ds)} images into "
                                f"k={k} groups; lower k or pass --param fs4.pgg=false")
        heads, facts = [], []
        with progress_bar(len(ctx.seeds) * p.rounds, f"fs4 self-training K={k} on {len(emb)} tokens") as adv:
            for seed in ctx.seeds:
                head, fact = self_train(emb, layout, cells, k, p, seed, ctx.device, adv)
                heads.append(head)
                facts.append(fact)
        saver = MaskSaver(ctx)
        with progress_bar(len(ds), f"predicting {ds.id}/{ds.split}") as advance:
            stream = Predictions(EmbeddedTokens(emb, layout), fs.labels, [head_scorer(h) for h in heads], k,
                                 p.upsample, p.eval_size, ctx.scoring, score_type="fs4 head logits")
            confs, per_image = count_confusions(stream, ds.num_classes, ds.ignore_index, saver, advance)
        per_seed, stats = score_seeds(confs, per_image, lambda j, conf: match(conf, matching), saver,
                                      extra=lambda j, conf, mapping: facts[j])
        info = {"k": k, "matching": matching, "tokens": int(len(emb)), "feature_dim": int(emb.shape[1]),
                "cells": [int(len(c)) for c in cells] if cells is not None else None}
        return ProtocolResult(per_seed, info, confs, stats)


class Layout:
    """Where each image's patches lie in the split's flat (N, D) rows, and how they fall into pyramid cells: per level
    L, patch row r of an h-row grid lies in cell row ⌊r·L/h⌋ (columns likewise); `cell[level]` numbers every row's cell
    globally as image · L² + cell, row-major."""

    def __init__(self, tokens, levels: list[int]):
        self.offsets = [int(o) for o in tokens.index[:, 0]]
        self.grids = [tokens.grid(i) for i in range(len(tokens))]
        self.levels = list(levels)
        small = [(i, g) for i, g in enumerate(self.grids) if self.levels and min(g) < max(self.levels)]
        if small:
            i, g = small[0]
            top = max(self.levels)
            raise ProtocolError(f"fs4: image {i} has a {g[0]}×{g[1]} patch grid, too small for the {top}×{top} "
                                "pyramid level (a cell would be empty); drop that level from pyramid_levels or use "
                                "a larger input size")
        self.cell = [torch.cat([i * lv * lv + grid_cells(h, w, lv) for i, (h, w) in enumerate(self.grids)])
                     for lv in self.levels] if self.grids else []
        self._means: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.grids)

    def span(self, i: int) -> slice:
        h, w = self.grids[i]
        return slice(self.offsets[i], self.offsets[i] + h * w)

    def rows(self, idx: list[int]) -> torch.Tensor:
        """The row numbers of images `idx`, in that order."""
        return torch.cat([torch.arange(self.span(i).start, self.span(i).stop) for i in idx])

    def cell_mean(self, grid: tuple[int, int], level: int, like: torch.Tensor) -> torch.Tensor:
        """(L², h·w) matrix whose product with an image's (h·w, C) rows gives each cell's mean row (dtype and device
        of `like`)."""
        key = (grid, level, str(like.device), like.dtype)
        if key not in self._means:
            lv = self.levels[level]
            onehot = F.one_hot(grid_cells(*grid, lv), lv * lv).T.to(torch.float64)
            self._means[key] = (onehot / onehot.sum(1, keepdim=True)).to(like.device, like.dtype)
        return self._means[key]

    def pool(self, rows: torch.Tensor, idx: list[int], level: int) -> torch.Tensor:
        """Rows of images `idx` (concatenated in that order, (Σ h·w, C)) → (len(idx)·L², C) cell means, image-major;
        images of one grid size go through one batched product."""
        counts = [self.grids[i][0] * self.grids[i][1] for i in idx]
        parts = torch.split(rows, counts)
        lv2 = self.levels[level] ** 2
        out = torch.empty(len(idx) * lv2, rows.shape[1], dtype=rows.dtype, device=rows.device)
        by_grid: dict[tuple, list[int]] = {}
        for pos, i in enumerate(idx):
            by_grid.setdefault(self.grids[i], []).append(pos)
        for grid, positions in by_grid.items():
            means = self.cell_mean(grid, level, rows) @ torch.stack([parts[j] for j in positions])
            for j, m in zip(positions, means):
                out[j * lv2: (j + 1) * lv2] = m
        return out

    def cell_features(self, emb: torch.Tensor, chunk: int = 256) -> list[torch.Tensor]:
        """Per level, the (images · L², D) unit-norm mean token of every cell, in global cell order."""
        out = []
        for level in range(len(self.levels)):
            parts = []
            for start in range(0, len(self), chunk):
                idx = list(range(start, min(start + chunk, len(self))))
                parts.append(self.pool(emb[self.span(idx[0]).start: self.span(idx[-1]).stop], idx, level))
            out.append(F.normalize(torch.cat(parts), dim=1))
        return out


def grid_cells(h: int, w: int, level: int) -> torch.Tensor:
    """(h·w,) cell of each patch of an h × w grid cut into level × level cells, row-major."""
    rows = torch.arange(h) * level // h
    cols = torch.arange(w) * level // w
    return (rows[:, None] * level + cols[None, :]).reshape(-1)


def cae(x: torch.Tensor, radius: int, threshold: float, temperature: float) -> torch.Tensor:
    """Context-aware embedding of unit-norm tokens (B, h, w, D) → (B, h, w, D), unit norm: each token the
    exp(cos / temperature)-weighted mean of the tokens within `radius` patches (Euclidean) whose cosine to it is at
    least `threshold`, itself always included. One shifted copy of the whole grid per offset: no loop over patches."""
    b, h, w, _ = x.shape
    r = int(radius)
    padded = F.pad(x, (0, 0, r, r, r, r))
    inside = F.pad(torch.ones(b, h, w, dtype=x.dtype, device=x.device), (r, r, r, r))
    num = torch.zeros_like(x)
    den = torch.zeros(b, h, w, dtype=x.dtype, device=x.device)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx > r * r:
                continue
            y = padded[:, r + dy: r + dy + h, r + dx: r + dx + w]
            cos = (x * y).sum(-1)
            keep = inside[:, r + dy: r + dy + h, r + dx: r + dx + w] > 0
            if dy or dx:
                keep = keep & (cos >= threshold)
            weight = torch.exp((cos - 1.0) / temperature) * keep  # shifted by the largest cosine: no overflow
            num += weight[..., None] * y
            den += weight
    return F.normalize(num / den[..., None], dim=-1)


def embed_split(tokens, p: FS4Params, device: str, advance) -> torch.Tensor:
    """The split's tokens as (N, D) float32 rows on `device`: L2-normalised, then CAE'd per image when p.cae."""
    out = torch.empty(tokens.data.shape, dtype=torch.float32, device=device)
    for i in range(len(tokens)):
        off, (h, w) = int(tokens.index[i, 0]), tokens.grid(i)
        x = F.normalize(torch.from_numpy(np.asarray(tokens.image(i), dtype=np.float32)).to(device), dim=-1)
        if p.cae:
            x = cae(x[None], p.cae_radius, p.cae_threshold, p.cae_temperature)[0]
        out[off: off + h * w] = x.reshape(h * w, -1)
        advance()
    return out


class EmbeddedTokens:
    """Token store over the embedded rows, for Predictions (the head is scored on what it was trained on)."""

    def __init__(self, emb: torch.Tensor, layout: Layout):
        self.emb, self.layout = emb, layout

    def __len__(self) -> int:
        return len(self.layout)

    def grid(self, i: int) -> tuple[int, int]:
        return self.layout.grids[i]

    def image(self, i: int) -> np.ndarray:
        (h, w), off = self.layout.grids[i], self.layout.offsets[i]
        return self.emb[off: off + h * w].reshape(h, w, -1).cpu().numpy()


def self_train(emb: torch.Tensor, layout: Layout, cells: list[torch.Tensor] | None, k: int, p: FS4Params, seed: int,
               device: str, advance) -> tuple[torch.nn.Linear, dict]:
    """Steps 3 and 4 of the module docstring for one seed: the trained head (CPU, eval mode) and facts for the
    record (how many targets changed from one round to the next, the largest cluster's share, clusters used)."""
    tau = p.temperature
    rng = np.random.default_rng(seed)
    if cells is not None:
        allcells = torch.cat(cells).cpu().numpy()
        centroids = torch.from_numpy(kmeans(allcells, k, seed, p.niter, p.nredo, True, None,
                                            p.kmeans_backend, device)).to(device)
        q = [torch.softmax(c @ centroids.T / tau, dim=1) for c in cells]
        log_prior = _log_prior(q, layout, device)
    else:
        fit = emb.cpu().numpy()
        fit = subsample_rows(fit, p.max_fit_points)
        centroids = torch.from_numpy(kmeans(fit, k, seed, p.niter, p.nredo, True, None,
                                            p.kmeans_backend, device)).to(device)
        del fit
        q, log_prior = None, None
    head = torch.nn.Linear(emb.shape[1], k).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=p.lr)
    order = _image_order(len(layout), p.batch_size, rng)
    changed, targets = [], None
    for r in range(p.rounds):
        mu = centroids if r == 0 else update_centroids(emb, _argmax_head(head, emb), k, True)
        for _ in range(p.cluster_iters):
            mu = update_centroids(emb, _assign(emb, mu, tau, log_prior, p.pgg_prior), k, True)
        new = _assign(emb, mu, tau, log_prior, p.pgg_prior)
        if r == 0:  # the head starts as the nearest-centroid classifier of the first clustering
            with torch.no_grad():
                head.weight.copy_(mu / tau)
                head.bias.zero_()
        if targets is not None:
            changed.append(round(float((new != targets).double().mean()), 6))
        targets = new
        _fit_head(head, opt, emb, targets, layout, q, p, order)
        advance()
    final = _argmax_head(head, emb)
    sizes = torch.bincount(final, minlength=k)
    facts = {"targets_changed_per_round": changed,
             "largest_cluster_share": round(float(sizes.max()) / max(len(final), 1), 6),
             "clusters_used": int((sizes > 0).sum())}
    return head.cpu().eval(), facts


def _log_prior(q: list[torch.Tensor], layout: Layout, device: str) -> torch.Tensor:
    """(N, K) log of each patch's PGG prior q̄: the mean over levels of its cells' soft pseudo labels."""
    qbar = sum(q[level][layout.cell[level].to(device)] for level in range(len(q))) / len(q)
    return torch.log(qbar.clamp(min=1e-12))


def _assign(emb: torch.Tensor, mu: torch.Tensor, tau: float, log_prior: torch.Tensor | None,
            weight: float) -> torch.Tensor:
    """(N,) argmax_k cos(f, μ_k) / τ + weight · log q̄(k) (no prior: nearest centroid by cosine), in row chunks."""
    out = []
    for start in range(0, len(emb), _ROWS):
        s = emb[start: start + _ROWS] @ mu.T / tau
        if log_prior is not None and weight:
            s = s + weight * log_prior[start: start + _ROWS]
        out.append(s.argmax(1))
    return torch.cat(out)


def _argmax_head(head: torch.nn.Linear, emb: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([head(emb[s: s + _ROWS]).argmax(1) for s in range(0, len(emb), _ROWS)])


def _image_order(n: int, batch: int, rng: np.random.Generator):
    """Endless batches of image indices: a fresh seeded permutation of all images each pass."""
    def batches():
        while True:
            perm = rng.permutation(n)
            for start in range(0, n, batch):
                yield [int(i) for i in perm[start: start + batch]]
    return batches()


def _fit_head(head: torch.nn.Linear, opt, emb: torch.Tensor, targets: torch.Tensor, layout: Layout,
              q: list[torch.Tensor] | None, p: FS4Params, order) -> None:
    """p.steps Adam steps on CE(head, targets) + pgg_weight · PGG consistency (module docstring, step 4)."""
    device = emb.device
    head.train()
    for _ in range(p.steps):
        idx = next(order)
        rows = layout.rows(idx).to(device)
        logits = head(emb[rows])
        loss = F.cross_entropy(logits, targets[rows])
        if q is not None and p.pgg_weight:
            prob = torch.softmax(logits, dim=1)
            terms = []
            for level, lv in enumerate(layout.levels):
                glob = (torch.tensor(idx)[:, None] * lv * lv + torch.arange(lv * lv)[None]).reshape(-1).to(device)
                mean = layout.pool(prob, idx, level)
                terms.append(-(q[level][glob] * torch.log(mean.clamp(min=1e-12))).sum(1).mean())
            loss = loss + p.pgg_weight * torch.stack(terms).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()


def head_scorer(head: torch.nn.Linear):
    """(B, h, w, D) embedded tokens → (B, K, h, w) head logits, on the tokens' device."""

    def score(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return head.to(x.device)(x).permute(0, 3, 1, 2)

    return score
