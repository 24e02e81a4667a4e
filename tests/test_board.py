"""The board model (`board.build`) that the markdown leaderboard and the static site both render: its rows, columns,
cells, footnotes and summary on hand-made records; the two renderings of one set of records list the same rows in the
same order with the same numbers; a hostile name is escaped on every HTML page and literal in markdown."""
from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import pytest
import yaml
from markdown_it import MarkdownIt

from ssl_segbench.atomic import write_json_atomic
from ssl_segbench.board import build
from ssl_segbench.leaderboard import write
from ssl_segbench.protocols import get_protocol
from ssl_segbench.records import SCHEMA, Record
from ssl_segbench.registry import load_registry
from ssl_segbench.runner import resolve_params
from ssl_segbench.setting import Setting

EVIL = "<script>alert(1)</script>\"&'"
DEVIATIONS = ["the reference resized to 448", "its k-means ran once"]


def _rec(backbone: str, miou: float, spec: str, split: str = "val", seeds=(0, 1), **overrides) -> Record:
    """A record as a run of `spec` on CPU writes it, for a backbone of patch 16 at size 224 on 200 images."""
    proto, params, _ = resolve_params(get_protocol(spec, **overrides), 16, 224, "shorter", "cpu")
    setting = Setting(backbone, backbone, "a" * 40, "voc", split, "f" * 64, proto.name, proto.version, params, -1,
                      tuple(seeds), preset=proto.preset)
    m = {"mean": miou, "std": 0.01, "per_seed": [miou - 0.01, miou + 0.01]} if len(seeds) == 2 else \
        {"mean": miou, "std": 0.0, "per_seed": [miou]}
    return Record.from_json({
        "schema": SCHEMA, "key": setting.key, "identity": setting.identity(),
        "backbone": {"id": backbone, "revision_resolved": "a" * 40, "layer": -1, "patch_size": 16},
        "dataset": {"n_images": 200}, "provenance": {"device": "cpu"},
        "protocol": {"name": proto.name, "version": proto.version, "preset": proto.preset, "params": params},
        "seeds": list(seeds), "info": {}, "metrics": {"miou": m, "pixel_acc": m}})


def _same_protocol(backbone: str, value: float, **more) -> dict:
    return {"dataset": "voc", "split": "val", "method": "Paper X", "backbone": backbone, "metric": "miou",
            "value": value, "stage": "frozen backbone", "measured_on": "frozen features", "class": "same-protocol",
            "source": "Paper X, Table 1", "deviations": DEVIATIONS,
            "protocol": {"name": "kmeans", "version": "1", "preset": "stego"}, **more}


def _reported(why: str) -> dict:
    return {"dataset": "voc", "split": "val", "method": "Paper Y", "network": "a DeepLab head", "metric": "miou",
            "value": 0.61, "stage": "trained head", "measured_on": "a trained head", "class": "reported", "why": why,
            "source": "Paper Y, Table 2"}


def _records() -> dict[str, Record]:
    """voc/val: plain kmeans (dino_vits16, pixels), kmeans with CRF (dino_vitb16 alone), kmeans:stego (dino_vits16,
    dino_vitb16); voc/train: plain kmeans on one seed (pixels)."""
    return {"s16": _rec("dino_vits16", 0.30, "kmeans"), "px": _rec("pixels", 0.10, "kmeans"),
            "b16crf": _rec("dino_vitb16", 0.60, "kmeans", crf=True),
            "s16stego": _rec("dino_vits16", 0.455, "kmeans:stego"),
            "b16stego": _rec("dino_vitb16", 0.50, "kmeans:stego"),
            "pxtrain": _rec("pixels", 0.20, "kmeans", split="train", seeds=(0,))}


def test_the_model_of_two_splits_with_a_missing_cell_a_published_entry_and_a_caveat():
    r = _records()
    entry, reported = _same_protocol("dino_vits16", 0.45), _reported("a trained head")
    boards = build(list(r.values()), [entry, reported], load_registry())
    (page,) = boards.pages
    assert page.dataset == "voc" and page.demo_note is None and [s.split for s in page.splits] == ["train", "val"]
    train, val = page.splits
    # columns sorted by header ("kmeans v1 · …" before "kmeans v1 · … · CRF T=0.5 · …" before "kmeans:stego v1 · …")
    assert [c.column.id for c in val.columns] == [r["s16"].setting.column.id, r["b16crf"].setting.column.id,
                                                  r["s16stego"].setting.column.id]
    assert [c.spec for c in val.columns] == ["kmeans", "kmeans", "kmeans:stego"]
    assert [c.column.axis("crf") for c in val.columns] == ["off", "T=0.5", "off"]
    # rows ranked by the first column's mIoU; dino_vitb16 has no cell there, so it comes last
    assert [row.label for row in val.rows] == ["dino_vits16 @ aaaaaaaaaaaa", "pixels @ aaaaaaaaaaaa",
                                               "dino_vitb16 @ aaaaaaaaaaaa"]
    assert [[c.record.key if c else None for c in row.cells] for row in val.rows] == [
        [r["s16"].key, None, r["s16stego"].key], [r["px"].key, None, None], [None, r["b16crf"].key, r["b16stego"].key]]
    assert [[c.record.key for c in col.ranked] for col in val.columns] == [
        [r["s16"].key, r["px"].key], [r["b16crf"].key], [r["b16stego"].key, r["s16stego"].key]]
    assert [(row.facts.family, row.facts.size) for row in val.rows] == [
        ("dino", "S (< 50 M)"), ("baseline", "unknown"), ("dino", "B (50-150 M)")]
    # the published entry stands beside the one record its claim matches, with its mark and difference (45.5 − 45.0)
    cells = {c.record.key: c for col in val.columns for c in col.ranked}
    assert cells[r["s16stego"].key].published is entry and cells[r["s16stego"].key].published_text == "45.0† (+0.5)"
    assert [k for k, c in cells.items() if c.published] == [r["s16stego"].key]
    note = ("† Paper X (dino_vits16), Paper X, Table 1: same protocol, not reproduced; known deviations of the "
            "published run: the reference resized to 448; its k-means ran once")
    assert [col.footnotes for col in val.columns] == [(), (), (note,)] and val.footnotes == (note,)
    assert val.reported == (reported,) and not any(c.caveats for c in cells.values()) and not val.has_caveats
    # the other split: one single-seed record, which carries its caveat; no published or reported number
    assert [row.label for row in train.rows] == ["pixels @ aaaaaaaaaaaa"] and train.has_caveats
    assert train.rows[0].cells[0].caveats == ("1 seed (no spread)",) and train.rows[0].cells[0].record is r["pxtrain"]
    assert train.reported == () and train.footnotes == ()
    assert val.images == ((200, "f" * 12),) and val.n_images == (200,)
    # the summary grid: per (dataset/split, protocol) the column holding the most backbones (plain kmeans: 2 of 3)
    s = boards.summary
    assert [(c.dataset, c.split, c.spec, c.column_id) for c in s.columns] == [
        ("voc", "train", "kmeans", r["pxtrain"].setting.column.id),
        ("voc", "val", "kmeans", r["s16"].setting.column.id),
        ("voc", "val", "kmeans:stego", r["s16stego"].setting.column.id)]
    assert [(row.label, [c.record.key if c else None for c in row.cells]) for row in s.rows] == [
        ("dino_vitb16 @ aaaaaaaaaaaa", [None, None, r["b16stego"].key]),
        ("dino_vits16 @ aaaaaaaaaaaa", [None, r["s16"].key, r["s16stego"].key]),
        ("pixels @ aaaaaaaaaaaa", [r["pxtrain"].key, r["px"].key, None])]
    # the index: the best cell per protocol over every split and column (the CRF column's 60.0 for kmeans)
    assert s.specs == ("kmeans", "kmeans:stego")
    assert [(ds, [c.record.key for c in best]) for ds, best in s.best] == [
        ("voc", [r["b16crf"].key, r["b16stego"].key])]


class _Page(HTMLParser):
    """An HTML page as the browser reads it: its text, every attribute value, its <script> tags and the cells of each
    `table.board` (header texts, then per row the text of each cell)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.text, self.values, self.scripts, self.tables = [], [], [], []
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.values += [v for v in a.values() if v]
        if tag == "script":
            self.scripts.append(a)
        if tag == "table" and a.get("class") == "board":
            self.tables.append({"head": [], "rows": []})
        if self.tables and tag == "tr":
            self.tables[-1]["rows"].append([])
        if self.tables and tag in ("td", "th"):
            self._cell = [tag, a, ""]

    def handle_endtag(self, tag):
        if tag == "table":
            self._cell = None
        if self._cell and tag == self._cell[0]:
            kind, attrs, text = self._cell
            if kind == "th" and "setting" in attrs.get("class", ""):
                self.tables[-1]["head"].append(text.strip())
            elif kind == "td":
                self.tables[-1]["rows"][-1].append(text.strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell:
            self._cell[2] += data


def _md_tables(text: str) -> list[list[list[str]]]:
    """Each markdown table as rows of cell texts (header first), parsed by markdown-it-py's GFM tables."""
    rendered = MarkdownIt("commonmark", {"html": True}).enable("table").render(text)
    return [[[html.unescape(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)]
             for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
            for table in re.findall(r"<table>(.*?)</table>", rendered, re.S)]


def _number(cell: str) -> str | None:
    """The mIoU a cell shows ('30.0 ⚠', '30.0 ± 1.0…'), or None for a missing cell ('–')."""
    found = re.match(r"\d+\.\d", cell)
    return found.group(0) if found else None


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The leaderboard (markdown and site) of the model's records plus a record of a hostile backbone, a published
    entry claiming it and a reported number, each naming it."""
    root = tmp_path_factory.mktemp("board")
    recs = list(_records().values()) + [_rec(EVIL, 0.70, "kmeans:stego")]
    for rec in recs:
        write_json_atomic(root / "res" / f"{rec.key}.json", rec.to_json())
    entries = [_same_protocol("dino_vits16", 0.45), _same_protocol(EVIL, 0.65, method=f"Paper {EVIL}"),
               _reported(f"it names {EVIL}")]
    (root / "pub.yaml").write_text(yaml.safe_dump({"published": entries}, allow_unicode=True))
    _, problems = write(root / "res", root / "lb", "md", published=root / "pub.yaml")
    assert not problems
    return root / "lb"


def test_markdown_and_html_show_the_same_rows_in_the_same_order_with_the_same_numbers(written):
    page = (written / "voc.md").read_text()
    md_overviews = [_md_tables(part.split("###")[0])[0] for part in page.split("### Overview: mIoU (%)")[1:]]
    html_tables = _Page((written / "site" / "voc.html").read_text()).tables
    assert len(md_overviews) == len(html_tables) == 2  # the splits, train then val
    for md_rows, table in zip(md_overviews, html_tables):
        head, *rows = md_rows
        assert head[1:] == table["head"]  # the same columns in the same order
        # html rows: backbone, family, params, then one cell per column
        assert [row[0] for row in rows] == [row[0] for row in table["rows"][1:]]
        assert [[_number(c) for c in row[1:]] for row in rows] == \
            [[_number(c) for c in row[3:]] for row in table["rows"][1:]]
    _, val = md_overviews
    # ranked by the first column; the two rows without a cell there follow by label ('<' sorts before 'd')
    assert [row[0] for row in val[1:]] == ["dino_vits16 @ aaaaaaaaaaaa", "pixels @ aaaaaaaaaaaa",
                                           f"{EVIL} @ aaaaaaaaaaaa", "dino_vitb16 @ aaaaaaaaaaaa"]
    assert [_number(c) for c in val[1][1:]] == ["30.0", None, "45.5"]


def test_a_hostile_name_is_escaped_on_every_html_page_and_literal_in_markdown(written):
    pages = sorted((written / "site").rglob("*.html"))
    showing = set()
    for path in pages:
        text = path.read_text()
        assert "<script>alert" not in text and EVIL not in text, path
        parsed = _Page(text)
        assert [s.get("src", "").rsplit("/", 1)[-1] for s in parsed.scripts] == ["board.js"], path
        if any(EVIL in t for t in ["".join(parsed.text), *parsed.values]):
            showing.add(path.relative_to(written / "site").as_posix())
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text, path
    evil_record = next(p for p in pages if p.parent.name == "records" and EVIL in "".join(_Page(p.read_text()).text))
    # shown as text on the dataset page (row, footnote, reported number), the index (best kmeans:stego) and its record
    assert {"voc.html", "index.html", f"records/{evil_record.name}"} <= showing
    voc = "".join(_Page((written / "site" / "voc.html").read_text()).text)
    assert f"{EVIL} @ aaaaaaaaaaaa" in voc and f"Paper {EVIL} ({EVIL})" in voc and f"it names {EVIL}" in voc
    # markdown: the md escapes of today ('<' '>' '&' as entities), so a renderer shows the name, never a tag
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;\"&amp;'"
    for name in ("voc.md", "README.md"):
        text = (written / name).read_text()
        assert "<script>" not in text and escaped in text, name
        rendered = MarkdownIt("commonmark", {"html": True}).enable("table").render(text)
        assert "<script>" not in rendered and EVIL in html.unescape(rendered), name
    page = (written / "voc.md").read_text()
    assert f"Paper {escaped} ({escaped})" in page and f"it names {escaped}" in page
