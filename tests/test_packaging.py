"""A built wheel carries its registry and the site's templates: installed into a fresh virtualenv, outside the
repository, `ssl-segbench list backbones`, a `pixels` run and an html leaderboard work (the heavy dependencies are
taken from the project's environment, not downloaded)."""
from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_wheel_installed_in_a_fresh_virtualenv_lists_and_runs(tmp_path, small_synthetic):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheels.glob("ssl_segbench-*.whl")
    with zipfile.ZipFile(wheel) as z:  # the site's templates ship with the package (an html board needs them)
        shipped = {Path(n).name for n in z.namelist() if n.startswith("ssl_segbench/templates/")}
    assert shipped == {f.name for f in (REPO / "ssl_segbench" / "templates").iterdir()}, shipped
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    # the project's dependencies, visible as a plain path entry (its editable finder is not activated by that)
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "project-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SSL_SEGBENCH_REGISTRY")}
    where = subprocess.run([str(py), "-c", "import ssl_segbench.registry as r; print(r.default_registry_path())"],
                           check=True, capture_output=True, text=True, cwd=tmp_path, env=env).stdout.strip()
    assert Path(where).is_file() and Path(where).is_relative_to(env_dir), where  # the wheel's own copy
    cli = env_dir / "bin" / "ssl-segbench"
    listed = subprocess.run([str(cli), "list", "backbones"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert listed.returncode == 0 and "dinov2_vits14" in listed.stdout, listed.stderr[-2000:]
    ran = subprocess.run([str(cli), "run", "--backbone", "pixels", "--dataset", "synthetic", "--data-root",
                          str(small_synthetic), "--size", "64", "--protocol", "kmeans", "--seeds", "1",
                          "--results-dir", str(tmp_path / "res")], capture_output=True, text=True, cwd=tmp_path,
                         env={**env, "SSL_SEGBENCH_CACHE": str(tmp_path / "cache")})
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert list((tmp_path / "res").rglob("*.json"))
    site_out = tmp_path / "board"
    board = subprocess.run([str(cli), "leaderboard", "--results-dir", str(tmp_path / "res"), "--out", str(site_out),
                            "--format", "html"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert board.returncode == 0, board.stderr[-2000:]
    assert "<table" in next(site_out.rglob("synthetic*.html")).read_text()
