"""Leaderboard rendering on hand-made records: separation of settings, ranking, published numbers, stable bytes."""
from __future__ import annotations

import csv
import io
import json

from ssl_segbench.atomic import write_json_atomic
from ssl_segbench.leaderboard import flat_rows, render, write
from ssl_segbench.records import SCHEMA, Record
from ssl_segbench.setting import Setting


def _rec(backbone, miou, k=8, size=224, preset=None, rev="a" * 40, dataset="voc", seeds=(0, 1)):
    params = {"k": k, "resize": "square" if preset else "shorter", "size": size, "matching": "hungarian-pixels",
              "eval_size": None}
    ident = {"backbone": backbone, "source": backbone, "revision": rev, "dataset": dataset, "split": "val",
             "content_sha256": "f" * 64, "protocol": "kmeans", "version": "1", "params": params, "layer": -1,
             "seeds": list(seeds)}
    m = {"mean": miou, "std": 0.01, "per_seed": [miou - 0.01, miou + 0.01]}
    return Record.from_json({"schema": SCHEMA, "key": Setting.of_identity(ident).key, "identity": ident,
                             "backbone": {"id": backbone, "revision_resolved": rev, "layer": -1},
                             "dataset": {"n_images": 10}, "protocol": {"name": "kmeans", "version": "1",
                                                                       "preset": preset, "params": params},
                             "seeds": list(seeds), "info": {"k": k}, "metrics": {"miou": m, "pixel_acc": m, "mf1": m}})


def test_settings_that_change_numbers_never_share_a_column():
    recs = [_rec("a", 0.5), _rec("b", 0.6), _rec("c", 0.7, size=448), _rec("d", 0.4, k=21)]
    page = render(recs, published=[])["voc.md"]
    assert page.count("### kmeans v1 · K=8 · hungarian-pixels · shorter 224") == 1
    assert "### kmeans v1 · K=8 · hungarian-pixels · shorter 448" in page and "### kmeans v1 · K=21" in page
    section = page.split("### kmeans v1 · K=8 · hungarian-pixels · shorter 224")[1].split("###")[0]
    assert section.index("b @ aaaaaaaaaaaa") < section.index("a @ aaaaaaaaaaaa")  # ranked by mIoU
    assert "c @" not in section and "d @" not in section


def test_identical_labels_with_different_settings_get_distinct_ids():
    recs = [_rec("a", 0.5, seeds=(0, 1)), _rec("b", 0.6, seeds=(5, 6))]  # same header text, different seeds
    page = render(recs, published=[])["voc.md"]
    headers = [line for line in page.splitlines() if line.startswith("### kmeans")]
    assert len(headers) == 2 and headers[0] != headers[1] and all("[" in h for h in headers)


def test_summary_csv_json_and_byte_stability(tmp_path):
    for r in (_rec("a", 0.5), _rec("b", 0.6), _rec("a", 0.3, dataset="suim")):
        write_json_atomic(tmp_path / "res" / f"{r.key}.json", r.to_json())
    written, problems = write(tmp_path / "res", tmp_path / "lb")
    assert not problems and sorted(p.name for p in written if p.suffix == ".md") == ["README.md", "suim.md", "voc.md"]
    assert (tmp_path / "lb" / "site" / "index.html").is_file()  # the static site is written beside the markdown
    summary = (tmp_path / "lb" / "README.md").read_text()
    assert "voc/val kmeans" in summary and "suim/val kmeans" in summary
    first = {p.relative_to(tmp_path / "lb"): p.read_bytes() for p in written}
    write(tmp_path / "res", tmp_path / "lb")
    assert {p.relative_to(tmp_path / "lb"): p.read_bytes() for p in (tmp_path / "lb").rglob("*") if p.is_file()} \
        == first  # markdown and site, byte for byte
    write(tmp_path / "res", tmp_path / "lb", "csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "lb" / "leaderboard.csv").read_text())))
    assert [(r["dataset"], r["backbone"]) for r in rows] == [("suim", "a"), ("voc", "b"), ("voc", "a")]
    write(tmp_path / "res", tmp_path / "lb", "json")
    assert json.loads((tmp_path / "lb" / "leaderboard.json").read_text()) == json.loads(
        json.dumps(flat_rows([_rec("a", 0.3, dataset="suim"), _rec("b", 0.6), _rec("a", 0.5)])))
