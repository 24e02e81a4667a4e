"""The whole protocol suite costs one backbone pass over the evaluation images (plus one batched pass over the crops
DatUS² and MaskDistill embed), counted by instrumenting the backbone; an identical second invocation with
`--overwrite always` runs the backbone not at all, and every record says which passes it relied on."""
from __future__ import annotations

import collections

import pytest

import ssl_segbench.backbones.hf_backbone as hf_backbone
import ssl_segbench.backbones.timm_backbone as timm_backbone
from ssl_segbench.cli import main
from ssl_segbench.records import iter_records

SUITE = "kmeans,linear,overcluster,leopart-cd,datus,maskdistill"
SMALL = ["--param", "overcluster.k=100", "--param", "leopart-cd.cbfe_k=50", "--param", "leopart-cd.k=20"]


@pytest.fixture
def forwards(monkeypatch):
    """Images fed to the backbone, by (facets, input height × width)."""
    seen = collections.Counter()
    for cls in (hf_backbone.HFBackbone, timm_backbone.TimmBackbone):
        real = cls._forward

        def counted(self, images, layer, facets, real=real):
            seen[(tuple(facets), tuple(images.shape[2:]))] += images.shape[0]
            return real(self, images, layer, facets)

        monkeypatch.setattr(cls, "_forward", counted)
    return seen


def _suite(tmp_path, backbone, dataset, root, *extra):
    return main(["run", "--backbone", str(backbone), "--dataset", dataset, "--data-root", str(root),
                 "--protocol", SUITE, *SMALL, "--results-dir", str(tmp_path / "res"), "--overwrite", "always",
                 *extra])


def _check_one_pass(tmp_path, forwards, n_images, size):
    main_pass = {k: v for k, v in forwards.items() if "tokens" in k[0]}
    assert main_pass == {(("attn", "keys", "tokens"), (size, size)): n_images}, forwards  # every image once
    recs = {r.protocol["name"]: r for _, r in iter_records(tmp_path / "res")}
    crops = recs["datus"].info["segment_embeddings"]["crops"] + sum(recs["maskdistill"].info["n_masks"].values())
    crop_calls = sum(v for k, v in forwards.items() if k[0] == ("cls",))
    assert crop_calls == crops  # every crop once
    assert set(forwards) <= set(main_pass) | {k for k in forwards if k[0] in (("cls",), ("attn",))}
    for r in recs.values():  # the shared pass computed what each record reads, in this invocation
        features = [p for p in r.provenance["passes"] if p["kind"] == "features"]
        assert features and all(p["computed"] for p in features) and not r.provenance["cache_hit"]
    return recs


@pytest.mark.slow
def test_the_suite_is_one_pass_on_the_suim_sample(shared, tmp_path, forwards, monkeypatch):
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    args = (shared / "models" / "dinov2-small-imgfocus", "suim", shared / "data" / "suim_sample")
    assert _suite(tmp_path, *args) == 0
    first = _check_one_pass(tmp_path, forwards, 8, 224)
    forwards.clear()
    assert _suite(tmp_path, *args) == 0
    assert not forwards  # nothing ran: features, crop embeddings and masks all from the cache
    again = {r.protocol["name"]: r for _, r in iter_records(tmp_path / "res")}
    assert all(r.provenance["cache_hit"] for r in again.values())
    assert {n: r.per_seed for n, r in again.items()} == {n: r.per_seed for n, r in first.items()}


def test_the_suite_is_one_pass_on_synthetic_data(small_synthetic, tmp_path, forwards, monkeypatch):
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    args = ("random_vits16", "synthetic", small_synthetic, "--size", "64", "--param", "overcluster.k=20",
            "--param", "datus.k=4", "--param", "linear.epochs=2", "--seeds", "1")
    assert _suite(tmp_path, *args) == 0
    _check_one_pass_with_train(tmp_path, forwards)
    forwards.clear()
    assert _suite(tmp_path, *args) == 0
    assert not forwards


def _check_one_pass_with_train(tmp_path, forwards):
    """With a train split: one pass over each of eval (8 images) and train (16), for every facet together."""
    main_pass = {k: v for k, v in forwards.items() if "tokens" in k[0]}
    assert main_pass == {(("attn", "keys", "tokens"), (64, 64)): 8 + 16}, forwards
