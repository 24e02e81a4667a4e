"""Dense CRF: moves labels to image edges, the pool equals the serial call and ends a hung task cleanly, a missing
package is a clear error, and `crf=true` reaches every protocol through the shared scoring path."""
from __future__ import annotations

import json
import multiprocessing
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_segbench.crf import CRFError, CRFParams, CRFTimeoutError, crf_refine, pool_map, refine_scores, upsample


def _needs_crf():
    pytest.importorskip("pydensecrf.densecrf", reason="the optional crf extra (pydensecrf2) is not installed")


def _two_regions(h=48, w=64, edge=32):
    """Two flat colours meeting at column `edge`; the true labels follow the colours."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:, :edge] = (200, 40, 40)
    img[:, edge:] = (30, 60, 210)
    truth = np.zeros((h, w), dtype=np.int64)
    truth[:, edge:] = 1
    return img, truth


def test_crf_moves_labels_to_the_image_edge():
    _needs_crf()
    img, truth = _two_regions()
    rng = np.random.default_rng(0)
    h, w = truth.shape
    # a soft boundary in the wrong place (column 24 instead of 32) plus per-pixel noise: noisy but informative
    logit = (np.arange(w)[None, :] - 24.0) / 6.0 + rng.normal(0, 0.8, size=(h, w))
    p1 = 1 / (1 + np.exp(-logit))
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    before = (probs.argmax(0) != truth).mean()
    after = (crf_refine(img, probs) != truth).mean()
    assert before > 0.1
    assert after < 0.25 * before


def test_crf_params_from_the_protocol_parameter():
    assert CRFParams.from_param(False) is None and CRFParams.from_param(None) is None
    assert CRFParams.from_param(True) == CRFParams(10, 1.0, 3.0, 67.0, 3.0, 4.0)
    assert CRFParams.from_param({"iterations": 5}).iterations == 5
    with pytest.raises(CRFError, match="unknown field"):
        CRFParams.from_param({"iters": 5})


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_numpy_upsampling_equals_torch(mode):
    x = np.random.default_rng(1).normal(size=(3, 5, 7)).astype(np.float32)
    for size in [(40, 56), (37, 121), (5, 7), (3, 2)]:
        kw = {"align_corners": False} if mode == "bilinear" else {}
        ref = F.interpolate(torch.from_numpy(x)[None], size=size, mode=mode, **kw)[0].numpy()
        np.testing.assert_allclose(upsample(x, size, mode), ref, atol=1e-5)


def test_pool_returns_what_the_serial_call_returns():
    _needs_crf()
    rng = np.random.default_rng(2)
    tasks = []
    for _ in range(4):
        img = rng.integers(0, 255, size=(24, 32, 3), dtype=np.uint8)
        tasks.append((img, rng.normal(size=(3, 3, 4)).astype(np.float32), "bilinear", CRFParams()))
    serial = [refine_scores(*t) for t in tasks]
    pooled = list(pool_map(refine_scores, tasks, workers=2, timeout=120))
    inline = list(pool_map(refine_scores, tasks, workers=0))
    assert all(np.array_equal(a, b) for a, b in zip(serial, pooled))
    assert all(np.array_equal(a, b) for a, b in zip(serial, inline))


def test_pool_times_out_cleanly_on_a_hung_task():
    before = {p.pid for p in multiprocessing.active_children()}
    t0 = time.monotonic()
    results = []
    with pytest.raises(CRFTimeoutError, match="did not finish within 2 s.*SSL_SEGBENCH_CRF_TIMEOUT"):
        for r in pool_map(time.sleep, [(0.0,), (600.0,), (0.0,)], workers=1, timeout=2):
            results.append(r)
    assert results == [None]  # the first task's result came back before the hang was detected
    assert time.monotonic() - t0 < 60
    time.sleep(0.2)
    left = {p.pid for p in multiprocessing.active_children()} - before
    assert not left, f"worker processes left running: {left}"


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    img, truth = _two_regions(8, 8, 4)
    with pytest.raises(CRFError, match=r"pip install 'ssl-segbench\[crf\]'"):
        crf_refine(img, np.ones((2, 8, 8), dtype=np.float32) / 2)

    from ssl_segbench.protocols import Context, ProtocolError, get_protocol

    ctx = Context(eval_set=None, train_set=None, features=lambda ds, f: pytest.fail("no work before the check"),
                  seeds=[0])
    with pytest.raises(ProtocolError, match="pydensecrf2"):
        get_protocol("kmeans", crf=True).run(ctx)


def test_crf_flag_reaches_kmeans_through_the_shared_path(small_synthetic, tmp_path):
    _needs_crf()
    from ssl_segbench.cli import main
    from ssl_segbench.records import iter_records

    def run(*extra):
        return main(["run", "--backbone", "pixels", "--dataset", "synthetic", "--data-root", str(small_synthetic),
                     "--size", "64", "--protocol", "kmeans", "--seeds", "1", "--results-dir", str(tmp_path / "res"),
                     *extra])

    assert run() == 0
    assert run("--param", "kmeans.crf=true") == 0
    recs = [r for _, r in iter_records(tmp_path / "res")]
    assert sorted(bool(r.protocol["params"]["crf"]) for r in recs) == [False, True]  # two rows, never mixed
    crf_rec = next(r for r in recs if r.protocol["params"]["crf"])
    assert crf_rec.info["crf"]["images_refined"] == 8 and crf_rec.info["crf"]["iterations"] == 10
    json.dumps(crf_rec.to_json())
