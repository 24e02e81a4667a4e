"""The shared real DINOv2 ViT-S/14 on the real SUIM sample (skipped when ../shared is absent)."""
from __future__ import annotations

import pytest

from ssl_segbench.cli import main
from ssl_segbench.records import iter_records


@pytest.mark.slow
def test_dinov2_on_suim_sample_kmeans_then_linear_reuses_features(shared, tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))  # a cold cache of its own
    args = ["run", "--backbone", str(shared / "models" / "dinov2-small-imgfocus"), "--dataset", "suim",
            "--data-root", str(shared / "data" / "suim_sample"), "--results-dir", str(tmp_path / "res")]
    assert main([*args, "--protocol", "kmeans"]) == 0
    assert main([*args, "--protocol", "linear", "--param", "linear.epochs=5"]) == 0
    recs = {r.protocol["name"]: r for _, r in iter_records(tmp_path / "res")}
    km, lin = recs["kmeans"], recs["linear"]
    assert km.provenance["cache_hit"] is False and lin.provenance["cache_hit"] is True
    assert "same images" in lin.info["train_split"]
    assert km.backbone["num_prefix_tokens"] == 1 and km.backbone["patch_size"] == 14
    assert km.dataset["n_images"] == 8
    # real features separate underwater classes far better than chance (1/8 of pixels per class on average)
    assert km.metrics["pixel_acc"]["mean"] > 0.35
