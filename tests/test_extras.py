"""The light install (issue 23): `pip install ssl-segbench` without extras runs the core flow, and a feature whose
optional package is missing is refused through the CLI (exit 2) with the command that installs its extra, before any
backbone pass and with nothing written.

A missing package is simulated the way Python itself records one: `sys.modules[name] = None` makes `import name`
(and of its submodules) raise ImportError. The core run is replayed in a fresh process with every optional package
blocked that way from its first line, the in-suite version of the fresh-virtualenv check."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssl_segbench import runner
from ssl_segbench.cli import main
from ssl_segbench.extras import NOT_IN_ALL, OPTIONAL, MissingExtraError, require
from ssl_segbench.protocols import PROTOCOLS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ssl_segbench"


def _norm(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.match(r"[A-Za-z0-9._-]+", req).group(0))


def _block(monkeypatch, *tops: str) -> None:
    """Make `import top` and `import top.anything` fail for the test's duration, as if the package were absent."""
    for name in list(sys.modules):
        if name.partition(".")[0] in tops:
            monkeypatch.setitem(sys.modules, name, None)
    for top in tops:
        monkeypatch.setitem(sys.modules, top, None)


@pytest.fixture()
def no_backbone_pass(monkeypatch, tmp_path):
    """The test's own cache; any feature extraction fails the test."""
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runner, "extract", lambda *a, **k: pytest.fail("a backbone pass ran before the refusal"))


def _refused(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error:") and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def _run_args(tmp_path, data, protocol: str) -> list[str]:
    return ["run", "--backbone", "pixels", "--dataset", "synthetic", "--data-root", str(data), "--size", "64",
            "--protocol", protocol, "--seeds", "1", "--results-dir", str(tmp_path / "res")]


# --- each feature without its extra, through the CLI -----------------------------------------------------------------

@pytest.mark.parametrize("protocols, blocked, expected", [
    # the whole run is refused, not stopped after kmeans
    ("kmeans,leopart-cd", "infomap", "protocol 'leopart-cd' needs infomap"),
    ("leopart-cd", "skimage", "protocol 'leopart-cd' needs scikit-image"),
    ("datus", "sknetwork", "protocol 'datus' needs scikit-network"),
    ("datus", "sklearn", "protocol 'datus' needs scikit-learn"),
    ("maskdistill", "sklearn", "protocol 'maskdistill' needs scikit-learn"),
])
def test_a_pseudo_mask_protocol_without_its_extra_is_refused_while_planning(
        protocols, blocked, expected, small_synthetic, tmp_path, capsys, monkeypatch, no_backbone_pass):
    _block(monkeypatch, blocked)
    _refused(capsys, _run_args(tmp_path, small_synthetic, protocols), expected, "pip install 'ssl-segbench[pseudo]'",
             "or pip install 'ssl-segbench[all]' for every optional feature")
    assert not _files(tmp_path / "res") and not _files(tmp_path / "cache")


def test_crf_without_its_package_is_refused_while_planning_not_after_extraction(
        small_synthetic, tmp_path, capsys, monkeypatch, no_backbone_pass):
    _block(monkeypatch, "pydensecrf")
    _refused(capsys, [*_run_args(tmp_path, small_synthetic, "kmeans,linear"), "--crf"],
             "protocol 'kmeans' with crf=true (--crf) needs pydensecrf2", "pip install 'ssl-segbench[crf]'",
             "needs a C++ compiler, so 'ssl-segbench[all]' leaves it out")
    assert not _files(tmp_path / "res") and not _files(tmp_path / "cache")


def test_a_pseudo_mask_protocol_with_its_packages_is_not_refused_by_the_check(monkeypatch):
    """The planning check passes where the packages import (the protocol's own tests run it end to end), and
    blocking a package another protocol needs does not refuse this one."""
    _block(monkeypatch, "sknetwork")
    assert [p.name for p in runner.plan_protocols(("leopart-cd", "maskdistill"), None)] == ["leopart-cd",
                                                                                           "maskdistill"]
    with pytest.raises(MissingExtraError, match=r"protocol 'datus' needs scikit-network"):
        runner.plan_protocols(("datus",), None)


def test_sweep_on_slurm_without_submitit_is_refused_before_anything_starts(small_synthetic, tmp_path, capsys,
                                                                         monkeypatch, no_backbone_pass):
    _block(monkeypatch, "submitit")
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "res"), "backbones": ["pixels"],
                                    "datasets": {"syn": {"dataset": "synthetic", "data_root": str(small_synthetic)}},
                                    "protocols": ["kmeans"], "run": {"size": 64, "seeds": 1}}))
    _refused(capsys, ["sweep", str(grid), "--executor", "slurm"],
             "sweep --executor slurm needs submitit", "pip install 'ssl-segbench[slurm]'")
    assert not _files(tmp_path / "res")  # no sweep state, log or record


def test_leaderboard_site_and_plots_without_matplotlib_are_refused_csv_and_json_still_work(
        small_synthetic, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    assert main(_run_args(tmp_path, small_synthetic, "kmeans")) == 0
    (record,) = [json.loads(p.read_text()) for p in _files(tmp_path / "res")]
    _block(monkeypatch, "matplotlib")
    board = tmp_path / "board"
    for fmt in (["--format", "md"], ["--format", "html"], ["--plots"]):
        capsys.readouterr()
        _refused(capsys, ["leaderboard", "--results-dir", str(tmp_path / "res"), "--out", str(board), *fmt],
                 "plots and static site", "needs matplotlib", "pip install 'ssl-segbench[site]'")
        assert not _files(board)
    assert main(["leaderboard", "--results-dir", str(tmp_path / "res"), "--out", str(board), "--format", "json"]) == 0
    (row,) = json.loads((board / "leaderboard.json").read_text())
    assert row["miou_mean"] == round(record["metrics"]["miou"]["mean"], 6)
    assert main(["leaderboard", "--results-dir", str(tmp_path / "res"), "--out", str(board), "--format", "csv"]) == 0
    assert (board / "leaderboard.csv").read_text().count("\n") == 2  # header and the one record


# --- the core flow with every optional package absent ----------------------------------------------------------------

_BLOCKED_RUN = """
import sys
for name in {tops!r}:
    sys.modules[name] = None
from ssl_segbench.cli import main
code = main(sys.argv[1:])
loaded = sorted(n for n, m in sys.modules.items() if m is not None and n.partition(".")[0] in {tops!r})
print("optional modules loaded:", loaded)
sys.exit(code)
"""


def test_the_core_run_works_with_every_optional_package_absent_and_gives_the_same_number(
        small_synthetic, tmp_path, monkeypatch):
    """`run --backbone pixels --dataset synthetic --protocol kmeans` in a process where no optional package can be
    imported from its start (the fresh `pip install ssl-segbench` without extras); its metrics equal those of the
    same run with every package present."""
    tops = sorted(OPTIONAL)
    env = {**os.environ, "SSL_SEGBENCH_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    light = subprocess.run([sys.executable, "-c", _BLOCKED_RUN.format(tops=tops),
                            *_run_args(tmp_path / "light", small_synthetic, "kmeans")],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert light.returncode == 0, light.stderr[-3000:]
    assert "optional modules loaded: []" in light.stdout
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache-full"))
    assert main(_run_args(tmp_path / "full", small_synthetic, "kmeans")) == 0
    (a,), (b,) = ([json.loads(p.read_text()) for p in _files(tmp_path / d / "res")] for d in ("light", "full"))
    assert a["key"] == b["key"] and a["metrics"] == b["metrics"]


# --- one table, one mechanism ----------------------------------------------------------------------------------------

def _imports_and_requires(path: Path) -> tuple[set[str], set[str]]:
    """(top-level names imported by import statements, top-level names passed to `require`) in one module."""
    imported, required = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.partition(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require" and \
                isinstance(node.args[0], ast.Constant):  # the runner's require(module, ...) reads `requires`
            required.add(node.args[0].value.partition(".")[0])
    return imported, required


def test_optional_packages_are_imported_only_through_require_and_each_protocol_declares_its_own():
    scanned = {p: _imports_and_requires(p) for p in sorted(PACKAGE.rglob("*.py"))}
    direct = {str(p.relative_to(ROOT)): sorted(imp & set(OPTIONAL)) for p, (imp, _) in scanned.items()
              if imp & set(OPTIONAL)}
    assert not direct, f"import statements of optional packages (use extras.require): {direct}"
    assert set().union(*(req for _, req in scanned.values())) == set(OPTIONAL)  # every entry is used
    for name, cls in PROTOCOLS.items():
        path = Path(sys.modules[cls.__module__].__file__)
        assert set(cls.requires) == scanned[path][1], f"protocol '{name}': requires {cls.requires}"
    assert {n for n, cls in PROTOCOLS.items() if cls.requires} == {"leopart-cd", "datus", "maskdistill"}


def test_pyproject_extras_are_the_table_and_the_core_dependencies_cover_every_other_import():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps, extras = project["dependencies"], project["optional-dependencies"]
    core = {_requirement_name(r) for r in deps}
    by_extra: dict[str, set[str]] = {}
    for package, extra in OPTIONAL.values():
        by_extra.setdefault(extra, set()).add(_norm(package))
    for extra, packages in by_extra.items():
        assert {_requirement_name(r) for r in extras[extra]} == packages, extra
        assert not packages & core, f"{extra}: {packages & core} is also a core dependency"
    (everything,) = extras["all"]  # every extra but crf (built from source)
    name, _, listed = everything.rstrip("]").partition("[")
    assert name == "ssl-segbench" and set(listed.split(",")) == set(by_extra) - set(NOT_IN_ALL) == {
        "pseudo", "slurm", "site"}, everything
    pinned = {_norm(line.split("==")[0]) for line in (ROOT / "constraints.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    assert core | set().union(*by_extra.values()) <= pinned, "constraints.txt must pin every dependency"
    # every third-party module the package imports comes from a core dependency (optional ones through require)
    distributions = importlib.metadata.packages_distributions()
    third_party = set().union(*(imp for imp, _ in map(_imports_and_requires, PACKAGE.rglob("*.py"))))
    third_party -= {*sys.stdlib_module_names, "ssl_segbench"}
    missing = {top: distributions.get(top) for top in third_party
               if not {_norm(d) for d in distributions.get(top, [])} & core}
    assert not missing, f"imported but not a core dependency: {missing}"


def test_require_returns_the_module_or_names_the_feature_package_and_extra(monkeypatch):
    import skimage.measure

    assert require("skimage.measure", "a feature") is skimage.measure
    _block(monkeypatch, "skimage")
    with pytest.raises(MissingExtraError) as caught:
        require("skimage.measure", "protocol 'x'")
    assert str(caught.value).startswith("protocol 'x' needs scikit-image, which cannot be imported here")
    assert "pip install 'ssl-segbench[pseudo]'" in str(caught.value)
    with pytest.raises(KeyError):  # a package outside the table is a bug in the caller, not a missing extra
        require("numpy", "a feature")
