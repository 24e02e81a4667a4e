"""Published numbers in three classes (reproduced, same-protocol, reported): a claim stands beside a column only where
a record's Setting matches it, train split and train set included; a same-protocol number carries its mark and its
deviations; reported numbers are context. Every shipped entry is checked against the Setting it claims."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from ssl_segbench.data import DATASETS
from ssl_segbench.data.base import voc_palette
from ssl_segbench.leaderboard import render
from ssl_segbench.protocols import PROTOCOLS, get_protocol
from ssl_segbench.published import Claim, PublishedError, load_published
from ssl_segbench.records import SCHEMA, Record
from ssl_segbench.registry import load_registry
from ssl_segbench.runner import resolve_params
from ssl_segbench.setting import Setting


def _cli(tmp_path, *args):
    env = {**os.environ, "SSL_SEGBENCH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "ssl_segbench", *args], env=env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _voc(root, n_val=3, n_train=4, n_aug_extra=4, aug=True):
    """A tiny VOC devkit: a square of class 1 or 15 on background, palette PNG masks; `aug` adds
    SegmentationClassAug (train + extra ids) with its trainaug.txt."""
    voc = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pal = voc_palette(256)
    ids = [f"2007_{i:06d}" for i in range(n_val + n_train + n_aug_extra)]
    for n, i in enumerate(ids):
        cls = 1 if n % 2 else 15
        mask = np.zeros((64, 64), np.uint8)
        y, x = rng.integers(4, 28, 2)
        mask[y:y + 28, x:x + 28] = cls
        img = pal[mask].astype(np.float32) * 0.7 + rng.normal(0, 12, (64, 64, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg", quality=95)
        png = Image.fromarray(mask, mode="P")
        png.putpalette(pal.flatten().tolist())
        if n < n_val + n_train:
            png.save(voc / "SegmentationClass" / f"{i}.png")
        if aug and n >= n_val:
            (voc / "SegmentationClassAug").mkdir(exist_ok=True)
            png.save(voc / "SegmentationClassAug" / f"{i}.png")
    sets = voc / "ImageSets" / "Segmentation"
    (sets / "val.txt").write_text("\n".join(ids[:n_val]) + "\n")
    (sets / "train.txt").write_text("\n".join(ids[n_val:n_val + n_train]) + "\n")
    if aug:
        (sets / "trainaug.txt").write_text("\n".join(ids[n_val:]) + "\n")
    return root


_DEVIATIONS = ["the reference searched approximately (ScaNN)", "its memory kept zero rows"]


def _entry(value, protocol, **more):
    return {"dataset": "voc", "split": "val", "method": "Paper X", "backbone": "pixels", "metric": "miou",
            "value": value, "stage": "frozen backbone", "measured_on": "frozen features", "class": "same-protocol",
            "source": "Paper X, Table 1", "deviations": _DEVIATIONS, "protocol": protocol, **more}


def test_a_memory_from_train_is_never_shown_beside_a_trainaug_number(tmp_path):
    """Two retrieval records of one backbone whose memory came from trainaug (8 images) and from train (4 images, a
    root without SegmentationClassAug): the same-protocol entry claiming trainaug, 8 images, stands beside the first
    only, drawn with † and its deviations in markdown and in the site. The same entry without `train` would have
    matched both before (the match compared protocol, parameters and layer alone)."""
    with_aug, without = _voc(tmp_path / "aug"), _voc(tmp_path / "plain", aug=False)
    run = ["run", "--backbone", "pixels", "--dataset", "voc", "--size", "64", "--protocol", "retrieval", "--param",
           'retrieval.train_split=["trainaug","default"]', "--param", "retrieval.k=10",
           "--results-dir", str(tmp_path / "res")]
    _cli(tmp_path, *run, "--data-root", str(with_aug))
    _cli(tmp_path, *run, "--data-root", str(without))
    recs = [Record.from_json(json.loads(p.read_text())) for p in sorted((tmp_path / "res").rglob("*.json"))]
    assert sorted(r.setting.train["split"] for r in recs) == ["train", "trainaug"]
    assert sorted(r.setting.train_images for r in recs) == [4, 8]
    aug_rec = next(r for r in recs if r.setting.train["split"] == "trainaug")
    plain_rec = next(r for r in recs if r.setting.train["split"] == "train")
    protocol = {"name": "retrieval", "version": "1", "overrides": {"train_split": ["trainaug", "default"], "k": 10}}
    entry = _entry(0.3, protocol, run={"size": 64}, train={"split": "trainaug", "n_images": 8})
    wrong_size = _entry(0.3, protocol, run={"size": 64}, train={"split": "trainaug", "n_images": 10582})
    (tmp_path / "pub.yaml").write_text(yaml.safe_dump({"published": [entry]}, allow_unicode=True))
    _cli(tmp_path, "leaderboard", "--results-dir", str(tmp_path / "res"), "--out", str(tmp_path / "lb"),
         "--published", str(tmp_path / "pub.yaml"))

    page = (tmp_path / "lb" / "voc.md").read_text()
    ours = 100 * aug_rec.metrics["miou"]["mean"]
    cell = f"30.0† ({ours - 30:+.1f})"
    sections = {s.split("\n", 1)[0]: s for s in page.split("### ")[1:]}
    aug_col = next(s for h, s in sections.items() if "train: trainaug" in h)
    train_col = next(s for h, s in sections.items() if "train: train ·" in h)
    assert cell in aug_col and "same protocol, not reproduced" in aug_col
    assert all(d in aug_col for d in _DEVIATIONS)
    assert "30.0" not in train_col and "published" not in train_col
    html = (tmp_path / "lb" / "site" / "voc.html").read_text()
    assert html.count('class="published same-protocol"') == 1 and f"published {cell}" in html
    assert all(d in html for d in _DEVIATIONS)
    # the claim decides by train split and size: the train record never, the trainaug one only at its size
    assert Claim.of_entry(entry).matches(aug_rec) and not Claim.of_entry(entry).matches(plain_rec)
    assert not Claim.of_entry(wrong_size).matches(aug_rec)
    # the old match (protocol, parameters, layer) could not tell the two records apart
    assert aug_rec.identity["params"] == plain_rec.identity["params"]


def test_a_preset_that_does_not_fix_the_size_matches_the_record_of_that_preset(small_synthetic, tmp_path):
    """`kmeans` fixes neither the input size nor the k-means implementation (`auto`): a run records the size it was
    given and the implementation its device resolved. The claim is resolved the same way (`runner.resolve_params`),
    so the entry stands beside the record; the old claim (the preset's raw parameters) never could."""
    _cli(tmp_path, "run", "--backbone", "pixels", "--dataset", "synthetic", "--data-root", str(small_synthetic),
         "--size", "64", "--protocol", "kmeans", "--seeds", "1", "--results-dir", str(tmp_path / "res"))
    rec = Record.from_json(json.loads(next((tmp_path / "res").rglob("*.json")).read_text()))
    raw = get_protocol("kmeans").params
    assert raw["size"] is None and raw["kmeans_backend"] == "auto"
    assert rec.identity["params"]["size"] == 64 and rec.identity["params"]["kmeans_backend"] != "auto"
    assert rec.identity["params"] != raw  # what the old match compared: never equal
    protocol = {"name": "kmeans", "version": PROTOCOLS["kmeans"].version}
    entries = [dict(_entry(0.2, protocol, run={"size": 64}), dataset="synthetic", split="test"),
               dict(_entry(0.99, protocol, run={"size": 128}), dataset="synthetic", split="test")]  # not beside it
    (tmp_path / "pub.yaml").write_text(yaml.safe_dump({"published": entries}, allow_unicode=True))
    _cli(tmp_path, "leaderboard", "--results-dir", str(tmp_path / "res"), "--out", str(tmp_path / "lb"),
         "--published", str(tmp_path / "pub.yaml"))
    page = (tmp_path / "lb" / "synthetic.md").read_text()
    assert f"20.0† ({100 * rec.metrics['miou']['mean'] - 20:+.1f})" in page and "99.0" not in page


def _rec(backbone: str, miou: float, spec: str, dataset: str = "voc", train=None, **overrides) -> Record:
    """A record as a run of `spec` (with `overrides`) on CPU writes it, for a backbone of patch 16 at size 224 (its
    Setting's parameters as `runner.plan_setting` makes them, the record's `protocol.params` all of them)."""
    proto, params, _ = resolve_params(get_protocol(spec, **overrides), 16, 224, "shorter", "cpu")
    setting = Setting(backbone, backbone, "a" * 40, dataset, "val", "f" * 64, proto.name, proto.version,
                      proto.identity_params(params), -1, (0,), train=train, preset=proto.preset)
    m = {"mean": miou, "std": 0.0, "per_seed": [miou]}
    return Record.from_json({
        "schema": SCHEMA, "key": setting.key, "identity": setting.identity(),
        "backbone": {"id": backbone, "revision_resolved": "a" * 40, "layer": -1, "patch_size": 16},
        "dataset": {"n_images": 10}, "provenance": {"device": "cpu"},
        "protocol": {"name": proto.name, "version": proto.version, "preset": proto.preset, "params": params},
        "seeds": [0], "info": {"train_images": 10582} if train else {}, "metrics": {"miou": m, "pixel_acc": m}})


def test_a_reproduced_entry_names_its_record_and_machine_and_is_drawn_with_its_mark():
    rec = _rec("dino_vits16", 0.455, "kmeans:stego")
    protocol = {"name": "kmeans", "version": "1", "preset": "stego"}
    entry = dict(_entry(0.45, protocol, backbone="dino_vits16", **{"class": "reproduced"}), record=rec.key,
                 machine="1x H100, ssl-segbench 0.4")
    del entry["deviations"]
    page = render([rec], published=[entry])["voc.md"]
    assert "45.0✓ (+0.5)" in page and f"reproduced by record {rec.key} on 1x H100" in page
    # a version bump of the protocol takes the claim out of every column
    assert "45.0" not in render([rec], published=[dict(entry, protocol={**protocol, "version": "0"})])["voc.md"]


def test_reported_numbers_are_context_never_a_difference():
    entries = load_published()
    md = [e for e in entries if e["method"].startswith("MaskDistill")]
    assert md and all(e["class"] == "reported" and e["stage"] == "distilled network" for e in md)
    # measured on a DeepLab-v3 with a MoCo ResNet-50 trained on the masks: not attached to a registry backbone
    assert all("backbone" not in e and "MoCo ResNet-50" in e["network"] for e in md)
    rec = _rec("dino_vits16", 0.40, "maskdistill:original", embed_backbone="dino_vits8")
    page = render([rec], published=entries)["voc.md"]
    column, reported = page.split("### Reported numbers (context only)")
    assert "45.8" not in column and "45.8" in reported and "MoCo ResNet-50" in reported


def test_every_shipped_entry_is_checked_against_the_setting_it_claims():
    entries = load_published()
    registry = load_registry()
    assert {e["class"] for e in entries} == {"same-protocol", "reported"}  # nothing is reproduced until a run shows it
    for e in entries:
        assert e["dataset"] in DATASETS, e
        assert e.get("backbone") is None or e["backbone"] in registry, e
        if e["class"] != "reported":
            claim = Claim.of_entry(e)
            made = claim.protocol_made()
            assert claim.version == PROTOCOLS[made.name].version, e
            assert (e.get("train") is not None) == (made.train_split_wanted() is not None), e
            assert e["deviations"], e


@pytest.mark.parametrize("change, match", [
    ({"class": "exact"}, "class must be one of"),
    ({"deviations": []}, "lists every known deviation"),
    ({"stage": "unstated"}, "measured on a frozen backbone"),
    ({"train": None}, "reads a train split, so the entry states `train`"),
    ({"class": "reproduced", "record": "xyz"}, "names the record that reproduced it"),
    ({"class": "reported", "why": "other"}, "claims no setting"),
    ({"value": 45.8}, "fraction"),
])
def test_malformed_published_entries_are_refused(tmp_path, change, match):
    good = _entry(0.4, {"name": "retrieval", "version": "1"}, train={"split": "trainaug"})
    bad = {k: v for k, v in {**good, **change}.items() if v is not None}
    if change.get("class") == "reproduced":
        bad.pop("deviations")
    for entry, ok in ((good, True), (bad, False)):
        path = tmp_path / "published.yaml"
        path.write_text(yaml.safe_dump({"published": [entry]}, allow_unicode=True))
        if ok:
            assert load_published(path)
        else:
            with pytest.raises(PublishedError, match=match):
                load_published(path)


def test_fs4_numbers_are_reported_on_the_class_sets_they_were_measured_on():
    fs4 = [e for e in load_published() if e["method"].startswith("FS⁴")]
    assert all(e["class"] == "reported" and e["stage"] == "unstated" for e in fs4)
    stuff15 = [e for e in fs4 if e["value"] == 0.485]
    # COCO-Stuff-15 pixel accuracy: on the two 15-class sets it may be, never on cocostuff27
    assert {e["dataset"] for e in stuff15} == {"cocostuff27-stuff15", "cocostuff15-leopart"}
    assert all(e["metric"] == "pixel_acc" for e in stuff15)
    page = render([_rec("dino_vits16", 0.2, "fs4:cocostuff27", dataset="cocostuff27")])["cocostuff27.md"]
    column, reported = page.split("### Reported numbers (context only)")
    assert "28.3" not in column and "28.3" in reported and "48.5" not in page


def test_hummingbird_numbers_are_same_protocol_beside_exactly_the_trainaug_preset_columns():
    entries = load_published()
    hb = [e for e in entries if e["method"].startswith("Hummingbird")]
    assert len(hb) == 18 and all(e["class"] == "same-protocol" for e in hb)
    assert all(e["train"] == {"split": "trainaug", "n_images": 10582} for e in hb)
    assert all(any("patch axis" in d for d in e["deviations"]) and any("ScaNN" in d for d in e["deviations"])
               for e in hb)
    trainaug = {"split": "trainaug", "content_sha256": "e" * 64}
    rec16 = _rec("dino_vits16", 0.40, "retrieval:hummingbird-100", train=trainaug)
    from_train = _rec("dino_vitb16", 0.40, "retrieval:hummingbird-100", train={**trainaug, "split": "train"})
    fixed = _rec("dino_vits16", 0.41, "retrieval:hummingbird-100", train=trainaug, ignore="drop")
    page = render([rec16, from_train, fixed], published=entries)["voc.md"]
    assert "37.2† (+2.8)" in page and "memory 102400 (2 aug)" in page and "train: trainaug" in page
    assert "37.2† (+3.8)" not in page  # the fixed-scoring variant is another column: no difference shown
    assert "44.9†" not in page  # ViT-B/16's number, but its record's memory came from train
    assert "patch axis" in page  # the footnote lists the deviations


def test_a_missing_or_malformed_published_file_is_refused_naming_it_and_nothing_is_written(small_synthetic, tmp_path):
    _cli(tmp_path, "run", "--backbone", "pixels", "--dataset", "synthetic", "--data-root", str(small_synthetic),
         "--size", "64", "--protocol", "kmeans", "--seeds", "1", "--results-dir", str(tmp_path / "res"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"published": [_entry(0.2, {"name": "kmeans", "version": "1"}, split="test",
                                                        dataset="synthetic", **{"class": "exact"})]}))
    env = {**os.environ, "SSL_SEGBENCH_CACHE": str(tmp_path / "cache")}
    for path, expected in ((tmp_path / "absent.yaml", "not found: pass an existing file to --published"),
                           (bad, "class must be one of")):
        proc = subprocess.run([sys.executable, "-m", "ssl_segbench", "leaderboard", "--results-dir",
                               str(tmp_path / "res"), "--out", str(tmp_path / "lb"), "--published", str(path)],
                              env=env, capture_output=True, text=True, cwd=tmp_path)
        err = " ".join(proc.stderr.split())
        assert proc.returncode == 2 and str(path) in err and expected in err and "Traceback" not in err, err
        assert not (tmp_path / "lb").exists()
