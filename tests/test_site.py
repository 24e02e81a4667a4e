"""The static leaderboard site: byte-stable, self-contained, and working in a real headless Chromium (sorting,
filtering, images, links, no console errors); the rank-agreement statistic against a brute-force Kendall τ."""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

from ssl_segbench.atomic import write_json_atomic
from ssl_segbench.leaderboard import write
from ssl_segbench.plots import kendall_tau, rank_agreement
from ssl_segbench.records import SCHEMA, Record
from ssl_segbench.setting import Setting

BACKBONES = {"dino_vits16": 0.30, "dinov2_vits14": 0.45, "dinov2_vitb14": 0.50, "pixels": 0.10}


def _rec(backbone: str, miou: float, protocol: str, k: int | None = None, crf: bool = False) -> Record:
    from ssl_segbench.protocols import get_protocol

    proto = get_protocol(protocol, crf=crf)
    params = dict(proto.params, resize=proto.params["resize"] or "shorter", size=proto.params["size"] or 224)
    ident = {"backbone": backbone, "source": backbone, "revision": "a" * 40, "dataset": "voc", "split": "val",
             "content_sha256": "f" * 64, "protocol": proto.name, "version": proto.version, "params": params,
             "layer": -1, "seeds": [0, 1]}
    m = {"mean": miou, "std": 0.01, "per_seed": [miou - 0.01, miou + 0.01], "ci95": [miou - 0.03, miou + 0.03]}
    return Record.from_json({
        "schema": SCHEMA, "key": Setting.of_identity(ident).key, "identity": ident,
        "backbone": {"id": backbone, "revision_resolved": "a" * 40, "layer": -1},
        "dataset": {"n_images": 10, "class_names": ["background", "cat", "dog"]},
        "protocol": {"name": proto.name, "version": proto.version, "preset": proto.preset, "params": params},
        "seeds": [0, 1], "info": {"k": k} if k else {}, "provenance": {"device": "cpu", "wall_seconds": 1.5},
        "metrics": {"miou": m, "pixel_acc": m, "mf1": m, "per_class_iou": [miou, miou / 2, miou / 3]}})


def _records() -> list[Record]:
    out = []
    for b, base in BACKBONES.items():
        out.append(_rec(b, base, "kmeans", k=21))
        out.append(_rec(b, base + 0.2, "linear"))
        out.append(_rec(b, {"dino_vits16": 0.6, "dinov2_vits14": 0.5, "dinov2_vitb14": 0.7, "pixels": 0.2}[b],
                        "retrieval"))
        if b != "pixels":
            out.append(_rec(b, base + 0.01, "kmeans", k=21, crf=True))
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    for r in _records():
        write_json_atomic(root / "res" / f"{r.key}.json", r.to_json())
    written, problems = write(root / "res", root / "lb", "html")
    assert not problems and written
    return root


def test_the_site_is_byte_stable_and_self_contained(site, tmp_path):
    first = {p.relative_to(site / "lb"): p.read_bytes() for p in (site / "lb" / "site").rglob("*") if p.is_file()}
    write(site / "res", tmp_path / "again", "html")
    again = {p.relative_to(tmp_path / "again"): p.read_bytes() for p in (tmp_path / "again" / "site").rglob("*")
             if p.is_file()}
    assert first == again
    for path, data in first.items():  # nothing is fetched at view time: no URL in pages, styles and scripts
        if path.suffix in (".html", ".css", ".js"):
            assert "http://" not in data.decode() and "https://" not in data.decode(), path
        if path.suffix == ".svg":  # XML namespaces are names, not fetches; no external reference though
            assert 'href="http' not in data.decode(), path
    assert {"site/index.html", "site/voc.html", "site/plots/voc_rank.svg"} <= {p.as_posix() for p in first}


def test_rank_agreement_is_kendall_tau_over_the_shared_backbones():
    labels, tau, ci = rank_agreement(_records())
    cols = {lab.split(" · ")[0] for lab in labels}
    assert {"kmeans v1", "linear v1", "retrieval v1"} <= cols
    i, j = (next(n for n, lab in enumerate(labels) if lab.startswith(p)) for p in ("kmeans v1", "retrieval v1"))
    order = sorted(BACKBONES)
    a = [BACKBONES[b] for b in order]
    b = [{"dino_vits16": 0.6, "dinov2_vits14": 0.5, "dinov2_vitb14": 0.7, "pixels": 0.2}[x] for x in order]
    concordant = sum(np.sign(a[p] - a[q]) * np.sign(b[p] - b[q]) for p, q in itertools.combinations(range(4), 2))
    assert tau[i, j] == pytest.approx(concordant / 6)  # no ties: τ = (C − D) / pairs, here 4/6
    assert ci[i, j, 0] <= tau[i, j] <= ci[i, j, 1]
    assert kendall_tau([1, 2, 3], [1, 2, 3])[0] == 1.0


@pytest.fixture(scope="module")
def browser():
    from browser import chromium

    if not (shutil.which("chromium") and shutil.which("chromedriver")) and os.geteuid() == 0 \
            and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], env=env,
                       capture_output=True)
    driver = chromium()
    if driver is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("chromium / chromedriver are not installed and cannot be installed here")
    yield driver
    driver.quit()


def _errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_the_site_in_a_real_browser(site, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get((site / "lb" / "site" / "index.html").as_uri())
    assert "ssl-segbench leaderboards" in browser.title and not _errors(browser)
    browser.find_element(By.LINK_TEXT, "voc").click()
    assert browser.current_url.endswith("voc.html") and not _errors(browser)
    table = browser.find_element(By.CSS_SELECTOR, "table.board")

    def backbones():
        return [td.get_attribute("data-value") for td in table.find_elements(By.CSS_SELECTOR,
                                                                             'tbody tr td[data-col="backbone"]')
                if td.is_displayed()]

    # the retrieval column, sorted by its numbers (descending on the first click, then ascending)
    header = next(th for th in table.find_elements(By.CSS_SELECTOR, "th.setting")
                  if th.get_attribute("data-protocol") == "retrieval")
    header.click()
    ret = {"dino_vits16": 0.6, "dinov2_vits14": 0.5, "dinov2_vitb14": 0.7, "pixels": 0.2}
    expect = sorted(ret, key=lambda b: -ret[b])
    assert [b.split(" @ ")[0] for b in backbones()] == expect
    header.click()
    assert [b.split(" @ ")[0] for b in backbones()] == expect[::-1]
    # a filter on an axis hides exactly the columns whose axis differs
    Select(browser.find_element(By.CSS_SELECTOR, 'select[data-axis="crf"]')).select_by_value("off")
    hidden = [th.get_attribute("data-crf") for th in table.find_elements(By.CSS_SELECTOR, "th.setting")
              if not th.is_displayed()]
    shown = [th.get_attribute("data-crf") for th in table.find_elements(By.CSS_SELECTOR, "th.setting")
             if th.is_displayed()]
    assert hidden and all(v != "off" for v in hidden) and shown and all(v == "off" for v in shown)
    Select(browser.find_element(By.CSS_SELECTOR, 'select[data-axis="family"]')).select_by_value("dinov2")
    assert sorted(b.split(" @ ")[0] for b in backbones()) == ["dinov2_vitb14", "dinov2_vits14"]
    # every image loads and every link resolves to a file of the site
    for img in browser.find_elements(By.TAG_NAME, "img"):
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img), \
            img.get_attribute("src")
    for a in browser.find_elements(By.TAG_NAME, "a"):
        target = Path(unquote(urlparse(a.get_attribute("href")).path))
        assert target.is_file(), target
    shot = tmp_path / "voc.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000 and not _errors(browser)


def test_the_committed_demo_site_loads_with_its_thumbnails(browser):
    """The demo's site as committed (`make demo` regenerates it): no console errors, and every image (plots and the
    `show` thumbnails) and every link resolves."""
    from selenium.webdriver.common.by import By

    root = Path(__file__).resolve().parents[1] / "leaderboards" / "site"
    for page in ("index.html", "synthetic.html"):
        browser.get((root / page).as_uri())
        assert not _errors(browser), page
        images = browser.find_elements(By.TAG_NAME, "img")
        for img in images:
            assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img), \
                img.get_attribute("src")
        for a in browser.find_elements(By.TAG_NAME, "a"):
            assert Path(unquote(urlparse(a.get_attribute("href")).path)).is_file(), a.get_attribute("href")
    assert any("figures/" in img.get_attribute("src") for img in images)  # the show grids as thumbnails
    assert "Synthetic demo data" in browser.page_source
