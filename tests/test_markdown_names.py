"""Names from data in the leaderboard (issue 19): a backbone id or class name holding '|', raw HTML and a newline keeps
every markdown table's column count and its mIoU cell (rendered by markdown-it-py's GFM tables, an independent
parser), no raw HTML reaches the `.md` files, and an `hf:` dataset's page has a file name without a colon that the
markdown summary and the site's index both link to."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from markdown_it import MarkdownIt

from ssl_segbench.cli import main
from ssl_segbench.leaderboard import md
from ssl_segbench.records import SCHEMA
from ssl_segbench.setting import Setting

EVIL = "evil|net <img onerror=x>\nline2 & [x](y) `z` \\"
CLASS = "sea|floor <img onerror=x>\n$\\frac{$"  # and an unbalanced formula for matplotlib
DATASET = "hf:me/clean"


def _record(backbone: str, per_seed: list[float]) -> dict:
    params = {"k": 3, "resize": "shorter", "size": 64, "matching": "hungarian-pixels", "eval_size": None}
    ident = {"backbone": backbone, "source": backbone, "revision": None, "dataset": DATASET, "split": "test",
             "content_sha256": "f" * 64, "protocol": "kmeans", "version": "1", "params": params, "layer": -1,
             "seeds": list(range(len(per_seed)))}
    m = {"mean": float(np.mean(per_seed)), "std": float(np.std(per_seed)), "per_seed": per_seed}
    return {"schema": SCHEMA, "key": Setting.of_identity(ident).key, "identity": ident,
            "backbone": {"id": backbone, "revision_resolved": None, "layer": -1},
            "dataset": {"n_images": 4, "class_names": ["background", CLASS, "rock"]},
            "protocol": {"name": "kmeans", "version": "1", "preset": None, "params": params},
            "seeds": ident["seeds"], "info": {"k": 3}, "metrics": {"miou": m, "pixel_acc": m, "mf1": m,
                                                                    "per_class_iou": [0.5, 0.4, 0.3]}}


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    for rec in (_record(EVIL, [0.40, 0.44]), _record("plain_net", [0.30, 0.32])):
        path = root / "res" / f"{rec['key']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
    assert main(["leaderboard", "--results-dir", str(root / "res"), "--out", str(root / "lb"), "--plots"]) == 0
    return root / "lb"


def _tables(text: str) -> list[list[list[str]]]:
    """Each table of a markdown text as rows of cell texts (header first), as markdown-it-py's GFM tables parse it,
    with raw HTML allowed through so that any unescaped tag would appear as a tag."""
    rendered = MarkdownIt("commonmark", {"html": True}).enable("table").render(text)
    out = []
    for table in re.findall(r"<table>(.*?)</table>", rendered, re.S):
        rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
        out.append([[html.unescape(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)] for row in rows])
    return out


def _dataset_page(board: Path) -> Path:
    (page,) = (p for p in board.glob("*.md") if p.name != "README.md")
    return page


def test_md_escapes_every_character_that_changes_markdown():
    assert md("a|b") == "a\\|b" and md("<img>") == "&lt;img&gt;" and md("x\ny\rz") == "x y z"
    assert md("[l](u)") == "\\[l\\](u)" and md("`c`") == "\\`c\\`" and md("a\\|b") == "a\\\\\\|b"
    assert md("R&D") == "R&amp;D" and md("dinov2_vits14 @ builtin") == "dinov2_vits14 @ builtin"


def test_a_hostile_backbone_name_keeps_the_tables_and_their_miou_cells(board):
    text = _dataset_page(board).read_text()
    assert "<img" not in text and "\nline2" not in text  # no raw HTML, the newline did not end a row or heading
    tables = _tables(text)
    assert len(tables) == 2  # the overview and the column's ranking
    shown = EVIL.replace("\n", " ") + " @ builtin"
    for rows in tables:
        assert len({len(row) for row in rows}) == 1, rows  # every row has the header's column count
    overview, ranking = tables
    # the records hold a handful of images: their cells carry ⚠, and the ranking says why
    assert overview[1] == [shown, "42.0 ⚠"] and overview[2] == ["plain_net @ builtin", "31.0 ⚠"]
    header = ranking[0]
    assert header[:3] == ["#", "backbone @ revision", "mIoU"]
    assert ranking[1][1] == shown and ranking[1][2] == "42.0 ± 2.0"
    summary = (board / "README.md").read_text()
    assert "<img" not in summary
    (rows,) = _tables(summary)
    assert len({len(row) for row in rows}) == 1 and [shown, "42.0 ⚠"] in rows


def test_an_hf_dataset_page_has_no_colon_and_every_link_resolves(board):
    pages = sorted(p.name for p in board.glob("*.md"))
    assert len(pages) == 2 and not any(":" in p for p in pages)
    assert not [p for p in board.rglob("*") if ":" in p.name]  # plots and site too: Windows-safe checkouts
    summary = (board / "README.md").read_text()
    rendered = MarkdownIt("commonmark").render(summary)
    links = re.findall(r'href="([^"]+)"', rendered)
    assert links and all(urlparse(html.unescape(h)).scheme == "" and (board / unquote(html.unescape(h))).is_file()
                         for h in links)
    page = _dataset_page(board)
    assert page.name.startswith("hf_me_clean-")
    for img in re.findall(r'src="([^"]+)"', MarkdownIt("commonmark").render(page.read_text())):
        assert (board / unquote(html.unescape(img))).is_file(), img  # --plots images
    site = board / "site"
    for name in ("index.html", page.with_suffix(".html").name):
        hrefs = re.findall(r'(?:href|src)="([^"]+)"', (site / name).read_text())
        assert hrefs
        for h in hrefs:
            h = html.unescape(h)
            assert urlparse(h).scheme == "" and (site / unquote(h)).is_file(), h
    assert f'href="{page.with_suffix(".html").name}"' in (site / "index.html").read_text()
    assert html.escape(DATASET) in (site / "index.html").read_text()  # the name itself is still shown


def test_the_site_shows_the_same_names_escaped(board):
    page = (board / "site" / _dataset_page(board).with_suffix(".html").name).read_text()
    assert html.escape(EVIL.split("\n")[0]) in page
    for p in (board / "site").rglob("*.html"):
        assert "<img onerror" not in p.read_text(), p
