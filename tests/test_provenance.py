"""Issue case 7: provenance is true. The record lists every backbone pass (feature facets, crop embeddings, pseudo
masks) and whether it came from the cache; `cache_hit` is derived from that list; a run that waited for another
process to extract reports that it computed nothing; the compute precision is part of the feature key."""
from __future__ import annotations

import contextlib

import pytest

import ssl_segbench.cache as cache
from ssl_segbench.backbones import BackboneRef
from ssl_segbench.cli import main
from ssl_segbench.data import get_dataset
from ssl_segbench.features import compute_precision, extract, feature_key
from ssl_segbench.records import iter_records
from ssl_segbench.transforms import Transform


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Every test here judges what was computed: it gets a cache of its own."""
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))


def _run(tmp_path, data, protocol, *extra):
    return main(["run", "--backbone", "random_vits16", "--dataset", "synthetic", "--data-root", str(data),
                 "--size", "64", "--protocol", protocol, "--seeds", "1", "--results-dir", str(tmp_path / "res"),
                 *extra])


def _passes(tmp_path, protocol):
    (rec,) = [r for _, r in iter_records(tmp_path / "res") if r.protocol["name"] == protocol]
    return rec.provenance


def test_datus_record_lists_its_crop_pass_and_only_claims_a_cache_hit_when_nothing_ran(small_synthetic, tmp_path):
    assert _run(tmp_path, small_synthetic, "datus", "--param", "datus.k=4") == 0
    prov = _passes(tmp_path, "datus")
    kinds = {p["kind"]: p for p in prov["passes"]}
    assert kinds["features"]["computed"] and kinds["features"]["facets"] == ["keys"]
    assert kinds["datus segment-crop embeddings"]["computed"] and kinds["datus segment-crop embeddings"]["crops"] > 0
    assert prov["cache_hit"] is False
    assert _run(tmp_path, small_synthetic, "datus", "--param", "datus.k=4", "--overwrite", "always") == 0
    prov = _passes(tmp_path, "datus")
    assert [p["computed"] for p in prov["passes"]] == [False, False] and prov["cache_hit"] is True


def test_a_cached_feature_pass_with_a_fresh_crop_pass_is_not_a_cache_hit(small_synthetic, tmp_path):
    """The keys entry exists from a first datus run; other crop settings need the crops embedded again, so the record
    of the second run may not say 'cache hit' although its feature pass came from the cache."""
    assert _run(tmp_path, small_synthetic, "datus", "--param", "datus.k=4") == 0
    assert _run(tmp_path, small_synthetic, "datus", "--param", "datus.k=4", "--param", "datus.crop_size=32",
                "--param", "datus.crop_resize=48") == 0
    recs = [r for _, r in iter_records(tmp_path / "res")]
    second = next(r for r in recs if r.protocol["params"]["crop_size"] == 32)
    computed = {p["kind"]: p["computed"] for p in second.provenance["passes"]}
    assert computed == {"features": False, "datus segment-crop embeddings": True}
    assert second.provenance["cache_hit"] is False


def test_maskdistill_record_lists_its_mask_and_crop_pass(small_synthetic, tmp_path):
    assert _run(tmp_path, small_synthetic, "maskdistill") == 0
    prov = _passes(tmp_path, "maskdistill")
    masks = [p for p in prov["passes"] if p["kind"] == "maskdistill crop embeddings"]
    assert {p["split"] for p in masks} == {"test", "train"} and all(p["computed"] for p in masks)
    assert _run(tmp_path, small_synthetic, "maskdistill", "--overwrite", "always") == 0
    prov = _passes(tmp_path, "maskdistill")
    assert not any(p["computed"] for p in prov["passes"]) and prov["cache_hit"] is True


def test_waiting_for_another_process_that_extracted_is_not_computing(small_synthetic, tmp_path, monkeypatch):
    """Simulates the race: the entry is missing when checked, another process completes it while this one waits for
    the lock. This process then computed nothing and must say so (it used to report cache_hit False)."""
    ds = get_dataset("synthetic", small_synthetic)
    t = Transform("shorter", 32, 16)
    real = cache.locked
    raced = []

    @contextlib.contextmanager
    def racing(entries):
        if not raced:
            raced.append(True)
            extract(BackboneRef("pixels"), ds, t, root=tmp_path)  # "the other process", holding the lock itself
        with real(entries):
            yield

    monkeypatch.setattr(cache, "locked", racing)
    fs = extract(BackboneRef("pixels"), ds, t, root=tmp_path)
    assert raced and fs.computed == () and fs.cache_hit


def test_compute_precision_is_part_of_the_feature_key(small_synthetic, tmp_path):
    assert compute_precision("cuda") == "bf16-autocast" and compute_precision("cuda", amp=False) == "fp32"
    assert compute_precision("cpu") == "fp32"
    ref, ds, t = BackboneRef("pixels"), get_dataset("synthetic", small_synthetic), Transform("shorter", 32, 16)
    assert feature_key(ref, ds, t, -1, "tokens", "bf16-autocast") != feature_key(ref, ds, t, -1, "tokens", "fp32")
    fs = extract(ref, ds, t, root=tmp_path)
    assert fs["tokens"].meta["key"]["precision"] == "fp32"
    assert _run(tmp_path, small_synthetic, "kmeans") == 0
    assert _passes(tmp_path, "kmeans")["compute_precision"] == "fp32"
