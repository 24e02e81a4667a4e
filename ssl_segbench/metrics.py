"""Segmentation metrics from one dataset-level confusion matrix (PROTOCOLS.md §9).

Rows are ground-truth classes, columns are predicted labels (cluster ids before matching, classes after). mIoU
averages IoU over the classes that occur in the ground truth or the matched prediction; torchmetrics-style per-batch
averaging is deliberately not offered because it is not comparable with the field's numbers.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int, num_preds: int,
              ignore_index: int = 255) -> np.ndarray:
    """(num_classes, num_preds) int64 pixel counts of gt == c and pred == k; ignore pixels are skipped."""
    gt = np.asarray(gt).ravel()
    pred = np.asarray(pred).ravel()
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth has {gt.size} pixels but prediction has {pred.size}")
    keep = gt != ignore_index
    gt, pred = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"ground-truth labels outside 0..{num_classes - 1} (ignore {ignore_index})")
    if pred.size and (pred.min() < 0 or pred.max() >= num_preds):
        raise ValueError(f"predicted labels outside 0..{num_preds - 1}")
    return np.bincount(gt * num_preds + pred, minlength=num_classes * num_preds).reshape(num_classes, num_preds)


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


def match_and_score(conf: np.ndarray, matching: str = "hungarian-pixels") -> tuple[dict, np.ndarray]:
    """Match clusters to classes ('hungarian-pixels', 'hungarian-iou' or 'many-to-one') and score; returns
    (scores, cluster → class mapping). With matched labels already in class space use 'identity'."""
    num_classes = conf.shape[0]
    if matching == "hungarian-pixels":
        mapping = hungarian(conf, "pixels")
    elif matching == "hungarian-iou":
        mapping = hungarian(conf, "iou")
    elif matching == "many-to-one":
        mapping = many_to_one(conf)
    elif matching == "identity":
        mapping = np.arange(conf.shape[1])
        mapping[mapping >= num_classes] = -1
    else:
        raise ValueError(f"unknown matching {matching!r}")
    return scores(remap(conf, mapping, num_classes)), mapping
