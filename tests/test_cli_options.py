"""Issue 22, CLI option groups: --results-dir and the dataset options (--dataset, --data-root, --split, -o, --skip-bad)
are each declared once and shared through argparse parents; every subcommand still offers the options it offered
before, with the same defaults and types, and `sweep`/`runner` build run options without the CLI."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_import_graph import package_sources, scan

from ssl_segbench.cli import build_parser, main
from ssl_segbench.data.check import dataset_options_of

_DATASET = {"--dataset", "--data-root", "--split", "-o", "--option", "--skip-bad"}
_RUN_AND_SHOW = {"-h", "--help", "--backbone", "--device", "--batch-size", "--workers", "--layer", "--resize", "--size",
                 "--param", "--registry", "--mean", "--std", "--crf", "--arch", "--checkpoint-key"} | _DATASET
# the option strings each `--help` listed before the options were shared (read from main's `--help` output)
BEFORE = {
    (): {"-h", "--help", "--version"},
    ("run",): _RUN_AND_SHOW | {"--protocol", "--seeds", "--results-dir", "--overwrite", "--save-masks"},
    ("show",): _RUN_AND_SHOW | {"--protocol", "-n", "--images", "--out"},
    ("list",): {"-h", "--help", "--registry", "--family", "--wide", "--format"},
    ("datasets",): {"-h", "--help"},
    ("datasets", "check"): {"-h", "--help"} | _DATASET,
    ("leaderboard",): {"-h", "--help", "--results-dir", "--out", "--format", "--plots", "--published"},
    ("compare",): {"-h", "--help", "--dataset", "--results-dir", "--n-boot"},
    ("sweep",): {"-h", "--help", "--executor", "--workers", "--no-wait", "--partition", "--gpus", "--cpus", "--mem-gb",
                 "--time", "--account", "--nproc-per-node"},
    ("check",): {"-h", "--help", "--baseline", "--results-dir", "--tolerance", "--update-baseline"},
}
_INVOCATION = re.compile(r"^  (-\S.*?)(?:\s{2,}|$)")  # "  -o KEY=VALUE, --option KEY=VALUE   help..."


def _help(command: tuple[str, ...], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _listed_options(text: str) -> set[str]:
    """The option strings of a `--help` text's option lines (not options merely named in a help sentence)."""
    found = set()
    for line in text.splitlines():
        m = _INVOCATION.match(line)
        if m:
            found |= {part.split()[0] for part in m.group(1).split(", ")}
    return found


@pytest.mark.parametrize("command", list(BEFORE), ids=lambda c: " ".join(c) or "ssl-segbench")
def test_every_command_lists_the_options_it_listed_before(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert _listed_options(_help(command, capsys)) == BEFORE[command]


def test_the_help_reader_reads_option_lines_only():
    text = ("usage: x [-h] [--a A]\n\noptions:\n  -h, --help  show help\n  -o KEY=VALUE, --option KEY=VALUE\n"
            "                        with --mean and -n\n  --results-dir RESULTS_DIR  records (--seeds)\n"
            "  [status] SWEEP.yaml   the file\n")
    assert _listed_options(text) == {"-h", "--help", "-o", "--option", "--results-dir"}


def _parse(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("command", [["run", "--backbone", "pixels"], ["show", "--backbone", "pixels", "--protocol",
                                                                       "kmeans"], ["datasets", "check"]])
def test_the_dataset_options_parse_alike_in_run_show_and_datasets_check(command):
    args = _parse(*command, "--dataset", "suim", "--data-root", "d/suim", "--split", "val", "-o", "curated_list=l.txt",
                  "--option", "resize-masks=true", "--skip-bad")
    assert (args.dataset, args.data_root, args.split) == ("suim", "d/suim", "val")
    assert dataset_options_of(args) == {"curated_list": "l.txt", "resize_masks": True, "skip_bad": True}
    bare = _parse(*command, "--dataset", "suim")
    assert (bare.data_root, bare.split, bare.option, bare.skip_bad) == (None, None, None, False)
    assert dataset_options_of(bare) == {}


def test_dataset_stays_optional_for_run_and_show_and_required_for_datasets_check(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["datasets", "check"])
    assert e.value.code == 2 and "the following arguments are required: --dataset" in capsys.readouterr().err
    # the same parser: requiring it for `datasets check` did not require it of run or show
    assert parser.parse_args(["run", "--backbone", "pixels"]).dataset == "synthetic"
    assert parser.parse_args(["show", "--backbone", "pixels", "--protocol", "kmeans"]).dataset == "synthetic"


@pytest.mark.parametrize("command", [["run", "--backbone", "pixels"], ["leaderboard"], ["compare", "a", "b"],
                                     ["check", "--baseline", "b.json"]])
def test_results_dir_is_a_path_or_none_in_every_command_that_reads_records(command):
    assert _parse(*command, "--results-dir", "some/res").results_dir == Path("some/res")
    assert _parse(*command).results_dir is None


def test_show_takes_no_results_dir(capsys):
    """`show` writes no record; sharing --results-dir did not give it one."""
    with pytest.raises(SystemExit) as e:
        _parse("show", "--backbone", "pixels", "--protocol", "kmeans", "--results-dir", "r")
    assert e.value.code == 2 and "unrecognized arguments: --results-dir" in capsys.readouterr().err


def test_a_percent_sign_in_the_data_folder_does_not_break_help(tmp_path, monkeypatch, capsys):
    """--data-root's help names the data folder; argparse %-formats help texts, so a '%' there must be escaped."""
    monkeypatch.setenv("SSL_SEGBENCH_DATA", str(tmp_path / "100%data"))
    monkeypatch.setenv("COLUMNS", "1000")
    for command in (("run",), ("datasets", "check")):
        assert f"now {tmp_path / '100%data'}/<dataset id>" in _help(command, capsys)


def test_sweep_and_runner_build_run_options_without_the_cli():
    """The data flows sweep → runner (`RunOptions`, a cell's argv from `RunOptions.argv`); the CLI only parses argv
    into RunOptions. Neither module reaches `cli`, at module level or in a function, directly or through another."""
    edges, _ = scan(package_sources())
    graph = {m: {t for t, _, _ in out} for m, out in edges.items()}
    assert "ssl_segbench.runner" in graph["ssl_segbench.sweep"]  # the scan sees sweep's (function-local) imports
    for start in ("ssl_segbench.sweep", "ssl_segbench.runner"):
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph.get(m, ())
        assert "ssl_segbench.cli" not in seen, f"{start} reaches ssl_segbench.cli"
