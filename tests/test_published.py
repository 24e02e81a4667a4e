"""Published numbers appear beside a column only where the entry's claimed column identity equals the column's;
everything else is context ("Reported numbers"), never a difference. Every shipped entry is checked against the
identity it claims."""
from __future__ import annotations

import pytest
import yaml

from ssl_segbench.data import DATASETS
from ssl_segbench.leaderboard import PublishedError, load_published, published_identity, render
from ssl_segbench.protocols import PROTOCOLS, get_protocol
from ssl_segbench.records import SCHEMA, Record, record_key
from ssl_segbench.registry import load_registry


def _rec(backbone: str, miou: float, spec: str, dataset: str = "voc", **overrides) -> Record:
    """A record as a run of `spec` (with `overrides`) writes it, with the resolved resize/size."""
    proto = get_protocol(spec, **overrides)
    params = dict(proto.params, resize=proto.params["resize"] or "shorter", size=proto.params["size"] or 224)
    ident = {"backbone": backbone, "source": backbone, "revision": "a" * 40, "dataset": dataset, "split": "val",
             "content_sha256": "f" * 64, "protocol": proto.name, "version": proto.version, "params": params,
             "layer": -1, "seeds": [0]}
    m = {"mean": miou, "std": 0.0, "per_seed": [miou]}
    return Record.from_json({
        "schema": SCHEMA, "key": record_key(ident), "identity": ident,
        "backbone": {"id": backbone, "revision_resolved": "a" * 40, "layer": -1}, "dataset": {"n_images": 10},
        "protocol": {"name": proto.name, "version": proto.version, "preset": proto.preset, "params": params},
        "seeds": [0], "info": {}, "metrics": {"miou": m, "pixel_acc": m, "mf1": m}})


def _exact(value=0.45, version="1", overrides=None):
    return {"dataset": "voc", "split": "val", "method": "Paper X", "backbone": "dino_vits16", "metric": "miou",
            "value": value, "stage": "frozen backbone", "measured_on": "frozen features", "compare": "exact",
            "source": "Paper X, Table 1",
            "protocol": {"name": "kmeans", "version": version, "preset": "stego", "overrides": overrides or {},
                         "layer": -1}}


def test_exact_entry_is_shown_only_in_the_column_with_its_identity():
    entry = _exact()
    same = _rec("dino_vits16", 0.5, "kmeans:stego")
    other_temperature = _rec("dino_vits16", 0.6, "kmeans:stego", crf_temperature=1.0)  # one parameter differs
    other_backbone = _rec("dino_vitb16", 0.7, "kmeans:stego")
    page = render([same, other_temperature, other_backbone], published=[entry])["voc.md"]
    sections = page.split("### kmeans")[1:]
    with_pub = [s for s in sections if "45.0 (+5.0)" in s]
    assert len(with_pub) == 1 and "dino_vits16" in with_pub[0] and "Published: Paper X, Table 1" in with_pub[0]
    assert "45.0 (+15.0)" not in page and "45.0 (+25.0)" not in page
    # a version bump of the protocol takes the claim out of every column
    assert "45.0" not in render([same], published=[_exact(version="0")])["voc.md"]


def test_reported_only_numbers_are_context_never_a_difference():
    entries = load_published()
    md = [e for e in entries if e["method"] == "MaskDistill" and e["dataset"] == "voc"]
    assert md and all(e["compare"] == "reported-only" and e["stage"] == "distilled network" for e in md)
    rec = _rec("dino_vits16", 0.40, "maskdistill:original", embed_backbone="dino_vits8")
    page = render([rec], published=entries)["voc.md"]
    column, reported = page.split("### Reported numbers (context only)")
    assert "published" not in column.split("### maskdistill")[1] and "45.8" not in column
    assert "45.8" in reported and "DeepLab-v3 trained on the object-mask pseudo labels" in reported


def test_every_shipped_entry_is_checked_against_the_identity_it_claims():
    entries = load_published()
    registry = load_registry()
    assert entries
    for e in entries:
        assert e["dataset"] in DATASETS, e
        assert e.get("backbone") is None or e["backbone"] in registry, e
        if e["compare"] == "exact":
            claimed = published_identity(e)  # the preset + overrides make a valid protocol
            assert claimed["version"] == PROTOCOLS[claimed["protocol"]].version, e
        else:
            assert e["why"] and "protocol" not in e


@pytest.mark.parametrize("text, match", [
    ("published:\n  - {dataset: voc, dataset: voc}\n", "duplicate key"),
    ("published:\n  - {dataset: voc, split: val, method: X, metric: miou, value: 0.4, stage: frozen backbone, "
     "measured_on: y, compare: exact, source: z}\n", "names its backbone and its column"),
    ("published:\n  - {dataset: voc, split: val, method: X, metric: miou, value: 0.4, stage: trained head, "
     "measured_on: y, compare: reported-only, source: z}\n", "says `why`"),
    ("published:\n  - {dataset: voc, split: val, method: X, metric: miou, value: 45.8, stage: trained head, "
     "measured_on: y, compare: reported-only, why: w, source: z}\n", "fraction"),
])
def test_malformed_published_files_are_refused(tmp_path, text, match):
    path = tmp_path / "published.yaml"
    path.write_text(text)
    with pytest.raises(Exception, match=match) as e:
        load_published(path)
    assert isinstance(e.value, (PublishedError,)) or "YAML" in type(e.value).__name__


def test_fs4_numbers_are_reported_only_and_an_unstated_stage_cannot_be_exact(tmp_path):
    fs4 = [e for e in load_published() if e["method"].startswith("FS⁴")]
    assert {(e["dataset"], e["metric"]) for e in fs4} == {("cocostuff27", "miou"), ("cocostuff27", "pixel_acc"),
                                                          ("cityscapes27", "miou"), ("cityscapes27", "pixel_acc")}
    assert all(e["compare"] == "reported-only" and e["stage"] == "unstated" for e in fs4)
    page = render([_rec("dino_vits16", 0.2, "fs4:cocostuff27", dataset="cocostuff27")])["cocostuff27.md"]
    column, reported = page.split("### Reported numbers (context only)")
    assert "28.3" not in column and "28.3" in reported and "48.5" in reported
    entry = dict(_exact(), stage="unstated")
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump({"published": [entry]}))
    with pytest.raises(PublishedError, match="unstated can only be reported-only"):
        load_published(path)


def test_hummingbird_numbers_stand_beside_exactly_the_preset_columns():
    entries = load_published()
    hb = [e for e in entries if e["method"].startswith("Hummingbird")]
    assert len(hb) == 18 and all(e["compare"] == "exact" for e in hb)
    assert {e["protocol"]["preset"] for e in hb} == {"hummingbird-100", "hummingbird-1000", "hummingbird-10000"}
    # a DINOv2 /14 run of the preset records size 504, as the entry claims; a /16 run records 512
    proto = get_protocol("retrieval:hummingbird-100")
    rec14 = _rec("dinov2_vits14", 0.71, "retrieval:hummingbird-100", size=proto.input_size(14))
    rec16 = _rec("dino_vits16", 0.40, "retrieval:hummingbird-100")
    fixed = _rec("dinov2_vits14", 0.72, "retrieval:hummingbird-100", size=504, ignore="drop")
    page = render([rec14, rec16, fixed], published=entries)["voc.md"]
    assert "70.2 (+0.8)" in page and "37.2 (+2.8)" in page and "memory 102400 (2 aug)" in page
    assert "70.2 (+1.8)" not in page  # the fixed-scoring variant is another column: no difference shown
    neco = [e for e in entries if e["method"].startswith("NeCo")]
    assert len(neco) == 4 and all(e["compare"] == "reported-only" for e in neco)
