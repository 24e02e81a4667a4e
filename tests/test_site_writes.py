"""Leaderboard writes (issue 19): a full disk ends in a one-line error with the old site intact and nothing torn; the
site is swapped in whole, a failed build keeps the old one and leaves no temporary folder, and the leftovers of a
killed build are removed by the next run."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import numpy as np
import pytest

from ssl_segbench.atomic import WriteError
from ssl_segbench.cli import main
from ssl_segbench.records import SCHEMA
from ssl_segbench.setting import Setting
from ssl_segbench.site import write_site


def _results(root):
    for backbone, per_seed in (("net_a", [0.40, 0.44]), ("net_b", [0.30, 0.32])):
        params = {"k": 3, "resize": "shorter", "size": 64, "matching": "hungarian-pixels", "eval_size": None}
        ident = {"backbone": backbone, "source": backbone, "revision": None, "dataset": "suim", "split": "test",
                 "content_sha256": "f" * 64, "protocol": "kmeans", "version": "1", "params": params, "layer": -1,
                 "seeds": [0, 1]}
        m = {"mean": float(np.mean(per_seed)), "std": float(np.std(per_seed)), "per_seed": per_seed}
        rec = {"schema": SCHEMA, "key": Setting.of_identity(ident).key, "identity": ident,
               "backbone": {"id": backbone, "revision_resolved": None, "layer": -1}, "dataset": {"n_images": 4},
               "protocol": {"name": "kmeans", "version": "1", "preset": None, "params": params}, "seeds": [0, 1],
               "info": {"k": 3}, "metrics": {"miou": m, "pixel_acc": m, "mf1": m}}
        path = root / "res" / f"{rec['key']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
    return root / "res"


def _tree(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_full_disk_is_a_one_line_error_and_the_old_leaderboard_stays_whole(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse any write past 3 kB (EFBIG): the first page that large fails."""
    res, out = _results(tmp_path), tmp_path / "lb"
    assert main(["leaderboard", "--results-dir", str(res), "--out", str(out)]) == 0
    before = _tree(out)
    assert max(len(b) for b in before.values()) > 3000  # the limit really bites
    sorted(res.glob("*.json"))[0].unlink()  # a changed result: a finished run would change every page

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    proc = subprocess.run([sys.executable, "-m", "ssl_segbench", "leaderboard", "--results-dir", str(res), "--out",
                           str(out)], capture_output=True, text=True, preexec_fn=limit, cwd=tmp_path)
    err = " ".join(proc.stderr.split())  # one message (rich may wrap it), not a traceback
    assert proc.returncode == 2 and "Traceback" not in err and err.count("error:") == 1, err
    assert err.startswith("error: could not write the site") and str(out / "site") in err
    assert "File too large" in err and "Nothing half-written was kept" in err
    assert _tree(out) == before  # every page as it was: the site whole, the markdown untouched
    assert sorted(p.name for p in tmp_path.joinpath("lb").iterdir()) == ["README.md", "site", "suim.md"]


def test_a_failed_build_keeps_the_old_site_and_leaves_no_temporary_folder(tmp_path):
    site = tmp_path / "site"
    write_site({"index.html": b"old", "a/b.html": b"old b"}, site)
    # 'x' is a file, so 'x/y' cannot be created: a real OSError in the middle of the build
    with pytest.raises(WriteError, match=f"could not write the site {site}"):
        write_site({"index.html": b"new", "x": b"1", "x/y": b"2"}, site)
    assert _tree(site) == {"a/b.html": b"old b", "index.html": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_the_new_site_replaces_the_old_one_exactly(exchange, tmp_path, monkeypatch):
    """With the atomic exchange (Linux, which these tests run on) and with the fallback of two renames (where
    renameat2 is missing)."""
    from ssl_segbench import atomic

    real, used = atomic._exchange, []

    def exchange_or_not(a, b):
        used.append(real(a, b) if exchange else False)
        return used[-1]

    monkeypatch.setattr(atomic, "_exchange", exchange_or_not)
    site = tmp_path / "site"
    write_site({"index.html": b"old", "gone.html": b"stale"}, site)
    inode = site.stat().st_ino
    assert write_site({"index.html": b"new"}, site) == [site / "index.html"]
    assert _tree(site) == {"index.html": b"new"} and site.stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"] and used == [exchange]


def test_leftovers_of_a_killed_build_are_removed_by_the_next_run(tmp_path):
    site = tmp_path / "site"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs: its build was killed
    for name in (f"site.tmp-{dead.pid}", "site.tmp", f"site.old-{dead.pid}"):
        (tmp_path / name / "plots").mkdir(parents=True)
        (tmp_path / name / "plots" / "half.svg").write_bytes(b"<svg")
    running = tmp_path / f"site.tmp-{os.getppid()}"  # a live process: a build still running is left alone
    running.mkdir()
    (tmp_path / "site.tmpl").mkdir()  # not ours
    write_site({"index.html": b"new"}, site)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site", running.name, "site.tmpl"]
    assert _tree(site) == {"index.html": b"new"}
