"""`Setting`, the one identity of a measurement: its key is the digest of the stored identity (unchanged from the
records written before it existed), and its column is everything but the backbone, so records share a column exactly
when they differ in the backbone alone."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace

from ssl_segbench.protocols import get_protocol
from ssl_segbench.setting import Setting, unique_labels


def _setting(**changes) -> Setting:
    params = dict(get_protocol("retrieval:hummingbird-100").params, size=512)
    base = Setting("dino_vits16", "timm/x", "a" * 40, "voc", "val", "c" * 64, "retrieval", "1", params, -1, (0,),
                   train={"split": "trainaug", "content_sha256": "d" * 64}, preset="hummingbird-100")
    return replace(base, **changes)


def test_the_key_is_the_digest_of_the_stored_identity_and_survives_a_round_trip():
    s = _setting()
    ident = s.identity()
    by_hand = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert s.key == by_hand and Setting.of_identity(ident).key == s.key
    assert set(ident) == {"backbone", "source", "revision", "dataset", "split", "content_sha256", "protocol", "version",
                          "params", "layer", "seeds", "train"}  # no normalisation key for a registry entry's own
    # descriptive fields name the column, never the key
    assert replace(s, preset=None, k=7, decoding={"resize_masks": True}, train_images=3).key == s.key


def test_records_share_a_column_exactly_when_they_differ_in_the_backbone_alone():
    s = _setting()
    same = replace(s, backbone="dinov2_vits14", source="hf/y", revision="b" * 40,
                   normalisation={"mean": [0.5] * 3, "std": [0.5] * 3})
    assert same.column.id == s.column.id and same.key != s.key
    for change in ({"train": {"split": "train", "content_sha256": "d" * 64}}, {"data_digest": "e" * 64},
                   {"split": "test"}, {"layer": -2}, {"seeds": (0, 1)}, {"params": {**s.params, "k": 10}},
                   {"version": "2"}):
        assert replace(s, **change).column.id != s.column.id, change


def test_the_header_names_the_protocols_own_axes_and_what_the_data_decoding_and_train_split_were():
    s = replace(_setting(), decoding={"off_palette": "nearest"})
    assert s.column.label == ("retrieval:hummingbird-100 v1 · hungarian-iou · memory 102400 (2 aug) · square 512 · "
                              "eval at input res · train: trainaug · off_palette=nearest · 1 seed")
    assert s.column.axis("memory") == "memory 102400 (2 aug)" and s.column.axis("crf") == "off"
    on_eval = replace(s, train={"split": None, "content_sha256": None}, decoding={})
    assert "train: the evaluation images" in on_eval.column.label
    # two columns that would read the same get their ids
    a, b = replace(s, data_digest="1" * 64).column, replace(s, data_digest="2" * 64).column
    labels = unique_labels([a, b])
    assert labels[a.id] == f"{a.label} [{a.id}]" and labels[b.id] == f"{b.label} [{b.id}]"
