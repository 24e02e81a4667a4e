"""`stego`: STEGO's segmentation head (Hamilton et al. 2022) trained on frozen patch tokens, then clustered (cluster
probe, Hungarian) or read by a linear probe (identity); PROTOCOLS.md §11 gives every value with its source.

Head: code = conv1x1(C→dim)(drop(f)) + [conv1x1(C→C), ReLU, conv1x1(C→dim)](drop(f)), Dropout2d(`dropout`) drawn
separately per branch; with `drop_loss_features` the features the loss correlates are dropped out a third time (the
reference's `dropout: True`). Loss on `feature_samples`² random points per image (grid_sample, align_corners=True):
F = feature cosine correlation, centred per point over the second image's points with the global mean restored
(`pointwise`), C = code cosine correlation, per pair −clamp(C, 0)·(F − shift); pairs: self (intra), a kNN image
(inter) and `neg_samples` negatives (batch permutations without fixed points); total = Σ weight·mean. kNN: cosine
top-`knn_top` of the L2-normed spatial-mean tokens of the training views (self excluded), the positive drawn uniformly
from the `num_neighbors` nearest. Adam `lr` for the head; the cluster probe (K = classes centroids ~ randn, loss −mean
max-cosine: online spherical k-means) and the linear probe (1×1 conv, CE against the TRAINING views' labels, logits
upsampled bilinearly) train on the detached code with Adam `probe_lr` in the same steps.

Data, all from cache entries made in one backbone pass each (`view_tokens`): the training views are the train split's
five crops (`crop_type: five`: 4 corners + centre at `crop_ratio`·H × `crop_ratio`·W, torchvision's five_crop) or whole
images (`none`, Potsdam), each resized shorter side → `train_res` NEAREST and centre-cropped, as the reference loader
does; the evaluation views are every evaluation image at `size` (shorter side, NEAREST, centre crop) and its horizontal
flip. Evaluation: codes averaged with the flipped image's (flipped back), upsampled bilinearly to the labels, then the
cluster probe's 2·cosine (the reference's log_softmax(2·cos)) matched by Hungarian on the dataset confusion, and the
linear probe's logits scored as they are (identity); `probe` names the record's headline, and every seed also records
both probes' mIoU and accuracy. `--crf` goes through the shared path (crf.py's defaults are STEGO's CRF parameters:
10 iterations, Gaussian sxy 1 / compat 3, bilateral sxy 67 / srgb 3 / compat 4; unaries softmax(scores /
crf_temperature), 1.0 = STEGO's).

Selection: `final` (default) records the last step's head; training never reads the evaluation labels. `best-val`
reproduces the reference's checkpoint selection: every `val_every` steps the cluster probe is scored on the evaluation
split and the best state is kept; it reads the evaluation labels, and its column says so.

Presets are train_config.yml blocks (λ/b per pair): `cocostuff27` ("Cocostuff27 vit small 1/31/22"),
`cocostuff27-vits-10-3` ("Cocostuff27 10/3 vit_small"), `cocostuff27-vitb` ("Cocostuff27 10/3 vit_base"),
`cityscapes27` ("Cityscapes 10/3"), `potsdam3` ("Potsdam vit small 1/31/22", no five-crop); the defaults are the active
block ("IAROA vit small 1/31/22").

Known differences from the reference: the five crops are cut in memory (the reference saves them as JPEGs first); the
kNN table uses the tokens without dropout (the reference's featurizer left Dropout2d on); the shorter-side resize
rounds the long side (torchvision truncates); the batch order is one permutation of the training views per epoch, a
trailing single view dropped (a negative needs two); the CRF compares against the bicubic-resized image; negatives
are true permutations without fixed points (STEGO shifts a random permutation's fixed points by one, which can repeat
an image).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..cache import Entry, ensure
from ..features import backbone_key, compute_precision, embed, fill_items, label_dtype
from ..metrics import match, remap, scores
from ..paths import cache_dir
from ..progress import progress_bar
from ..transforms import POLICIES, Transform, five_crop_boxes
from .base import (
    Context,
    MaskSaver,
    Predictions,
    Protocol,
    ProtocolError,
    ProtocolResult,
    Scoring,
    SharedParams,
    count_confusions,
    register_protocol,
    score_seeds,
)
from .training import check_train_split, split_candidates, train_split_info

VIEWS_VERSION = "1"  # bump when the cached views' geometry could change


@dataclass(frozen=True)
class StegoParams(SharedParams):
    """STEGO's parameters (module docstring; defaults: the active train_config.yml block, PROTOCOLS.md §11)."""

    resize: Literal[(None, *POLICIES)] = "shorter"
    size: int | None = 320
    probe: Literal["cluster", "linear"] = "cluster"
    selection: Literal["final", "best-val"] = "final"
    val_every: int = 100
    train_split: str | list = "default"
    crop_type: Literal["five", "none"] = "five"
    crop_ratio: float = 0.5
    train_res: int = 224
    dim: int = 70
    dropout: float = 0.1
    drop_loss_features: bool = True
    feature_samples: int = 11
    neg_samples: int = 5
    pointwise: bool = True
    pos_intra_weight: float = 0.67
    pos_intra_shift: float = 0.18
    pos_inter_weight: float = 0.25
    pos_inter_shift: float = 0.12
    neg_inter_weight: float = 0.63
    neg_inter_shift: float = 0.46
    knn_top: int = 30
    num_neighbors: int = 7
    lr: float = 5e-4
    probe_lr: float = 5e-3
    steps: int = 5000
    batch_size: int = 16
    flip_average: bool = True


def _block(neg: tuple[float, float], inter: tuple[float, float], intra: tuple[float, float]) -> dict:
    return {"neg_inter_weight": neg[0], "neg_inter_shift": neg[1], "pos_inter_weight": inter[0],
            "pos_inter_shift": inter[1], "pos_intra_weight": intra[0], "pos_intra_shift": intra[1]}


def _selection_axis(params: dict) -> str | None:
    return "best-of-validation checkpoint (reads the evaluation labels)" if params["selection"] == "best-val" else None


@register_protocol
class StegoProtocol(Protocol):
    name = "stego"
    version = "1"
    description = "STEGO's head trained on cached tokens (five-crop kNN pairs), cluster or linear probe"
    default_seeds = 5
    Params = StegoParams
    axes = {"probe": lambda params: f"{params['probe']} probe", "selection": _selection_axis}
    # train_config.yml blocks (PROTOCOLS.md §11 B2), (weight, shift) of the negative, kNN and self pairs; the
    # defaults are the active block "IAROA vit small 1/31/22" (lines 58-64)
    presets = {
        # "Cocostuff27 vit small 1/31/22" (lines 74-80), the newest ViT-S block for COCO-Stuff
        "cocostuff27": _block((0.63, 0.66), (0.25, 0.02), (0.67, 0.08)),
        # "Cocostuff27 10/3 vit_small" (lines 94-101)
        "cocostuff27-vits-10-3": _block((0.63, 0.16), (0.25, 0.02), (0.67, 0.08)),
        # "Cocostuff27 10/3 vit_base" (lines 83-91), the block issue #3 retrained the released ViT-B/8 head with
        "cocostuff27-vitb": _block((0.1538, 1.0), (1.0, 0.2), (0.1, 0.12)),
        # "Cityscapes 10/3" (lines 126-134); dim stays 70 (the released Cityscapes head has 100, STEGO #52)
        "cityscapes27": _block((0.906, 0.314), (0.577, 0.175), (1.0, 0.458)),
        # "Potsdam vit small 1/31/22" (lines 66-72); no five-crop (STEGO #39's configuration)
        "potsdam3": {**_block((0.63, 0.46), (0.25, 0.02), (0.67, 0.08)), "crop_type": "none"},
    }

    def check(self) -> None:
        p = self.p
        self.positive("val_every", "train_res", "dim", "feature_samples", "knn_top", "num_neighbors", "lr",
                      "probe_lr", "steps")
        check_train_split(self.name, p.train_split)
        if p.resize != "shorter":
            raise ProtocolError(f"stego: resize must be 'shorter' (evaluation at a centre crop of the shorter side, "
                                f"as STEGO), got {p.resize!r}")
        if p.batch_size < 2:
            raise ProtocolError(f"stego: batch_size must be >= 2 (negatives pair each image with another of its "
                                f"batch), got {p.batch_size!r}")
        if p.neg_samples < 0:
            raise ProtocolError(f"stego: neg_samples must be >= 0, got {p.neg_samples!r}")
        if not 0 <= p.dropout < 1:
            raise ProtocolError(f"stego: dropout must be in [0, 1), got {p.dropout!r}")
        self.fraction("crop_ratio", 0.0, 1.0 + 1e-12)
        if p.num_neighbors > p.knn_top:
            raise ProtocolError(f"stego: num_neighbors ({p.num_neighbors}) must be <= knn_top ({p.knn_top}): the "
                                "positive is drawn from the knn_top table")

    def facets_needed(self) -> dict[str, tuple[str, ...]]:
        return {"eval": ()}  # labels at the evaluation geometry; the tokens are this protocol's own views

    def train_split_wanted(self) -> list[str]:
        return split_candidates(self.p.train_split)

    def input_size(self, patch_size: int) -> int:
        """The evaluation size, refused (naming this protocol's parameter, which --size does not set) when the patch
        size does not divide it; so is `train_res`."""
        for key in ("size", "train_res"):
            res = getattr(self.p, key)
            if res % patch_size:
                below, above = res // patch_size * patch_size, (res // patch_size + 1) * patch_size
                raise ProtocolError(f"stego: {key}={res} is not a multiple of the backbone's patch size {patch_size}: "
                                    f"set --param stego.{key}={below or above}" + (f" or {above}" if below else ""))
        return self.p.size

    def check_data(self, eval_set, train_set, transform) -> None:
        p = self.p
        n = len(train_set if train_set is not None else eval_set) * (5 if p.crop_type == "five" else 1)
        if p.knn_top > n - 1:
            raise ProtocolError(f"stego: knn_top={p.knn_top} neighbours, but the training set has {n} views (each "
                                f"has {n - 1} others): set --param stego.knn_top=N with N <= {n - 1}")

    def backbone_facets(self) -> set[str]:
        return {"tokens"}

    def evaluate(self, ctx: Context) -> ProtocolResult:
        p = self.p
        ds = ctx.eval_set
        if ctx.transform is None or ctx.backbone_ref is None:
            raise ProtocolError("stego: computes its views through the backbone, but the run gave no backbone or "
                                "transform")
        train_set, info = train_split_info(ctx)
        patch = ctx.transform.patch_size
        train_views = [(b, False) for b in range(5)] if p.crop_type == "five" else [(None, False)]
        crops = dict(crop_type=p.crop_type, crop_ratio=p.crop_ratio if p.crop_type == "five" else None)
        train_tok, train_lab = view_tokens(ctx, train_set, train_views, Transform("shorter", p.train_res, patch),
                                           p.crop_ratio, True, "stego training views", crops)
        eval_views = [(None, False), (None, True)] if p.flip_average else [(None, False)]
        eval_tok, _ = view_tokens(ctx, ds, eval_views, ctx.transform, p.crop_ratio, False,
                                  "stego evaluation views", {"flips": p.flip_average})
        eval_labels = ctx.get(ds, ()).labels
        nns = knn_table(spatial_means(train_tok), p.knn_top)
        views = PairedViews(eval_tok, len(eval_views))
        target = p.eval_size or ctx.transform.size
        k = ds.num_classes
        models, selected = [], []
        with progress_bar(len(ctx.seeds) * p.steps, f"stego head on {train_set.id}/{train_set.split}") as adv:
            for seed in ctx.seeds:
                val = None
                if p.selection == "best-val":
                    val = lambda m: _probe_miou(m, views, eval_labels, ds, target, p, ctx.device)  # noqa: E731
                m, step = fit(train_tok, train_lab, nns, k, ds.ignore_index, p, seed, ctx.device, adv, val)
                models.append(m)
                selected.append(step)
        saver = MaskSaver(ctx)
        fns = [fn for m in models for fn in m.scorers(target, p.flip_average)]
        with progress_bar(len(ds), f"predicting {ds.id}/{ds.split}") as advance:
            stream = Predictions(views, eval_labels, fns, k, "bilinear", p.eval_size, ctx.scoring,
                                 score_type="stego cluster probe 2·cosine and linear probe logits (averaged codes)")
            confs, per_image = count_confusions(stream, k, ds.ignore_index, saver, advance)
        head = 0 if p.probe == "cluster" else 1
        mappings = [_probe_mapping(i % 2, c) for i, c in enumerate(confs)]

        def both(j, conf, mapping):
            out = {"selected_step": selected[j]}
            for name, i in (("cluster", 2 * j), ("linear", 2 * j + 1)):
                sc = scores(remap(confs[i], mappings[i], confs[i].shape[0]))
                out[f"{name}_miou"], out[f"{name}_pixel_acc"] = sc["miou"], sc["pixel_acc"]
            return out

        per_seed, stats = score_seeds(confs[head::2], per_image[head::2],
                                      lambda j, conf: mappings[2 * j + head], saver, both,
                                      record_mapping=p.probe == "cluster")
        info.update({"train_views": len(train_tok), "eval_views": len(eval_tok), "feature_dim":
                     int(train_tok.data.shape[1]), "selection": p.selection,
                     "knn": f"cosine top-{p.knn_top} of L2-normed spatial means, positive ~ U(nearest "
                            f"{p.num_neighbors}), self excluded"})
        return ProtocolResult(per_seed, info, confs[head::2], stats)


def _probe_mapping(which: int, conf: np.ndarray) -> np.ndarray:
    """Cluster probe (0): Hungarian on the dataset confusion; linear probe (1): identity."""
    return match(conf, "hungarian-pixels" if which == 0 else "identity")


# ---------------------------------------------------------------- the cached views


def view_tokens(ctx: Context, ds, views: list[tuple[int | None, bool]], transform: Transform, crop_ratio: float,
                with_labels: bool, what: str, extra_key: dict):
    """Tokens (and, `with_labels`, labels) of every image's `views` (five-crop box index or None, flipped?), item
    i·V + v: each view cut, resized shorter side → transform.size with NEAREST and centre-cropped (STEGO's loader),
    then through the one batched backbone pass (`features.embed`) in batches of `ctx.batch_size`. Cache entries keyed
    by the backbone's fields, layer, data content and geometry; filled by `features.fill_items` (checkpointed,
    resumable). Returns the opened (tokens, labels or None)."""
    ref = ctx.backbone_ref
    key = {"kind": "stego-views", "version": VIEWS_VERSION, **backbone_key(ref, compute_precision(str(ctx.device))),
           "layer": ctx.layer, "dataset": ds.id, "split": ds.split, "content_sha256": ds.content_sha256(),
           "transform": transform.to_dict(), "views": [list(v) for v in views], **extra_key}
    tok = Entry.at(cache_dir(), "stego", ref.spec.id, ds.id, ds.split, {**key, "facet": "tokens"})
    lab = Entry.at(cache_dir(), "stego", ref.spec.id, ds.id, ds.split, {**key, "facet": "labels"}) \
        if with_labels else None
    n = len(ds) * len(views)
    g = transform.size // transform.patch_size

    def view(i: int, v: int, mask: bool):
        box, flipped = views[v]
        im = Image.fromarray(ds.load_mask(i).astype(np.int32)) if mask else ds.load_image(i)
        if box is not None:
            im = im.crop(five_crop_boxes(im.size[0], im.size[1], crop_ratio)[box])
        if flipped:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return im

    def token_rows(done: int):
        spec = ctx.backbone().spec
        for start in range(done, n, ctx.batch_size):
            ids = list(range(start, min(start + ctx.batch_size, n)))
            x = torch.stack([transform.image(view(i // len(views), i % len(views), False), spec.mean, spec.std,
                                             Image.NEAREST) for i in ids])

            def name_of(j, ids=ids):
                i = ids[int(j)]
                return f"view {i % len(views)} of image '{ds.samples[i // len(views)].name}' of {ds.id}/{ds.split}"

            for out, _ in embed(ctx.backbone(), [(x, range(len(ids)))], ctx.layer, ("tokens",), ctx.device,
                                name_of=name_of):
                yield ids, out["tokens"].to(torch.float16).numpy()

    def label_rows(done: int):
        for start in range(done, n, 64):
            ids = list(range(start, min(start + 64, n)))
            yield ids, [transform.labels(np.asarray(view(i // len(views), i % len(views), True)), ds.ignore_index)
                        for i in ids]

    def compute(todo):
        if tok in todo:
            fill_items(tok, [(g, g)] * n, ref.spec.embed_dim, np.float16, token_rows, f"{what} ({ref.spec.id}) "
                       f"{ds.id}/{ds.split}", {"device": str(ctx.device)})
        if lab is not None and lab in todo:
            s = transform.size
            fill_items(lab, [(s, s)] * n, 1, label_dtype(ds), label_rows, f"{what} labels {ds.id}/{ds.split}", {})

    done = ensure([e for e in (tok, lab) if e is not None], compute)
    ctx.record_pass(what, tok in done, split=ds.split, views=n, geometry=f"shorter {transform.size} NEAREST")
    return tok.open(), (lab.open() if lab is not None else None)


class PairedViews:
    """Token store for `Predictions` over the evaluation views: image i → its V views' (h, w, D) tokens concatenated
    along the last axis (view 0 the image, view 1 its horizontal flip)."""

    def __init__(self, tokens, n_views: int):
        self.tokens, self.n_views = tokens, n_views

    def __len__(self) -> int:
        return len(self.tokens) // self.n_views

    def grid(self, i: int) -> tuple[int, int]:
        return self.tokens.grid(i * self.n_views)

    def image(self, i: int) -> np.ndarray:
        return np.concatenate([np.asarray(self.tokens.image(i * self.n_views + v), dtype=np.float32)
                               for v in range(self.n_views)], axis=-1)


def spatial_means(tokens) -> np.ndarray:
    """(N, D) L2-normalised spatial mean of each item's tokens (the kNN features)."""
    means = np.stack([np.asarray(tokens.image(i), dtype=np.float32).reshape(-1, tokens.data.shape[1]).mean(0)
                      for i in range(len(tokens))])
    return means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)


def knn_table(feats: np.ndarray, top: int) -> np.ndarray:
    """(N, top) indices of each row's `top` most cosine-similar other rows, nearest first (self excluded; ties by
    index). `feats` are L2-normalised."""
    x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    rows = []
    for start in range(0, len(x), 4096):
        sims = x[start: start + 4096] @ x.T
        sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))] = -float("inf")
        rows.append(torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :top])
    return torch.cat(rows).numpy()


# ---------------------------------------------------------------- head, loss, probes


class StegoHead(torch.nn.Module):
    """The linear plus two-layer 1×1 branches to the code, each on its own Dropout2d draw of the features."""

    def __init__(self, dim_in: int, dim: int, dropout: float):
        super().__init__()
        self.linear = torch.nn.Conv2d(dim_in, dim, 1)
        self.nonlinear = torch.nn.Sequential(torch.nn.Conv2d(dim_in, dim_in, 1), torch.nn.ReLU(),
                                             torch.nn.Conv2d(dim_in, dim, 1))
        self.drop = torch.nn.Dropout2d(dropout)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(f)) + self.nonlinear(self.drop(f))


def sample_points(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) maps at (B, S, S, 2) points (x, y in [−1, 1]) → (B, C, S, S), bilinear, align_corners=True."""
    return F.grid_sample(t, coords, mode="bilinear", padding_mode="border", align_corners=True)


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) × (B, C, S, S) → (B, S, S, S, S) cosine of every point of a with every point of b."""
    return torch.einsum("nchw,ncij->nhwij", F.normalize(a, dim=1, eps=1e-10), F.normalize(b, dim=1, eps=1e-10))


def pair_loss(f1, f2, c1, c2, shift: float, pointwise: bool) -> torch.Tensor:
    """−clamp(C, 0)·(F − shift) per point pair (B, S, S, S, S); F without gradient, centred per point of the first
    image over the second's points with the global mean restored when `pointwise`."""
    with torch.no_grad():
        fd = correlation(f1, f2)
        if pointwise:
            level = fd.mean()
            fd = fd - fd.mean(dim=(3, 4), keepdim=True)
            fd = fd - fd.mean() + level
    return -correlation(c1, c2).clamp(min=0) * (fd - shift)


def derangement(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random permutation of range(n) without fixed points: a random order, each element sent to the one a random
    offset (1..n−1) further along it."""
    order = torch.randperm(n, generator=gen)
    shift = int(torch.randint(1, n, (1,), generator=gen))
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-shift)
    return perm


def stego_loss(feats, code, feats_pos, code_pos, coords1, coords2, perms, p) -> torch.Tensor:
    """The total loss of one batch: features/codes (B, ·, h, w) of the images and of their kNN positives, sampled at
    coords1 (images) and coords2 (positives and negatives); `perms` the negatives' batch permutations."""
    f, c = sample_points(feats, coords1), sample_points(code, coords1)
    fp, cp = sample_points(feats_pos, coords2), sample_points(code_pos, coords2)
    total = p.pos_intra_weight * pair_loss(f, f, c, c, p.pos_intra_shift, p.pointwise).mean()
    total = total + p.pos_inter_weight * pair_loss(f, fp, c, cp, p.pos_inter_shift, p.pointwise).mean()
    if perms:
        neg = [pair_loss(f, sample_points(feats[q], coords2), c, sample_points(code[q], coords2),
                     p.neg_inter_shift, p.pointwise).mean() for q in perms]
        total = total + p.neg_inter_weight * torch.stack(neg).mean()
    return total


@dataclass
class Trained:
    """One seed's trained head and probes (CPU, eval mode)."""

    head: StegoHead
    centroids: torch.Tensor
    linear: torch.nn.Conv2d

    def code(self, x: torch.Tensor, flip_average: bool) -> torch.Tensor:
        """(B, h, w, V·D) evaluation views' tokens → (B, dim, h, w) code, averaged with the flipped view's."""
        views = x.permute(0, 3, 1, 2).split(x.shape[-1] // (2 if flip_average else 1), dim=1)
        head = self.head.to(x.device)
        code = head(views[0])
        if flip_average:
            code = (code + head(views[1]).flip(3)) / 2
        return code

    def scorers(self, size: int, flip_average: bool) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """[cluster probe 2·cosine, linear probe logits] of the code upsampled bilinearly to size × size."""

        def up(x):
            return F.interpolate(self.code(x, flip_average), size=(size, size), mode="bilinear", align_corners=False)

        def cluster(x):
            with torch.no_grad():
                return 2 * cluster_scores(up(x), self.centroids.to(x.device))

        def linear(x):
            with torch.no_grad():
                return self.linear.to(x.device)(up(x))

        return [cluster, linear]


def cluster_scores(code: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) cosine of each code vector with each centroid."""
    return torch.einsum("bchw,kc->bkhw", F.normalize(code, dim=1), F.normalize(centroids, dim=1))


def _batches(n: int, size: int, rng: np.random.Generator):
    """Endless batches of view indices: one permutation per epoch cut into `size`, a trailing single view dropped."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n, size):
            chunk = order[start: start + size]
            if len(chunk) >= 2:
                yield chunk


def fit(tokens, labels, nns: np.ndarray, num_classes: int, ignore_index: int, p, seed: int, device: str, advance,
        validate: Callable[["Trained"], float] | None = None) -> tuple[Trained, int]:
    """Train the head and both probes for p.steps steps (module docstring), seeded by `seed` (weights, dropout, batch
    order, positives, points, negatives). Returns the final step's models (or, with `validate`, those of the step
    whose validate() was highest, checked every p.val_every steps and at the end) and that step."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    dim_in = tokens.data.shape[1]
    head = StegoHead(dim_in, p.dim, p.dropout).to(device)
    centroids = torch.nn.Parameter(torch.randn(num_classes, p.dim, generator=gen).to(device))
    linear = torch.nn.Conv2d(p.dim, num_classes, 1).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=p.lr)
    opt_probes = [torch.optim.Adam(linear.parameters(), lr=p.probe_lr), torch.optim.Adam([centroids], lr=p.probe_lr)]
    drop = torch.nn.Dropout2d(p.dropout)

    def load(idx):
        x = np.stack([np.asarray(tokens.image(int(i)), dtype=np.float32) for i in idx])
        return torch.from_numpy(x).permute(0, 3, 1, 2).to(device)

    def snapshot() -> Trained:
        return Trained(copy.deepcopy(head).cpu().eval(), centroids.detach().cpu().clone(),
                       copy.deepcopy(linear).cpu().eval())

    best, best_step, best_score = None, 0, float("nan")
    batches = _batches(len(tokens), p.batch_size, rng)
    s = p.feature_samples
    for step in range(1, p.steps + 1):
        idx = next(batches)
        pos = nns[idx, rng.integers(0, p.num_neighbors, size=len(idx))]
        f, fpos = load(idx), load(pos)
        head.train()
        code, code_pos = head(f), head(fpos)
        lf, lfp = (drop(f), drop(fpos)) if p.drop_loss_features else (f, fpos)
        b = len(idx)
        coords1 = (torch.rand(b, s, s, 2, generator=gen) * 2 - 1).to(device)
        coords2 = (torch.rand(b, s, s, 2, generator=gen) * 2 - 1).to(device)
        perms = [derangement(b, gen).to(device) for _ in range(p.neg_samples)]
        loss = stego_loss(lf, code, lfp, code_pos, coords1, coords2, perms, p)
        detached = code.detach()
        y = torch.from_numpy(np.stack([labels.labels(int(i)) for i in idx])).to(device)
        logits = F.interpolate(linear(detached), size=y.shape[-2:], mode="bilinear", align_corners=False)
        y = torch.where((y >= 0) & (y < num_classes), y, torch.full_like(y, -100))
        if bool((y >= 0).any()):
            loss = loss + F.cross_entropy(logits, y, ignore_index=-100)
        sims = cluster_scores(detached, centroids)
        assign = F.one_hot(sims.argmax(1), num_classes).permute(0, 3, 1, 2).float()
        loss = loss - (assign * sims).sum(1).mean()
        opt.zero_grad()
        for o in opt_probes:
            o.zero_grad()
        loss.backward()
        opt.step()
        for o in opt_probes:
            o.step()
        advance()
        if validate is not None and (step % p.val_every == 0 or step == p.steps):
            m = snapshot()
            score = validate(m)
            if best is None or score > best_score:  # a NaN score (nothing labelled) never wins over a number
                best, best_step, best_score = m, step, score
    if validate is None:
        return snapshot(), p.steps
    return best, best_step


def _probe_miou(m: Trained, views, labels, ds, size: int, p, device: str) -> float:
    """The cluster probe's mIoU on the evaluation split (Hungarian, no CRF): the reference's selection metric."""
    stream = Predictions(views, labels, m.scorers(size, p.flip_average)[:1], ds.num_classes, "bilinear", p.eval_size,
                         Scoring(device=str(device)))
    (conf,), _ = count_confusions(stream, ds.num_classes, ds.ignore_index)
    return scores(remap(conf, match(conf, "hungarian-pixels"), conf.shape[0]))["miou"]
