"""The Makefile's install and test targets and .ci/run, run for real with stand-ins for the slow parts.

`make install` runs against a virtualenv whose `python` is a stub that logs its arguments (pip does nothing), except
for the CPU index probe, which the real interpreter runs against a local HTTP server (reachable) or a closed port
(unreachable). .ci/run runs with a `make` stub on PATH. No network, no real install.
"""
from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["[1/5] virtualenv", "[2/5] upgrading pip", "[3/5] torch + torchvision", "[4/5] the package",
         "[5/5] optional: pydensecrf2"]

# Logs each call; pip succeeds silently unless FAIL_PIP is in its arguments; the CPU index probe runs for real;
# torch's installed version is $FAKE_TORCH, or 2.14.1+cpu once pip has installed it from an --index-url.
_STUB = """#!/bin/sh
echo "$*" >> "$LOG"
case "$*" in
  *urllib*) exec {python} "$@" ;;
  *importlib.metadata*)
    if [ -n "$FAKE_TORCH" ]; then echo "$FAKE_TORCH"; exit 0; fi
    if [ -f "$LOG.torch" ]; then echo 2.14.1+cpu; exit 0; fi
    exit 1 ;;
  *"-m pip install"*"--index-url"*) touch "$LOG.torch" ;;
esac
case "$*" in *"$FAIL_PIP"*) [ -n "$FAIL_PIP" ] && echo "ERROR: No matching distribution (stub)" >&2 && exit 1 ;; esac
exit 0
"""


def _make_env(**extra) -> dict:
    """The environment without an outer make's flags, a TORCH choice or a proxy (the index stand-in is local)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "TORCH") and not k.lower().endswith("_proxy")}
    return {**env, "FAKE_TORCH": "", "FAIL_PIP": "", **extra}


@pytest.fixture()
def venv(tmp_path) -> Path:
    """A virtualenv folder whose python is the logging stub (so step 1 finds it and creates nothing)."""
    root = tmp_path / "venv"
    (root / "bin").mkdir(parents=True)
    stub = root / "bin" / "python"
    stub.write_text(_STUB.format(python=sys.executable))
    stub.chmod(0o755)
    return root


def _install(venv: Path, *args, **env):
    log = venv.parent / "calls.log"
    proc = subprocess.run(["make", "install", f"VENV={venv}", *args], capture_output=True, text=True, cwd=REPO,
                          env=_make_env(LOG=str(log), **env))
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, calls


def _pip_installs(calls):
    return [c for c in calls if c.startswith("-m pip install")]


@pytest.fixture()
def cpu_index(tmp_path):
    """A reachable stand-in for the PyTorch CPU index (a local HTTP server with a torch/ page)."""
    root = tmp_path / "index"
    (root / "whl" / "cpu" / "torch").mkdir(parents=True)
    (root / "whl" / "cpu" / "torch" / "index.html").write_text("<html></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    server.shutdown()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/whl/cpu"


def test_default_install_prints_each_step_before_it_and_keeps_pip_quiet(venv):
    proc, calls = _install(venv)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    positions = [out.index(step) for step in STEPS]
    assert positions == sorted(positions), out
    assert re.search(r"make install: into .*about 9 minutes and 6\.5 GB", out), out
    assert "TORCH=cpu" in out  # the CPU option is named where the 6.5 GB is
    pips = _pip_installs(calls)
    assert [c.split(" -e ")[-1] for c in pips if " -e " in c] == [".[all,test]", ".[crf]"], pips
    assert all(c.startswith("-m pip install -qq ") for c in pips), pips
    assert not [c for c in pips if "--index-url" in c], pips  # the default wheels
    assert (venv / ".installed").is_file()
    assert "make install: done" in out and str(venv) in out.splitlines()[-1]


def test_cpu_install_takes_torch_and_torchvision_alone_from_a_reachable_cpu_index_first(venv, cpu_index):
    proc, calls = _install(venv, "TORCH=cpu", f"TORCH_CPU_INDEX={cpu_index}")
    assert proc.returncode == 0, proc.stderr
    pips = _pip_installs(calls)
    assert pips[1] == f"-m pip install -qq -c constraints.txt --no-deps --index-url {cpu_index} torch torchvision", pips
    assert pips[2].endswith('-e .[all,test]'), pips  # their dependencies from the usual index, after them
    assert "installed torch 2.14.1+cpu" in proc.stdout
    assert "and 2 GB (CPU-only torch)" in proc.stdout and "cannot be reached" not in proc.stdout


def test_cpu_install_falls_back_to_the_default_wheels_with_a_line_when_the_index_is_unreachable(venv):
    url = _closed_port_url()
    proc, calls = _install(venv, "TORCH=cpu", f"TORCH_CPU_INDEX={url}")
    assert proc.returncode == 0, proc.stderr
    assert f"note: {url} cannot be reached from here: the default torch wheels" in proc.stdout
    assert any("urllib" in c and url in c for c in calls)  # it did probe that index
    pips = _pip_installs(calls)
    assert not [c for c in pips if "--index-url" in c], pips
    assert pips[-2].endswith("-e .[all,test]") and (venv / ".installed").is_file()


def test_cpu_install_keeps_a_torch_already_in_the_virtualenv_and_says_so(venv, cpu_index):
    proc, calls = _install(venv, "TORCH=cpu", f"TORCH_CPU_INDEX={cpu_index}", FAKE_TORCH="2.14.1")
    assert proc.returncode == 0, proc.stderr
    assert f"note: {venv} already has torch 2.14.1: kept (make clean first" in proc.stdout
    assert not [c for c in _pip_installs(calls) if "--index-url" in c]


def test_an_unknown_torch_flavour_is_refused_before_anything_runs(venv):
    proc, calls = _install(venv, "TORCH=cu126")
    assert proc.returncode != 0
    assert "TORCH=cu126 is not an option: use TORCH=cpu" in proc.stderr
    assert calls == [] and not (venv / ".installed").exists()


def test_a_pip_error_is_shown_and_stops_the_install_but_a_failed_crf_build_does_not(venv):
    proc, _ = _install(venv, FAIL_PIP=".[all,test]")
    assert proc.returncode != 0
    assert "ERROR: No matching distribution (stub)" in proc.stderr
    assert "[5/5]" not in proc.stdout and not (venv / ".installed").exists()
    proc, _ = _install(venv, FAIL_PIP=".[crf]")
    assert proc.returncode == 0, proc.stderr
    assert "note: pydensecrf2 could not be built here; everything works except --crf" in proc.stdout
    assert (venv / ".installed").is_file()


def _test_commands(venv: Path, target: str) -> list[str]:
    """The pytest arguments `make TARGET` runs, with install already done."""
    (venv / ".installed").touch()
    log = venv.parent / "calls.log"
    proc = subprocess.run(["make", target, f"VENV={venv}"], capture_output=True, text=True, cwd=REPO,
                          env=_make_env(LOG=str(log)))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"about \d+ minutes on a quiet 2-core machine \(about \d+ on a busy one\)", proc.stdout), \
        proc.stdout
    return log.read_text().splitlines()


def test_make_test_leaves_out_the_slow_marker_and_lists_skip_reasons(venv):
    assert _test_commands(venv, "test") == ["-m pytest -q -rs -m not slow"]


def test_make_test_slow_runs_only_the_slow_marker(venv):
    assert _test_commands(venv, "test-slow") == ["-m pytest -q -rs -m slow"]


def _readme_test_command() -> str:
    """The README's test command: the first `make test…` command of its first code block, comment dropped."""
    block = REPO.joinpath("README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [ln.split("#", 1)[0].strip() for ln in block.splitlines()]
    return next(c for c in commands if c.split()[:2] == ["make", "test"])


@pytest.mark.parametrize("first_fails", [False, True])
def test_ci_runs_the_readmes_test_command_then_the_slow_tests_and_fails_if_either_does(tmp_path, first_fails):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "make.log"
    # make logs its arguments and fails for `test` when asked; the Debian tools are present so nothing is installed
    (bin_dir / "make").write_text(f'#!/bin/sh\necho "make $*" >> {log}\n'
                                  f'[ "$*" = test ] && [ "{int(first_fails)}" = 1 ] && exit 3\nexit 0\n')
    for tool in ("make", "slurmctld", "munged", "chromedriver"):
        (bin_dir / tool).touch()
        (bin_dir / tool).chmod(0o755)
    path = f"{bin_dir}:{os.path.dirname(shutil.which('bash'))}:/usr/bin:/bin"
    proc = subprocess.run(["bash", str(REPO / ".ci" / "run")], capture_output=True, text=True,
                          env={**_make_env(), "PATH": path})
    assert log.read_text().splitlines() == [_readme_test_command(), "make test-slow"], proc.stderr
    assert proc.returncode == (3 if first_fails else 0), proc.stderr
