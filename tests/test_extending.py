"""docs/extending.md's claim, run: a protocol, a dataset and a backbone loader are each ONE new file and nothing else.

The three example files of docs/examples/ are dropped into a copy of the package (protocols/, data/, backbones/); with
no other edit the copy lists them, checks the dataset and runs the example protocol on the example dataset through the
example loader (its backbones.yaml entry is data, given with --registry). The protocol's number is checked against a
brute-force recomputation from the same patch means."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "examples"
PLACES = {"random_centroids.py": "protocols", "two_folders.py": "data", "patch_mean.py": "backbones"}
ENTRY = """backbones:
  - id: patchmean8
    loader: patch-mean
    repo_id: patch-mean
    revision: null
    revision_source: null
    family: baseline
    arch: mean colour per patch
    patch_size: 8
    embed_dim: 3
    num_layers: 1
    num_heads: 0
    num_prefix_tokens: 0
    image_size: 32
    mean: [0.5, 0.5, 0.5]
    std: [0.25, 0.25, 0.25]
    method: baseline
    paper: null
    license: n/a
"""


def _data(root: Path) -> Path:
    """Two-class images: a bright square (class 1, its size and place vary) on a dark background, 6 val images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for n in range(6):
            mask = np.zeros((32, 32), np.uint8)
            y, x, s = rng.integers(0, 12), rng.integers(0, 12), rng.integers(12, 20)
            mask[y: y + s, x: x + s] = 1
            img = np.where(mask[..., None] == 1, [230, 210, 40], [20, 30, 90]).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / split / f"{n}.jpg", quality=100)
            Image.fromarray(mask).save(root / "masks" / split / f"{n}.png")
    return root


def _cli(pkg: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pkg), "SSL_SEGBENCH_CACHE": str(cwd / "cache")}
    env.pop("SSL_SEGBENCH_REGISTRY", None)
    return subprocess.run([sys.executable, "-m", "ssl_segbench", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_each_example_plugin_is_one_file_and_runs(tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(REPO / "ssl_segbench", pkg / "ssl_segbench", ignore=shutil.ignore_patterns("__pycache__"))
    for name, folder in PLACES.items():
        assert not (pkg / "ssl_segbench" / folder / name).exists()
        shutil.copy(EXAMPLES / name, pkg / "ssl_segbench" / folder / name)
    (tmp_path / "reg.yaml").write_text(ENTRY)
    data = _data(tmp_path / "two")

    listed = _cli(pkg, "list", "protocols", cwd=tmp_path)
    assert listed.returncode == 0 and "random-centroids" in listed.stdout, listed.stderr[-2000:]
    listed = _cli(pkg, "list", "datasets", cwd=tmp_path)
    assert listed.returncode == 0 and "two-folders" in listed.stdout, listed.stderr[-2000:]
    checked = _cli(pkg, "datasets", "check", "--dataset", "two-folders", "--data-root", str(data), "--split", "val",
                   cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]

    ran = _cli(pkg, "run", "--backbone", "patchmean8", "--registry", str(tmp_path / "reg.yaml"), "--dataset",
               "two-folders", "--data-root", str(data), "--split", "val", "--protocol", "random-centroids",
               "--seeds", "0,1", "--size", "32", "--resize", "square", "--results-dir", str(tmp_path / "res"),
               "--device", "cpu", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    (record,) = (tmp_path / "res").rglob("*.json")
    rec = json.loads(record.read_text())
    assert rec["backbone"]["id"] == "patchmean8" and rec["protocol"]["name"] == "random-centroids"
    assert [s["miou"] for s in rec["per_seed"]] == [s["miou"] for s in _brute_force(data, seeds=(0, 1))]


def _brute_force(data: Path, seeds) -> list[dict]:
    """The example protocol by hand: 8×8 patch means of the normalised images, K = 2 random patch tokens (the
    protocol's draw) as centroids, cosine argmax per patch, bilinear upsampling of the scores, Hungarian on pixels."""
    import torch

    from ssl_segbench.metrics import confusion, match, remap, scores

    imgs, masks = [], []
    for n in range(6):
        x = np.asarray(Image.open(data / "images" / "val" / f"{n}.jpg").convert("RGB"), np.float32) / 255.0
        imgs.append(torch.from_numpy((x - 0.5) / 0.25).permute(2, 0, 1))
        masks.append(np.asarray(Image.open(data / "masks" / "val" / f"{n}.png"), np.int64))
    tokens = torch.nn.functional.avg_pool2d(torch.stack(imgs), 8).permute(0, 2, 3, 1)  # (6, 4, 4, 3)
    rows = tokens.reshape(-1, 3).to(torch.float16).float()  # the cache stores float16
    out = []
    for seed in seeds:
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), 2, replace=False))
        c = torch.nn.functional.normalize(rows[pick], dim=1)
        t = torch.nn.functional.normalize(rows.reshape(6, 4, 4, 3), dim=-1)
        s = torch.einsum("bhwd,kd->bkhw", t, c)  # all six images in one batch, as the protocol scores them
        pred = torch.nn.functional.interpolate(s, size=(32, 32), mode="bilinear", align_corners=False).argmax(1)
        conf = sum(confusion(masks[i], pred[i].numpy(), 2, 2) for i in range(6))
        out.append(scores(remap(conf, match(conf), 2)))
    return out


def test_the_line_counts_the_docs_give_are_the_files():
    """README and docs/extending.md state each example's length: they must be the files' own."""
    import re

    readme = (REPO / "README.md").read_text()
    table = (REPO / "docs" / "extending.md").read_text()
    for name in PLACES:
        n = len((EXAMPLES / name).read_text().splitlines())
        said = re.findall(rf"`(?:docs/examples/)?{re.escape(name)}`: (\d+) lines", readme)
        assert said == [str(n)], (name, said, n)
        row = next(line for line in table.splitlines() if line.startswith("|") and f"examples/{name}" in line)
        assert row.split("|")[4].strip() == str(n), (name, row)
