"""Metrics against brute-force references and hand-computed cases."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from ssl_segbench.metrics import confusion, hungarian, many_to_one, match_and_score, remap, scores


def _brute_confusion(gt, pred, c, k, ignore):
    m = np.zeros((c, k), dtype=np.int64)
    for g, p in zip(gt.ravel(), pred.ravel()):
        if g != ignore:
            m[g, p] += 1
    return m


def _brute_scores(gt, pred_class, c, ignore):
    """IoU per class straight from pixel sets; mean over classes present in gt or prediction."""
    keep = gt != ignore
    ious = []
    for cls in range(c):
        g, p = (gt == cls) & keep, (pred_class == cls) & keep
        union = (g | p).sum()
        if union:
            ious.append((g & p).sum() / union)
    return float(np.mean(ious)), float((gt[keep] == pred_class[keep]).mean())


@pytest.mark.parametrize("seed", range(5))
def test_confusion_matches_loop(seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 4, size=(17, 13))
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, 6, size=gt.shape)
    np.testing.assert_array_equal(confusion(gt, pred, 4, 6, 255), _brute_confusion(gt, pred, 4, 6, 255))


@pytest.mark.parametrize("seed", range(8))
def test_hungarian_pixels_equals_best_permutation(seed):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(2, 6))
    conf = rng.integers(0, 50, size=(c, c))
    mapping = hungarian(conf, "pixels")
    got = sum(conf[mapping[k], k] for k in range(c))
    best = max(sum(conf[perm[k], k] for k in range(c)) for perm in itertools.permutations(range(c)))
    assert got == best


@pytest.mark.parametrize("seed", range(8))
def test_hungarian_iou_equals_best_permutation(seed):
    rng = np.random.default_rng(100 + seed)
    c = int(rng.integers(2, 6))
    conf = rng.integers(0, 50, size=(c, c)).astype(float)
    union = conf.sum(1, keepdims=True) + conf.sum(0, keepdims=True) - conf
    iou = conf / union
    mapping = hungarian(conf, "iou")
    got = sum(iou[mapping[k], k] for k in range(c))
    best = max(sum(iou[perm[k], k] for k in range(c)) for perm in itertools.permutations(range(c)))
    assert got == pytest.approx(best)


@pytest.mark.parametrize("seed", range(6))
def test_match_and_score_equals_brute_force_over_images(seed):
    """mIoU of the Hungarian-matched prediction = the best mIoU-by-pixels over all relabellings, scored on pixels."""
    rng = np.random.default_rng(seed)
    c = 4
    gt = rng.integers(0, c, size=(3, 12, 12))
    gt[:, :2] = 255
    perm = rng.permutation(c)
    pred = perm[gt.clip(0, c - 1)]
    noise = rng.random(gt.shape) < 0.3
    pred[noise] = rng.integers(0, c, size=noise.sum())
    conf = confusion(gt, pred, c, c)
    sc, mapping = match_and_score(conf, "hungarian-pixels")
    best = max(itertools.permutations(range(c)),
               key=lambda p: (np.asarray(p)[pred][gt != 255] == gt[gt != 255]).sum())
    miou, acc = _brute_scores(gt, np.asarray(best)[pred], c, 255)
    assert sc["pixel_acc"] == pytest.approx(acc)
    assert sc["miou"] == pytest.approx(miou)


def test_invariant_to_relabelling_clusters():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, size=(40, 40))
    pred = (gt + (rng.random(gt.shape) < 0.2)) % 7
    base = match_and_score(confusion(gt, pred, 5, 7), "hungarian-pixels")[0]
    for _ in range(5):
        relabel = rng.permutation(7)
        again = match_and_score(confusion(gt, relabel[pred], 5, 7), "hungarian-pixels")[0]
        assert again["miou"] == pytest.approx(base["miou"]) and again["pixel_acc"] == pytest.approx(base["pixel_acc"])


def test_many_to_one_hand_case():
    # rows gt 0..2, cols clusters 0..3
    conf = np.array([[5, 0, 1, 0],
                     [1, 3, 0, 0],
                     [0, 4, 9, 0]])
    np.testing.assert_array_equal(many_to_one(conf), [0, 2, 2, -1])
    folded = remap(conf, many_to_one(conf), 3)
    np.testing.assert_array_equal(folded, [[5, 0, 1, 0], [1, 0, 3, 0], [0, 0, 13, 0]])
    sc = scores(folded)
    # class 0: tp 5, fp 1, fn 1 → 5/7; class 1: tp 0 → 0; class 2: tp 13, fp 4, fn 0 → 13/17
    assert sc["per_class_iou"] == pytest.approx([5 / 7, 0.0, 13 / 17])
    assert sc["miou"] == pytest.approx((5 / 7 + 13 / 17) / 3)
    assert sc["pixel_acc"] == pytest.approx(18 / 23)


def test_unmatched_clusters_count_as_wrong():
    conf = np.array([[10, 0, 5], [0, 10, 0]])  # cluster 2 cannot be matched one-to-one
    sc, mapping = match_and_score(conf, "hungarian-pixels")
    assert mapping.tolist() == [0, 1, -1]
    assert sc["pixel_acc"] == pytest.approx(20 / 25)
    assert sc["per_class_iou"] == pytest.approx([10 / 15, 1.0])


def test_absent_class_is_excluded_from_mean():
    sc = scores(np.array([[4, 0, 0], [0, 0, 0], [1, 0, 5]]))
    assert sc["per_class_iou"][1] is None
    assert sc["miou"] == pytest.approx((4 / 5 + 5 / 6) / 2)


def test_confusion_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="outside"):
        confusion(np.array([0, 3]), np.array([0, 0]), 3, 2)


def _stats_from_labels(gts, preds, c):
    """Per-image [tp, fp, fn] computed directly from label arrays (independent of image_stats)."""
    out = np.zeros((len(gts), c, 3), dtype=np.int64)
    for i, (g, p) in enumerate(zip(gts, preds)):
        for k in range(c):
            out[i, k] = [((g == k) & (p == k)).sum(), ((g != k) & (p == k)).sum(), ((g == k) & (p != k)).sum()]
    return out


def test_image_stats_sum_to_dataset_scores():
    from ssl_segbench.metrics import image_stats, scores_from_stats

    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 3, size=(6, 6)) for _ in range(5)]
    preds = [(g + (rng.random(g.shape) < 0.3)) % 4 for g in gts]  # 4 clusters, one will be unmatched
    confs = [confusion(g, p, 3, 4) for g, p in zip(gts, preds)]
    sc, mapping = match_and_score(sum(confs), "hungarian-pixels")
    stats = image_stats(confs, mapping, 3)
    mapped = [np.where(mapping[p] < 0, 99, mapping[p]) for p in preds]
    np.testing.assert_array_equal(stats, _stats_from_labels(gts, mapped, 3))
    total = scores_from_stats(stats.sum(0))
    assert total["miou"] == pytest.approx(sc["miou"]) and total["pixel_acc"] == pytest.approx(sc["pixel_acc"])


def test_bootstrap_ci_matches_known_standard_error():
    """400 images of 100 pixels, half all-correct and half all-wrong: accuracy 0.5 with standard error
    0.5 / √400 = 0.025, so the 95% interval is 0.5 ± 1.96 · 0.025."""
    from ssl_segbench.metrics import bootstrap_ci

    stats = np.zeros((1, 400, 2, 3), dtype=np.int64)
    stats[0, :200, 0, 0] = 100  # correct: tp of class 0
    stats[0, 200:, 0, 2] = 100  # wrong: fn of class 0 ...
    stats[0, 200:, 1, 1] = 100  # ... predicted as class 1
    ci = bootstrap_ci(stats, n_boot=4000, seed=1)
    assert ci["pixel_acc"][0] == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006)
    assert ci["pixel_acc"][1] == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)


def test_paired_bootstrap_detects_real_differences_only():
    from ssl_segbench.metrics import paired_bootstrap

    rng = np.random.default_rng(3)
    gts = [rng.integers(0, 3, size=(8, 8)) for _ in range(60)]
    good = [np.where(rng.random(g.shape) < 0.9, g, (g + 1) % 3) for g in gts]
    bad = [np.where(rng.random(g.shape) < 0.6, g, (g + 1) % 3) for g in gts]
    sa, sb = _stats_from_labels(gts, good, 3)[None], _stats_from_labels(gts, bad, 3)[None]
    res = paired_bootstrap(sa, sb, n_boot=1000)
    assert res["miou"]["delta"] > 0.2 and res["miou"]["p"] < 0.01 and res["miou"]["ci"][0] > 0
    same = paired_bootstrap(sa, sa, n_boot=200)
    assert same["miou"]["delta"] == 0 and same["miou"]["p"] == 1.0
    assert (res["per_class_iou"]["p"] < 0.01).all()
