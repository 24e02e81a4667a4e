"""Issue 21, the first hour: `list backbones` fits an 80-column terminal with every id whole, --wide and piped output
cut nothing, csv/json carry every field; `--dataset` defaults to synthetic; `--help` and `list` import no model
library; the libraries' own progress bars and warnings stay out of a run's output."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import yaml
from rich.console import Console
from test_refusals import _dinov2_dir, _run_args

from ssl_segbench.cli import build_parser, main
from ssl_segbench.progress import _LIBRARY_QUIET, quiet_libraries
from ssl_segbench.records import iter_records
from ssl_segbench.registry import default_registry_path

HEAVY = ("torch", "timm", "transformers", "faiss", "pandas", "datasets")


def _yaml_entries() -> list[dict]:
    """The packaged registry as the YAML file states it (read here without the registry's loader)."""
    return yaml.safe_load(default_registry_path().read_text())["backbones"]


def _terminal_list(monkeypatch, width: int, *args: str) -> list[str]:
    """`list backbones ARGS` printed as on a terminal of `width` columns; its lines."""
    screen = Console(file=io.StringIO(), width=width, color_system=None)
    monkeypatch.setattr("ssl_segbench.cli.out", screen)
    assert main(["list", "backbones", *args]) == 0
    return screen.file.getvalue().splitlines()


def _cli_out(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, stdout a pipe (as `| grep` or `> file`)."""
    return subprocess.run([sys.executable, "-m", "ssl_segbench", *args], capture_output=True, text=True)


# --- list backbones: fits a terminal, cuts nothing ------------------------------------------------------------------

@pytest.mark.parametrize("width", [80, 60])
def test_list_backbones_in_a_narrow_terminal_shows_every_id_whole_first(monkeypatch, width):
    lines = _terminal_list(monkeypatch, width)
    ids = [e["id"] for e in _yaml_entries()]
    row_ids = [line.split()[0] for line in lines if line and not line.startswith((" ", "─"))]
    assert row_ids == ["id", *ids]  # header, then one row per entry, each starting with its id, whole and in file order
    if width == 80:  # the compact view fits 80 columns: no line runs past the terminal's edge
        assert max(len(line.rstrip()) for line in lines) <= 80
        assert lines[1].split() == ["id", "family", "params", "patch", "license"]


def test_list_backbones_marks_a_gated_license_and_keeps_the_family_filter(monkeypatch, tmp_path):
    entry = ("  - {{id: {id}, loader: timm, repo_id: org/{id}, revision: null, patch_size: 16, embed_dim: 8, "
             "num_prefix_tokens: 1, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5], method: test, paper: null, "
             "license: {lic}, family: {fam}{more}}}\n")
    (tmp_path / "r.yaml").write_text(
        "backbones:\n"
        + entry.format(id="open_one", lic="mit", fam="alpha", more="")
        + entry.format(id="asks_first_with_a_long_id", lic="nvidia-open-model-license", fam="beta",
                       more=", gated: true, license_url: https://example.org/license"))
    text = "\n".join(_terminal_list(monkeypatch, 80, "--registry", str(tmp_path / "r.yaml")))
    assert re.search(r"^asks_first_with_a_long_id .*nvidia-open-model-license", text, re.M)
    assert text.count("(gated)") == 1 and re.search(r"^open_one .* mit\s*$", text, re.M)
    beta = "\n".join(_terminal_list(monkeypatch, 80, "--registry", str(tmp_path / "r.yaml"), "--family", "beta"))
    assert "asks_first_with_a_long_id" in beta and "open_one" not in beta and "(gated)" in beta


def test_list_backbones_wide_into_a_pipe_keeps_every_value_whole_on_its_row():
    proc = _cli_out("list", "backbones", "--wide")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line and not line.startswith((" ", "─"))}
    entries = _yaml_entries()
    assert any(e["revision"] for e in entries)  # some entries pin a full 40-hex sha: it must show whole
    for e in entries:
        row = rows[e["id"]]
        for value in (e["repo_id"], e["revision"] or "resolved at run", e["method"], e["license"]):
            assert f" {value} " in f" {row} ", (e["id"], value)


def test_list_backbones_csv_and_json_carry_every_field_of_the_yaml():
    entries = _yaml_entries()
    as_json = _cli_out("list", "backbones", "--format", "json")
    as_csv = _cli_out("list", "backbones", "--format", "csv")
    assert as_json.returncode == 0 and as_csv.returncode == 0, as_json.stderr + as_csv.stderr
    objects = json.loads(as_json.stdout)
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [o["id"] for o in objects] == [r["id"] for r in rows] == [e["id"] for e in entries]
    assert "gated" in rows[0] and "license_url" in rows[0] and set(rows[0]) == set(objects[0])
    for entry, obj, row in zip(entries, objects, rows):
        for key, value in entry.items():  # every value as written in the YAML, nothing shortened
            assert obj[key] == value, (entry["id"], key)
            assert row[key] == ("" if value is None else value if isinstance(value, str) else json.dumps(value)), \
                (entry["id"], key)


def test_list_backbones_json_follows_the_family_filter():
    proc = _cli_out("list", "backbones", "--family", "dinov3", "--format", "json")
    expected = [e["id"] for e in _yaml_entries() if e.get("family") == "dinov3"]
    assert expected and [o["id"] for o in json.loads(proc.stdout)] == expected


@pytest.mark.parametrize("args, expected", [
    (["list", "datasets", "--wide"], "--wide: option(s) of `list backbones` only; drop them from `list datasets`"),
    (["list", "protocols", "--format", "json"], "--format: option(s) of `list backbones` only"),
    (["list", "backbones", "--wide", "--format", "csv"], "--wide shapes the table; --format csv already holds every"),
])
def test_list_options_that_would_be_ignored_are_refused(args, expected, capsys):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert expected in " ".join(captured.err.split()) and captured.out == ""


def test_list_backbones_of_an_empty_registry_is_refused_naming_it(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("backbones: []\n")
    assert main(["list", "backbones", "--registry", str(tmp_path / "r.yaml")]) == 2
    captured = capsys.readouterr()
    assert "r.yaml lists no backbones" in " ".join(captured.err.split()) and captured.out == ""


# --- --dataset defaults to synthetic, as the README says -------------------------------------------------------------

def test_run_without_dataset_runs_the_synthetic_set(small_synthetic, tmp_path, capsys):
    assert build_parser().parse_args(["run", "--backbone", "pixels"]).dataset == "synthetic"
    args = _run_args(tmp_path, small_synthetic)
    del args[args.index("--dataset"):args.index("--dataset") + 2]
    assert main(args) == 0
    (_, record), = iter_records(tmp_path / "res")
    assert record.identity["dataset"].startswith("synthetic")


# --- --help and list import no model library -------------------------------------------------------------------------

def _imported_by(*args: str) -> list[str]:
    """The heavy modules a fresh interpreter has imported after running the CLI with `args`."""
    code = "\n".join(["import json, sys", "from ssl_segbench.cli import main", "try:", "    main(sys.argv[1:])",
                      "except SystemExit:", "    pass",
                      f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)), file=sys.stderr)"])
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["list", "backbones"], ["list", "datasets"]])
def test_help_and_list_import_no_heavy_library(args):
    assert _imported_by(*args) == []


def test_list_protocols_imports_no_model_or_table_library():
    # torch and faiss remain: the protocol classes live in modules that use them (protocols/base.py, cluster.py)
    assert not {"timm", "transformers", "pandas", "datasets"} & set(_imported_by("list", "protocols"))


# --- the libraries' own output stays out of ours ---------------------------------------------------------------------

def test_a_run_prints_no_library_progress_bar_or_faiss_warning(small_synthetic, tmp_path):
    """A transformers checkpoint (its loader draws a "Loading weights" tqdm bar) at 32 px: 128 tokens for k-means with
    K=8, below faiss's 39 points per centroid, where faiss prints its raw warning."""
    ckpt = _dinov2_dir(tmp_path / "tiny-dinov2")
    args = _run_args(tmp_path, small_synthetic, ckpt)
    args[args.index("--size") + 1] = "32"
    env = {k: v for k, v in os.environ.items() if k not in _LIBRARY_QUIET}  # the CLI's own doing, not the caller's
    proc = subprocess.run([sys.executable, "-m", "ssl_segbench", *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "SSL_SEGBENCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "k-means K=8 on 128 tokens" in proc.stderr  # our own progress line is there
    for raw in ("Loading weights", "it/s]", "%|", "WARNING clustering", "Some weights"):
        assert raw not in proc.stderr + proc.stdout, raw
    assert len(list(iter_records(tmp_path / "res"))) == 1


def test_a_python_warning_inside_a_command_is_one_line_on_our_console(capsys, monkeypatch):
    for key in _LIBRARY_QUIET:
        monkeypatch.delenv(key, raising=False)
    with quiet_libraries():
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        warnings.warn("a library noticed something", UserWarning, stacklevel=1)
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ  # undone on leaving
    err = capsys.readouterr().err
    assert err.startswith("warning (UserWarning, test_cli_fit.py:") and err.count("\n") == 1
    assert err.rstrip().endswith("): a library noticed something")
