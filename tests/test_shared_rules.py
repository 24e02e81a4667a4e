"""The rules that several protocols share, each now one function, against hand-computed answers: the 'auto' matching
rule (fs4, datus, maskdistill), row subsampling (k-means fits, torch k-means), nearest upsampling (Leopart's maps,
evaluation labels) and input normalisation (evaluation transform, linear-probe crops, maskdistill crops)."""
import numpy as np
import pytest
from PIL import Image

from ssl_segbench.cluster import subsample_rows
from ssl_segbench.protocols.base import auto_matching, eval_labels, upsample_nearest
from ssl_segbench.transforms import normalise


@pytest.mark.parametrize("matching, k, classes, expected", [
    ("auto", 5, 5, "hungarian-pixels"), ("auto", 6, 5, "many-to-one"), ("auto", 2, 5, "hungarian-pixels"),
    ("hungarian-iou", 9, 5, "hungarian-iou"), ("many-to-one", 3, 5, "many-to-one"),
])
def test_auto_matching_is_one_to_one_only_while_the_clusters_fit_the_classes(matching, k, classes, expected):
    assert auto_matching(matching, k, classes) == expected


def test_auto_matching_names_the_one_to_one_rule_of_the_caller():  # maskdistill: its own name, background excluded
    assert auto_matching("auto", 20, 21 - 1, "hungarian") == "hungarian"
    assert auto_matching("auto", 21, 21 - 1, "hungarian") == "many-to-one"


def test_subsample_rows_keeps_all_or_a_sorted_uniform_draw():
    x = np.arange(100)[:, None] * np.ones((1, 3))
    assert subsample_rows(x, None) is x and subsample_rows(x, 100) is x
    rows = subsample_rows(x, 10, 7)[:, 0].astype(int)
    assert len(set(rows)) == 10 and list(rows) == sorted(rows)
    assert list(rows) == sorted(np.random.default_rng(7).choice(100, size=10, replace=False))
    rng = np.random.default_rng(7)  # a Generator is used and advanced, as torch k-means needs
    assert np.array_equal(subsample_rows(x, 10, rng), x[rows]) and rng.random() == _after_one_draw(7)


def _after_one_draw(seed):
    rng = np.random.default_rng(seed)
    rng.choice(100, size=10, replace=False)
    return rng.random()


def test_upsample_nearest_repeats_cells_by_torchs_rule():
    grid = np.array([[1, 2], [3, 4]], dtype=np.int32)
    assert np.array_equal(upsample_nearest(grid, (4, 4)), np.repeat(np.repeat(grid, 2, 0), 2, 1))
    # 2 → 3: source index floor(i * 2 / 3) = 0, 0, 1
    assert upsample_nearest(grid, (3, 3)).tolist() == [[1, 1, 2], [1, 1, 2], [3, 3, 4]]
    assert upsample_nearest(grid, (3, 3)).dtype == np.int32 and upsample_nearest(grid, (2, 2)) is grid
    labels = np.array([[255, 0], [7, -1]], dtype=np.int64)
    assert eval_labels(labels, 4).tolist() == np.repeat(np.repeat(labels, 2, 0), 2, 1).tolist()
    assert eval_labels(labels, None) is labels


def test_normalise_is_pixel_over_255_minus_mean_over_std_per_channel():
    img = Image.fromarray(np.array([[[255, 0, 51]], [[0, 255, 102]]], dtype=np.uint8))  # 2 × 1 pixels
    t = normalise(img, (0.5, 0.0, 0.2), (0.5, 1.0, 0.1))
    assert t.shape == (3, 2, 1) and str(t.dtype) == "torch.float32"
    np.testing.assert_allclose(t[:, 0, 0].numpy(), [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(t[:, 1, 0].numpy(), [-1.0, 1.0, 2.0], atol=1e-6)
