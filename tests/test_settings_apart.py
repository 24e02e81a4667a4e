"""Settings that must change the answer: small hand-computed cases where the matching (Hungarian on pixels vs on
IoU, many-to-one), the upsampling (nearest vs bilinear), the co-occurrence graph threshold / isolated-cluster policy
of leopart-cd, and the linear probe's order of upsampling and classification each give a different, known number.

Expected values are worked out by hand (exact fractions) or by independent brute-force references written here; the
code under test never produces its own expected value."""
from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_segbench.metrics import confusion, hungarian, many_to_one, match_and_score, remap, scores
from ssl_segbench.protocols.base import scores_to_labels
from ssl_segbench.protocols.leopart_cd import ANGLES, communities, cooccurrence_matrix, graph_edges
from ssl_segbench.protocols.training import conv_head_scorer


def _labels(scores, size, upsample):
    """One image's (K, h, w) scores → (H, W) labels through the batched rule under test."""
    return scores_to_labels(scores[None], tuple(size), upsample)[0].numpy()


# --- independent references ----------------------------------------------------------------------------------------


def ref_scores(conf: np.ndarray, mapping) -> dict:
    """mIoU, pixel accuracy and per-class IoU (Fractions) of a cluster → class map, straight from the definitions:
    tp_c = pixels of class c in clusters mapped to c, fp_c = other classes' pixels in those clusters, fn_c = class c's
    pixels anywhere else (unmatched clusters included); classes with tp + fp + fn = 0 are left out of the mean."""
    conf = np.asarray(conf)
    n_cls = conf.shape[0]
    ious = []
    correct = 0
    for c in range(n_cls):
        cols = [k for k, m in enumerate(mapping) if m == c]
        tp = int(conf[c, cols].sum())
        fp = int(conf[:, cols].sum()) - tp
        fn = int(conf[c].sum()) - tp
        correct += tp
        ious.append(Fraction(tp, tp + fp + fn) if tp + fp + fn else None)
    present = [v for v in ious if v is not None]
    return {"miou": sum(present) / len(present), "pixel_acc": Fraction(correct, int(conf.sum())),
            "per_class_iou": ious}


def one_to_one_maps(n_cls: int, n_clusters: int):
    """Every injective cluster → class map (as in Hungarian: min(C, K) pairs, the rest of the clusters -1)."""
    if n_clusters >= n_cls:
        for chosen in itertools.permutations(range(n_clusters), n_cls):  # chosen[c] = cluster of class c
            mapping = [-1] * n_clusters
            for c, k in enumerate(chosen):
                mapping[k] = c
            yield mapping
    else:
        for chosen in itertools.permutations(range(n_cls), n_clusters):  # chosen[k] = class of cluster k
            yield list(chosen)


def objective(conf: np.ndarray, mapping, kind: str) -> Fraction:
    """Matched pixels ('pixels') or summed IoU of the matched (class, cluster) pairs ('iou'), exactly."""
    total = Fraction(0)
    for k, c in enumerate(mapping):
        if c < 0:
            continue
        tp = int(conf[c, k])
        if kind == "pixels":
            total += tp
        else:
            union = int(conf[c].sum() + conf[:, k].sum()) - tp
            total += Fraction(tp, union) if union else 0
    return total


def brute_force_best(conf: np.ndarray, kind: str) -> tuple[Fraction, list[list[int]]]:
    """Best objective over all one-to-one maps, and every map reaching it."""
    values = [(objective(conf, m, kind), m) for m in one_to_one_maps(*conf.shape)]
    best = max(v for v, _ in values)
    return best, [m for v, m in values if v == best]


# --- 1. Hungarian on pixels vs Hungarian on IoU --------------------------------------------------------------------


def test_hungarian_pixels_and_iou_choose_different_maps_and_miou():
    """A 2×2 confusion (rows classes, columns clusters) on which the two Hungarian objectives disagree.

    conf = [[5, 10], [0, 4]]: class totals 15, 4; cluster totals 5, 14; 19 pixels.
    - identity (cluster 0 → class 0, 1 → 1): 9 matched pixels; IoU_0 = 5 / (15 + 5 - 5) = 1/3,
      IoU_1 = 4 / (4 + 14 - 4) = 2/7, summed IoU 13/21.
    - swap (cluster 0 → class 1, 1 → 0): 10 matched pixels; IoU_0 = 10 / (15 + 14 - 10) = 10/19,
      IoU_1 = 0 / (4 + 5) = 0, summed IoU 10/19 < 13/21.
    So 'pixels' picks the swap (mIoU 5/19, accuracy 10/19) and 'iou' the identity (mIoU 13/42, accuracy 9/19):
    more pixels, lower mIoU. The hand values are also checked against a brute force over both permutations."""
    conf = np.array([[5, 10], [0, 4]])
    assert hungarian(conf, "pixels").tolist() == [1, 0]
    assert hungarian(conf, "iou").tolist() == [0, 1]

    sc_pix, map_pix = match_and_score(conf, "hungarian-pixels")
    sc_iou, map_iou = match_and_score(conf, "hungarian-iou")
    assert map_pix.tolist() == [1, 0] and map_iou.tolist() == [0, 1]
    assert sc_pix["miou"] == pytest.approx(5 / 19)
    assert sc_pix["pixel_acc"] == pytest.approx(10 / 19)
    assert sc_pix["per_class_iou"] == pytest.approx([10 / 19, 0.0])
    assert sc_iou["miou"] == pytest.approx(13 / 42)
    assert sc_iou["pixel_acc"] == pytest.approx(9 / 19)
    assert sc_iou["per_class_iou"] == pytest.approx([1 / 3, 2 / 7])
    assert sc_pix["miou"] < sc_iou["miou"] and sc_pix["pixel_acc"] > sc_iou["pixel_acc"]

    # brute force: the same optima and the same exact scores
    best_pix, maps_pix = brute_force_best(conf, "pixels")
    best_iou, maps_iou = brute_force_best(conf, "iou")
    assert (best_pix, maps_pix) == (10, [[1, 0]])
    assert (best_iou, maps_iou) == (Fraction(13, 21), [[0, 1]])
    assert ref_scores(conf, [1, 0])["miou"] == Fraction(5, 19)
    assert ref_scores(conf, [0, 1])["miou"] == Fraction(13, 42)


@pytest.mark.parametrize("shape", [(3, 3), (3, 4), (4, 3), (2, 5)])
def test_hungarian_matches_brute_force_on_random_confusions(shape):
    """On random small confusions (square, more clusters than classes, fewer), each Hungarian objective reaches the
    brute-force optimum over all one-to-one maps, and match_and_score's numbers equal the reference scoring of the
    returned map from the definitions (unmatched clusters' pixels counted as false negatives only)."""
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        conf = rng.integers(0, 12, size=shape)
        for kind, matching in (("pixels", "hungarian-pixels"), ("iou", "hungarian-iou")):
            sc, mapping = match_and_score(conf, matching)
            assert sorted(m for m in mapping.tolist() if m >= 0) == sorted(set(m for m in mapping if m >= 0))
            best, _ = brute_force_best(conf, kind)
            assert objective(conf, mapping.tolist(), kind) == best
            ref = ref_scores(conf, mapping.tolist())
            assert sc["miou"] == pytest.approx(float(ref["miou"]))
            assert sc["pixel_acc"] == pytest.approx(float(ref["pixel_acc"]))


# --- 2. many-to-one -------------------------------------------------------------------------------------------------


def test_many_to_one_majority_class_by_hand():
    """Overclustering, C = 3 classes, K = 5 clusters (columns):
    k0 = [8, 1, 0] → class 0, k1 = [1, 6, 0] → 1, k2 = [4, 0, 3] → 0 (its majority, although Hungarian gives it class
    2: class 0 is taken by k0 and k2 holds the most class-2 pixels), k3 = [0, 2, 1] → 1, k4 = [0, 0, 0] (only ignore
    pixels) → -1. Class totals 13, 9, 4; 26 pixels.
    many-to-one: class 0 = k0 + k2: tp 12, fp 4, fn 1 → 12/17; class 1 = k1 + k3: tp 8, fp 2, fn 1 → 8/11;
    class 2 gets no cluster: tp 0, fn 4 → 0. mIoU (12/17 + 8/11) / 3 = 268/561, accuracy 20/26 = 10/13.
    Hungarian on pixels ([0, 1, 2, -1, -1], 17 pixels, best by brute force): 8/14, 6/10, 3/8 → mIoU 433/840,
    accuracy 17/26 (k3's pixels count as false negatives)."""
    conf = np.array([[8, 1, 4, 0, 0],
                     [1, 6, 0, 2, 0],
                     [0, 0, 3, 1, 0]])
    # the same matrix from pixels: cluster 4 is predicted only where the ground truth is ignore (255)
    gt = np.concatenate([np.repeat(np.repeat(np.arange(3), 5), conf.ravel()), [255, 255, 255]])
    pred = np.concatenate([np.repeat(np.tile(np.arange(5), 3), conf.ravel()), [4, 4, 4]])
    np.testing.assert_array_equal(confusion(gt, pred, 3, 5, ignore_index=255), conf)

    assert many_to_one(conf).tolist() == [0, 1, 0, 1, -1]
    sc, mapping = match_and_score(conf, "many-to-one")
    assert mapping.tolist() == [0, 1, 0, 1, -1]
    assert sc["per_class_iou"] == pytest.approx([12 / 17, 8 / 11, 0.0])
    assert sc["miou"] == pytest.approx(268 / 561)
    assert sc["pixel_acc"] == pytest.approx(10 / 13)
    ref = ref_scores(conf, [0, 1, 0, 1, -1])
    assert ref["per_class_iou"] == [Fraction(12, 17), Fraction(8, 11), Fraction(0)]
    assert ref["miou"] == Fraction(268, 561) and ref["pixel_acc"] == Fraction(10, 13)

    # the cluster whose majority class is not the class Hungarian gives it
    best, maps = brute_force_best(conf, "pixels")
    assert (best, maps) == (17, [[0, 1, 2, -1, -1]])
    assert hungarian(conf, "pixels").tolist() == [0, 1, 2, -1, -1]
    sc_h, _ = match_and_score(conf, "hungarian-pixels")
    assert sc_h["per_class_iou"] == pytest.approx([4 / 7, 3 / 5, 3 / 8])
    assert sc_h["miou"] == pytest.approx(433 / 840)
    assert sc_h["pixel_acc"] == pytest.approx(17 / 26)
    # remap folds many-to-one into class space by hand: columns k0 + k2, k1 + k3, nothing, unmatched (k4, empty)
    np.testing.assert_array_equal(remap(conf, mapping, 3), [[12, 1, 0, 0], [1, 8, 0, 0], [3, 1, 0, 0]])
    assert scores(remap(conf, mapping, 3))["miou"] == pytest.approx(268 / 561)


# --- 3. nearest vs bilinear upsampling ------------------------------------------------------------------------------


def _nearest_vs_bilinear_case():
    """K = 2 scores on a 2×2 grid: class 0 minus class 1 is d = [[0.5, -1], [-1, -1]] (class 1's score is 0)."""
    d = torch.tensor([[0.5, -1.0], [-1.0, -1.0]])
    return torch.stack([d, torch.zeros(2, 2)])


def test_nearest_and_bilinear_upsampling_give_different_labels():
    """2×2 → 4×4. With align_corners=False, output index x maps to source (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75,
    1.25, i.e. per-axis weights on (token 0, token 1) of (1, 0), (3/4, 1/4), (1/4, 3/4), (0, 1) (clamped at the
    edges). The score difference d is linear in the scores, so at output (1, 1):
    9/16 · 0.5 + 3/16 · (-1) + 3/16 · (-1) + 1/16 · (-1) = 0.28125 - 0.4375 = -0.15625 < 0 → class 1, while at (0, 1)
    and (1, 0): 3/4 · 0.5 + 1/4 · (-1) = 0.125 > 0 → class 0; every pixel farther from token (0, 0) is negative.
    'nearest' takes the argmax per token (only token (0, 0) is class 0) and copies it to a 2×2 block."""
    s = _nearest_vs_bilinear_case()
    up = F.interpolate(s[None], size=(4, 4), mode="bilinear", align_corners=False)[0]
    assert float(up[0, 1, 1] - up[1, 1, 1]) == pytest.approx(-0.15625)
    assert float(up[0, 0, 1] - up[1, 0, 1]) == pytest.approx(0.125)

    bilinear = np.array([[0, 0, 1, 1],
                         [0, 1, 1, 1],
                         [1, 1, 1, 1],
                         [1, 1, 1, 1]])
    nearest = np.array([[0, 0, 1, 1],
                        [0, 0, 1, 1],
                        [1, 1, 1, 1],
                        [1, 1, 1, 1]])
    np.testing.assert_array_equal(_labels(s, (4, 4), "bilinear"), bilinear)
    np.testing.assert_array_equal(_labels(s, (4, 4), "nearest"), nearest)


def test_upsampling_choice_changes_the_score():
    """Ground truth: the nearest pattern, but (0, 1) is class 1 and (3, 3) is ignore (15 labelled pixels).
    nearest: wrong only at (0, 1) → accuracy 14/15; class 0: tp 3, fp 1, fn 0 → 3/4; class 1: tp 11, fp 0, fn 1 →
    11/12; mIoU 5/6. bilinear: wrong at (0, 1) and (1, 1) → accuracy 13/15; class 0: tp 2, fp 1, fn 1 → 1/2;
    class 1: tp 11, fp 1, fn 1 → 11/13; mIoU (1/2 + 11/13) / 2 = 35/52."""
    s = _nearest_vs_bilinear_case()
    gt = np.array([[0, 1, 1, 1],
                   [0, 0, 1, 1],
                   [1, 1, 1, 1],
                   [1, 1, 1, 255]])
    expected = {"nearest": (14 / 15, 5 / 6, [3 / 4, 11 / 12]), "bilinear": (13 / 15, 35 / 52, [1 / 2, 11 / 13])}
    for upsample, (acc, miou, per_class) in expected.items():
        pred = _labels(s, gt.shape, upsample)
        sc, mapping = match_and_score(confusion(gt, pred, 2, 2, ignore_index=255), "identity")
        assert mapping.tolist() == [0, 1]
        assert sc["pixel_acc"] == pytest.approx(acc), upsample
        assert sc["miou"] == pytest.approx(miou), upsample
        assert sc["per_class_iou"] == pytest.approx(per_class), upsample


# --- 4. leopart-cd co-occurrence graph and community detection ------------------------------------------------------


def brute_pairs(m: np.ndarray, offset: tuple[int, int], levels: int) -> np.ndarray:
    """counts[i, j] = pixels p with m[p] = i and m[p + offset] = j, p + offset inside the image."""
    out = np.zeros((levels, levels), dtype=np.int64)
    dr, dc = offset
    h, w = m.shape
    for r in range(h):
        for c in range(w):
            if 0 <= r + dr < h and 0 <= c + dc < w:
                out[m[r, c], m[r + dr, c + dc]] += 1
    return out


def brute_offset(d: int, theta: float) -> tuple[int, int]:
    return int(round(d * np.sin(theta))), int(round(d * np.cos(theta)))


def brute_cooccurrence(maps: list[np.ndarray], levels: int, distances=(1, 2)) -> np.ndarray:
    """PROTOCOLS.md §4 step 5 from its definition, with plain loops."""
    total = np.zeros((levels, levels))
    images_with = np.zeros(levels)
    for m in maps:
        counts = sum(brute_pairs(m, brute_offset(d, i * np.pi / 4), levels) for d in distances for i in range(8))
        counts = counts.astype(float)
        for i in range(levels):
            counts[i, i] = 0
            if counts[i].sum() > 0:
                total[i] += counts[i] / counts[i].sum()
        for i in set(np.asarray(m).ravel().tolist()):
            images_with[i] += 1
    for i in range(levels):
        if images_with[i]:
            total[i] /= images_with[i]
    return total


def test_brute_force_neighbour_count_agrees_with_graycomatrix():
    """The brute-force offset convention reproduces skimage's graycomatrix for every (distance, angle) used. Per angle
    skimage's sign convention only transposes the counts (offset o vs -o), so either is accepted there; over all
    8 angles (closed under negation) the sum is convention-free and must match exactly."""
    from skimage.feature import graycomatrix

    assert ANGLES == pytest.approx([i * np.pi / 4 for i in range(8)])
    rng = np.random.default_rng(3)
    m = rng.integers(0, 4, size=(5, 7))
    g = graycomatrix(m.astype(np.uint8), distances=[1, 2], angles=list(ANGLES), levels=4)
    total = np.zeros((4, 4), dtype=np.int64)
    for di, d in enumerate((1, 2)):
        for ai in range(8):
            b = brute_pairs(m, brute_offset(d, ANGLES[ai]), 4)
            assert np.array_equal(g[:, :, di, ai], b) or np.array_equal(g[:, :, di, ai], b.T), (d, ai)
            total += b
    np.testing.assert_array_equal(g.sum(axis=(2, 3)), total)


def test_cooccurrence_matrix_matches_brute_force_on_random_maps():
    """cooccurrence_matrix equals the loop reference on random maps (several clusters per image, so the per-image row
    normalisation and the division by images containing each cluster are non-trivial), also with distances (1,)."""
    rng = np.random.default_rng(5)
    maps = [rng.integers(0, 5, size=(6, 6)), rng.integers(0, 3, size=(4, 5)), np.full((3, 3), 4),
            np.kron(rng.integers(1, 4, size=(3, 3)), np.ones((2, 2), dtype=int))]
    np.testing.assert_allclose(cooccurrence_matrix(maps, 6), brute_cooccurrence(maps, 6), atol=1e-12)
    np.testing.assert_allclose(cooccurrence_matrix(maps, 6, (1,)), brute_cooccurrence(maps, 6, (1,)), atol=1e-12)


def _planted_maps(extra_isolated: bool = False) -> list[np.ndarray]:
    """6×6 cluster maps: {0, 1} touch in two images, {2, 3} in one, the groups never share an image; 0, 3 and 4
    (and 5) also fill images alone."""
    a = np.zeros((6, 6), dtype=int)
    a[:, 3:] = 1  # 0 | 1 side by side
    a2 = np.ones((6, 6), dtype=int)
    a2[4:] = 0  # 1 above 0
    b = np.full((6, 6), 2)
    b[3:] = 3  # 2 above 3
    maps = [a, a2, np.zeros((6, 6), dtype=int), b, np.full((6, 6), 3), np.full((6, 6), 4)]
    if extra_isolated:
        maps.append(np.full((6, 6), 5))
    return maps


def test_cooccurrence_graph_and_communities_with_known_merge():
    """Hand count for the 0 | 1 image (columns 0-2 are 0, 3-5 are 1): the offsets of distances (1, 2) × 8 angles are
    (0, ±1), (0, ±2), (±1, 0), (±2, 0) once and the diagonals (±1, ±1) twice (2·cos π/4 rounds to 1). Pairs 0 → 1:
    (0, +1) from column 2: 6; (0, +2) from columns 1, 2: 12; (±1, +1) from column 2: 5 rows each, twice: 20; total 38.
    Each image holds one pair of clusters, so its normalised rows are 1 on the partner; dividing by the images that
    contain each cluster (0: 3, 1: 2, 2: 1, 3: 2, 4: 1): a01 = 2/3, a10 = 1, a23 = 1, a32 = 1/2, all else 0.
    Edges at threshold 0.4: (0, 1, 2/3) and (2, 3, 1/2); at 0.6 the (2, 3) edge goes (a32 = 1/2 < 0.6). Infomap
    merges each connected pair: [0, 0, 1, 1, 2]; with the threshold 0.6 only {0, 1} merge: [0, 0, 1, 2, 3]."""
    maps = _planted_maps()
    assert int(brute_pairs(maps[0], (0, 1), 2)[0, 1]) == 6
    assert int(sum(brute_pairs(maps[0], brute_offset(d, i * np.pi / 4), 2)[0, 1]
                   for d in (1, 2) for i in range(8))) == 38

    a = cooccurrence_matrix(maps, 5)
    expected = np.zeros((5, 5))
    expected[0, 1], expected[1, 0], expected[2, 3], expected[3, 2] = 2 / 3, 1.0, 1.0, 1 / 2
    np.testing.assert_allclose(a, expected, atol=1e-12)
    np.testing.assert_allclose(brute_cooccurrence(maps, 5), expected, atol=1e-12)

    edges = graph_edges(a, 0.4)
    assert [(s, t) for s, t, _ in edges] == [(0, 1), (2, 3)]
    assert [w for *_, w in edges] == pytest.approx([2 / 3, 1 / 2])
    merged = communities(edges, 5, markov_time=1.0, preferred_modules=2, seed=1)
    assert merged.tolist() == [0, 0, 1, 1, 2]

    strict = graph_edges(a, 0.6)
    assert [(s, t) for s, t, _ in strict] == [(0, 1)]
    assert communities(strict, 5, markov_time=1.0, preferred_modules=2, seed=1).tolist() == [0, 0, 1, 2, 3]


def test_isolated_clusters_own_or_shared_label():
    """A second isolated cluster (5, alone in its own image): the graph is unchanged (its row and column are 0), and
    the isolated-cluster policy alone decides whether 4 and 5 merge: own labels [0, 0, 1, 1, 2, 3] vs shared
    [0, 0, 1, 1, 2, 2] (labels numbered by the smallest node they contain)."""
    maps = _planted_maps(extra_isolated=True)
    a = cooccurrence_matrix(maps, 6)
    assert not a[4].any() and not a[:, 4].any() and not a[5].any() and not a[:, 5].any()
    edges = graph_edges(a, 0.4)
    assert [(s, t) for s, t, _ in edges] == [(0, 1), (2, 3)]
    own = communities(edges, 6, markov_time=1.0, preferred_modules=2, seed=1, shared_isolated=False)
    shared = communities(edges, 6, markov_time=1.0, preferred_modules=2, seed=1, shared_isolated=True)
    assert own.tolist() == [0, 0, 1, 1, 2, 3]
    assert shared.tolist() == [0, 0, 1, 1, 2, 2]


# --- 5. linear probe: logits then upsample == upsample tokens then 1×1 conv -----------------------------------------


def test_linear_probe_logits_then_upsample_equals_upsample_then_classify():
    """A 1×1 convolution is affine per pixel and bilinear weights sum to 1, so upsampling the logits equals classifying
    the upsampled tokens (checked in float64 to 1e-10 and float32 to 1e-5). Through the package, the scorer + bilinear
    scores_to_labels must equal the argmax of head(upsampled tokens) at every pixel (the reference's top-two margin is
    checked to exceed float32 noise, so no tie decides it); nearest upsampling of the token-level argmax differs on
    this data, so the test would catch upsampling the wrong thing."""
    torch.manual_seed(2)  # chosen so the reference's smallest top-two margin is 7.6e-3
    d, c, h, w, size = 8, 4, 3, 3, (10, 10)
    head = torch.nn.Conv2d(d, c, kernel_size=1)
    tokens = torch.randn(1, d, h, w)

    def up(t):
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

    with torch.no_grad():
        head64, x64 = torch.nn.Conv2d(d, c, kernel_size=1).double(), tokens.double()
        head64.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
        reference = head64(up(x64))[0]  # (C, H, W): upsample tokens, then classify
        torch.testing.assert_close(up(head64(x64)), head64(up(x64)), rtol=0, atol=1e-10)
        torch.testing.assert_close(up(head(tokens)), head(up(tokens)), rtol=0, atol=1e-5)

    top2 = reference.topk(2, dim=0).values
    assert float((top2[0] - top2[1]).min()) > 1e-3
    expected = reference.argmax(0).numpy()
    assert len(np.unique(expected)) > 1

    tokens_hwd = tokens[0].permute(1, 2, 0).numpy().copy()  # (h, w, D) float32, as the feature cache stores them
    logits = conv_head_scorer(head)(torch.from_numpy(tokens_hwd)[None])[0]
    assert tuple(logits.shape) == (c, h, w)
    np.testing.assert_array_equal(_labels(logits, size, "bilinear"), expected)
    nearest = _labels(logits, size, "nearest")
    assert (nearest != expected).sum() > 0
