"""Numbers that are not comparable as they stand are flagged wherever they are shown (the run's console table, the
markdown, the site, `compare`), from the record alone: a probe fit on the evaluation images, many-to-one matching with
few tokens per cluster, a single seed (its spread reads '—', not '± 0.0'), a small evaluation set."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from ssl_segbench.data.synthetic import generate_synthetic
from ssl_segbench.pages import fmt_metric
from ssl_segbench.records import MIN_POINTS_PER_CLUSTER, Record

EVAL_IMAGES = "8 evaluation images (under 100)"
ON_EVAL = "fit on the evaluation images (no train split)"
ONE_SEED = "1 seed (no spread)"


def _cli(tmp_path, *args) -> str:
    env = {**os.environ, "SSL_SEGBENCH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
    proc = subprocess.run([sys.executable, "-m", "ssl_segbench", *args], env=env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return " ".join(proc.stdout.split())


def test_each_caveat_reaches_the_console_the_markdown_the_site_and_compare(tmp_path):
    with_train = generate_synthetic(tmp_path / "syn", n_train=4, n_test=8, seed=5)
    no_train = shutil.copytree(with_train, tmp_path / "syn_eval_only")
    shutil.rmtree(no_train / "train_val")
    common = ["run", "--dataset", "synthetic", "--size", "64", "--results-dir", str(tmp_path / "res")]
    # 8 images of 4×4 tokens = 128 fitted tokens for K=40: 3.2 per cluster; the linear probe has no train split
    console = _cli(tmp_path, *common, "--backbone", "pixels", "--data-root", str(no_train), "--protocol",
                   "linear,overcluster", "--param", "overcluster.k=40", "--param", "linear.epochs=2", "--seeds", "1")
    assert ON_EVAL in console and "many-to-one with 3.2 tokens per cluster (K=40" in console
    assert ONE_SEED in console and EVAL_IMAGES in console and "± —" in console and "± 0.00" not in console
    # a well-posed column of the same data: two seeds, a train split; only the small evaluation set is flagged
    _cli(tmp_path, *common, "--backbone", "pixels", "--data-root", str(with_train), "--protocol", "linear",
         "--param", "linear.epochs=2", "--seeds", "2")
    _cli(tmp_path, *common, "--backbone", "random_vits16", "--data-root", str(with_train), "--protocol", "linear",
         "--param", "linear.epochs=2", "--seeds", "2")
    recs = {(r["backbone"]["id"], r["protocol"]["name"], len(r["seeds"])): Record.from_json(r) for r in
            (json.loads(p.read_text()) for p in (tmp_path / "res").rglob("*.json"))}
    assert recs[("pixels", "linear", 2)].caveats() == [EVAL_IMAGES]
    assert recs[("pixels", "linear", 1)].caveats() == [ON_EVAL, ONE_SEED, EVAL_IMAGES]

    _cli(tmp_path, "leaderboard", "--results-dir", str(tmp_path / "res"), "--out", str(tmp_path / "lb"))
    page = (tmp_path / "lb" / "synthetic.md").read_text()
    sections = {s.split("\n", 1)[0]: s for s in page.split("### ")[1:]}
    eval_only = next(s for h, s in sections.items() if h.startswith("linear") and "train: the evaluation" in h)
    overcl = next(s for h, s in sections.items() if h.startswith("overcluster"))
    trained = next(s for h, s in sections.items() if h.startswith("linear") and "train: train ·" in h)
    assert f"{ON_EVAL}; {ONE_SEED}; {EVAL_IMAGES}" in eval_only and "± —" in eval_only
    assert "many-to-one with 3.2 tokens per cluster" in overcl
    assert ON_EVAL not in trained and ONE_SEED not in trained and EVAL_IMAGES in trained and "± —" not in trained
    assert " ⚠" in sections["Overview: mIoU (%)"]
    html = (tmp_path / "lb" / "site" / "synthetic.html").read_text()
    assert html.count(f"⚠ {ON_EVAL}") == 1 and "many-to-one with 3.2 tokens per cluster" in html
    assert html.count("± —") == 2  # the two single-seed records
    compared = _cli(tmp_path, "compare", "pixels", "random_vits16", "--results-dir", str(tmp_path / "res"))
    assert f"⚠ {EVAL_IMAGES}" in compared


def test_many_to_one_is_flagged_below_the_stated_tokens_per_cluster_only():
    def rec(points, k, matching="many-to-one"):
        r = Record.__new__(Record)
        r.info, r.seeds, r.dataset = {"k": k, "fit_points": points}, [0, 1], {"n_images": 1000}
        r.protocol, r.identity = {"params": {"matching": matching}, "preset": None}, {
            "backbone": "b", "source": "b", "revision": None, "dataset": "d", "split": "s", "content_sha256": "c",
            "protocol": "overcluster", "version": "1", "params": {}, "layer": -1, "seeds": [0, 1]}
        return r.caveats()

    assert rec(99 * 500, 500) == ["many-to-one with 99.0 tokens per cluster (K=500; under 100)"]
    assert rec(MIN_POINTS_PER_CLUSTER * 500, 500) == []
    assert rec(10, 5, matching="hungarian-iou") == []  # one-to-one matching cannot label tokens one by one


def test_a_single_seed_has_no_spread():
    assert fmt_metric({"mean": 0.5, "std": 0.0, "per_seed": [0.5]}) == "50.0 ± —"
    assert fmt_metric({"mean": 0.5, "std": 0.0, "per_seed": [0.5, 0.5]}) == "50.0 ± 0.0"
