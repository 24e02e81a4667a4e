"""Segmentation metrics from one dataset-level confusion matrix (PROTOCOLS.md §9).

Rows are ground-truth classes, columns are predicted labels (cluster ids before matching, classes after). mIoU
averages IoU over the classes that occur in the ground truth or the matched prediction; torchmetrics-style per-batch
averaging is deliberately not offered because it is not comparable with the field's numbers.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import linear_sum_assignment


def confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int, num_preds: int,
              ignore_index: int = 255) -> np.ndarray:
    """(num_classes, num_preds) int64 pixel counts of gt == c and pred == k over two label arrays of equal size;
    ignore pixels are skipped (one `ConfusionAccumulator` update)."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.size != pred.size:
        raise ValueError(f"ground truth has {gt.size} pixels but prediction has {pred.size}")
    acc = ConfusionAccumulator(num_classes, num_preds, ignore_index)
    acc.update(gt.reshape(1, -1), pred.reshape(1, -1))
    return acc.compute()


class ConfusionAccumulator:
    """A dataset-level (C, K) confusion built batch by batch, its state kept in the object as torchmetrics keeps a
    metric's: `update` counts a batch of label maps, `compute` gives the total. With `per_image`, every image's own
    confusion is kept too (`sparse` form, in update order) for bootstrap intervals over images (`image_stats`)."""

    def __init__(self, num_classes: int, num_preds: int, ignore_index: int = 255, per_image: bool = False):
        self.num_classes, self.num_preds, self.ignore_index = num_classes, num_preds, ignore_index
        self.total = np.zeros((num_classes, num_preds), dtype=np.int64)
        self.images: list | None = [] if per_image else None

    def update(self, gt, pred) -> None:
        """Count (B, H, W) ground-truth and predicted label maps (torch tensors, on any device, or arrays) in one
        bincount; ignore pixels are skipped, any other label outside 0..C-1 or prediction outside 0..K-1 is refused
        (ValueError)."""
        confs = _confusions_batch(gt, pred, self.num_classes, self.num_preds, self.ignore_index)
        self.total += confs.sum(0)
        if self.images is not None:
            self.images.extend(sparse(c) for c in confs)

    def compute(self) -> np.ndarray:
        """The (C, K) int64 confusion of everything counted so far."""
        return self.total.copy()


def _confusions_batch(gt, pred, num_classes: int, num_preds: int, ignore_index: int) -> np.ndarray:
    """(B, ...) label maps → (B, C, K) int64 confusions, one bincount for the batch on the maps' device (ignore pixels
    go to a spare bin). Ranges are checked with min/max and bins are int32 where they fit: two passes fewer over the
    pixels, the same counts."""
    import torch  # lazy: start-up time (torch); `compare` reads this module and needs no torch

    gt, pred = torch.as_tensor(gt), torch.as_tensor(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth is {tuple(gt.shape)} but prediction is {tuple(pred.shape)}")
    b = gt.shape[0]
    gt, pred = gt.reshape(b, -1), pred.reshape(b, -1)
    keep = gt != ignore_index
    gt = torch.where(keep, gt, 0)  # an ignore pixel counts in the spare bin below, whatever its class
    if gt.numel() and (int(gt.min()) < 0 or int(gt.max()) >= num_classes):
        raise ValueError(f"ground-truth labels outside 0..{num_classes - 1} (ignore {ignore_index})")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_preds):
        raise ValueError(f"predicted labels outside 0..{num_preds - 1}")
    cells = b * num_classes * num_preds
    bins = torch.int32 if cells < 2 ** 31 - 1 else torch.int64
    flat = (gt.to(bins) + torch.arange(b, dtype=bins, device=gt.device)[:, None] * num_classes) * num_preds \
        + pred.to(bins)
    counts = torch.bincount(torch.where(keep, flat, cells).reshape(-1), minlength=cells + 1)[:cells]
    return counts.reshape(b, num_classes, num_preds).cpu().numpy().astype(np.int64)


def hungarian(conf: np.ndarray, objective: str = "pixels") -> np.ndarray:
    """One-to-one cluster → class map for a (C, K) confusion matrix; clusters left unmatched (K > C) get -1.

    objective 'pixels' maximises matched pixels (STEGO, PiCIE); 'iou' minimises the summed 1 − IoU of matched pairs
    (Leopart's PredsmIoU)."""
    conf = np.asarray(conf, dtype=np.float64)
    if objective == "pixels":
        cost = -conf
    elif objective == "iou":
        union = conf.sum(1, keepdims=True) + conf.sum(0, keepdims=True) - conf
        cost = 1.0 - np.divide(conf, union, out=np.zeros_like(conf), where=union > 0)
    else:
        raise ValueError(f"unknown matching objective {objective!r}: use 'pixels' or 'iou'")
    rows, cols = linear_sum_assignment(cost)
    mapping = np.full(conf.shape[1], -1, dtype=np.int64)
    mapping[cols] = rows
    return mapping


def many_to_one(conf: np.ndarray) -> np.ndarray:
    """Each cluster → the class maximising its precision tp/(tp+fp), i.e. its majority class (overclustering).

    A cluster with no labelled pixels maps to -1."""
    conf = np.asarray(conf)
    mapping = conf.argmax(0).astype(np.int64)
    mapping[conf.sum(0) == 0] = -1
    return mapping


def remap(conf: np.ndarray, mapping: np.ndarray, num_classes: int) -> np.ndarray:
    """Fold a (C, K) cluster confusion into (C, C+1) class confusion; column C collects unmatched clusters (always
    wrong)."""
    mapping = np.where(np.asarray(mapping) < 0, num_classes, mapping)
    out = np.zeros((conf.shape[0], num_classes + 1), dtype=np.int64)
    np.add.at(out.T, mapping, np.asarray(conf, dtype=np.int64).T)
    return out


def scores(class_conf: np.ndarray) -> dict:
    """mIoU, pixel accuracy and per-class IoU / F1 from a (C, C[+1]) class confusion matrix (extra column = unmatched).

    IoU_c = tp / (tp + fp + fn); classes with tp + fp + fn = 0 (absent from ground truth and prediction) are NaN and
    excluded from the mean."""
    conf = np.asarray(class_conf, dtype=np.float64)
    c = conf.shape[0]
    tp = np.diag(conf[:, :c])
    gt_total = conf.sum(1)
    pred_total = conf[:, :c].sum(0)
    union = gt_total + pred_total - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        f1 = np.where(union > 0, 2 * tp / (gt_total + pred_total), np.nan)
    total = conf.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "pixel_acc": float(tp.sum() / total) if total else float("nan"),
        "mf1": float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan"),
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
    }


MATCHINGS = ("hungarian-pixels", "hungarian-iou", "many-to-one", "identity")


def match(conf: np.ndarray, matching: str = "hungarian-pixels") -> np.ndarray:
    """Cluster → class map of a (C, K) confusion: 'hungarian-pixels', 'hungarian-iou', 'many-to-one', or 'identity'
    for labels already in class space (labels ≥ C unmatched)."""
    if matching == "hungarian-pixels":
        return hungarian(conf, "pixels")
    if matching == "hungarian-iou":
        return hungarian(conf, "iou")
    if matching == "many-to-one":
        return many_to_one(conf)
    if matching == "identity":
        mapping = np.arange(conf.shape[1])
        mapping[mapping >= conf.shape[0]] = -1
        return mapping
    raise ValueError(f"unknown matching {matching!r}; use one of {MATCHINGS}")


def match_and_score(conf: np.ndarray, matching: str = "hungarian-pixels") -> tuple[dict, np.ndarray]:
    """Match clusters to classes and score; returns (scores, cluster → class mapping)."""
    mapping = match(conf, matching)
    return scores(remap(conf, mapping, conf.shape[0])), mapping


# --- uncertainty over images ----------------------------------------------------------------------------------------
# Per-image sufficient statistics: for each image and class, [tp, fp, fn] after the dataset-level matching. Summing
# them over any multiset of images gives that multiset's confusion-based scores, so resampling images (not pixels) for a
# bootstrap is a weighted sum.


def sparse(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A per-image confusion kept compactly: (flat indices of non-zero cells, their counts)."""
    flat = np.asarray(conf).ravel()
    nz = np.flatnonzero(flat)
    return nz.astype(np.int32), flat[nz]


def image_stats(image_confs: list, mapping: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, C, 3) int64 [tp, fp, fn] per image, from each image's (C, K) cluster confusion (dense, or as `sparse`
    gives it) and the cluster → class map (-1 = unmatched, always wrong)."""
    k = len(mapping)
    out = np.zeros((len(image_confs), num_classes, 3), dtype=np.int64)
    for i, conf in enumerate(image_confs):
        if isinstance(conf, tuple):
            conf = np.bincount(conf[0], weights=conf[1], minlength=num_classes * k).astype(np.int64)
            conf = conf.reshape(num_classes, k)
        folded = remap(conf, mapping, num_classes)
        tp = np.diag(folded[:, :num_classes])
        out[i, :, 0] = tp
        out[i, :, 1] = folded[:, :num_classes].sum(0) - tp
        out[i, :, 2] = folded.sum(1) - tp
    return out


def scores_from_stats(totals: np.ndarray) -> dict[str, np.ndarray]:
    """mIoU and pixel accuracy from summed [tp, fp, fn] of shape (..., C, 3); the same definitions as `scores`."""
    tp, fp, fn = totals[..., 0].astype(float), totals[..., 1].astype(float), totals[..., 2].astype(float)
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
        miou = np.nanmean(np.where(np.isnan(iou).all(-1, keepdims=True), 0.0, iou), axis=-1)
        acc = tp.sum(-1) / np.maximum((tp + fn).sum(-1), 1)
    return {"miou": miou, "pixel_acc": acc, "per_class_iou": iou}


def _resample_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) counts of each image in each bootstrap resample."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot)


def bootstrap_ci(stats: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Percentile interval of the seed-mean mIoU and pixel accuracy when images are resampled with replacement.

    `stats` is (S, N, C, 3): per seed, per image, per class [tp, fp, fn]. The same resample of images is applied to
    every seed (the seeds cluster the same images)."""
    s, n, c, _ = stats.shape
    w = _resample_weights(n, n_boot, seed)
    totals = np.einsum("bn,snk->bsk", w, stats.reshape(s, n, c * 3).astype(float)).reshape(n_boot, s, c, 3)
    sc = scores_from_stats(totals)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {m: [float(np.percentile(sc[m].mean(1), lo)), float(np.percentile(sc[m].mean(1), hi))]
            for m in ("miou", "pixel_acc")}


def paired_bootstrap(stats_a: np.ndarray, stats_b: np.ndarray, n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict:
    """Difference a − b of seed-mean mIoU, pixel accuracy and per-class IoU on the same images, with a percentile
    interval and a two-sided p-value from resampling images jointly for both (paired)."""
    if stats_a.shape[1:] != stats_b.shape[1:]:
        raise ValueError(f"paired comparison needs the same images and classes: {stats_a.shape} vs {stats_b.shape}")
    n = stats_a.shape[1]
    w = _resample_weights(n, n_boot, seed)

    def boot(stats):
        s, _, c, _ = stats.shape
        tot = np.einsum("bn,snk->bsk", w, stats.reshape(s, n, c * 3).astype(float)).reshape(n_boot, s, c, 3)
        return scores_from_stats(tot), scores_from_stats(stats.sum(1))

    (ba, fa), (bb, fb) = boot(stats_a), boot(stats_b)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out = {}
    for m in ("miou", "pixel_acc", "per_class_iou"):
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a class absent in a resample stays NaN
            observed = np.nanmean(fa[m], 0) - np.nanmean(fb[m], 0)
            diffs = np.nanmean(ba[m], 1) - np.nanmean(bb[m], 1)
        p = 2 * np.minimum((diffs <= 0).mean(0), (diffs >= 0).mean(0))
        out[m] = {"delta": observed, "ci": [np.nanpercentile(diffs, lo, axis=0), np.nanpercentile(diffs, hi, axis=0)],
                  "p": np.minimum(p, 1.0)}
    return out
