"""Issue 19, run options: every value that cannot give a valid record (seeds that are not independent, sizes, batch
sizes, workers, devices, layers) is refused through the CLI before any work, naming the option and valid values, with
nothing written; the same checks hold for `RunOptions` through the Python API."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from test_refusals import _nothing_written, _run_args

from ssl_segbench.cli import main
from ssl_segbench.records import iter_records
from ssl_segbench.registry import load_registry
from ssl_segbench.runner import RunOptions, RunOptionsError, check_layer, option_problems, run
from ssl_segbench.transforms import Transform, TransformError

CASES = [  # (arguments replacing the valid ones, backbone, what the message must say)
    (["--seeds", "0,0"], "pixels", ["--seeds 0,0", "listed more than once", "not be independent", "--seeds 2 (= 0,1)"]),
    (["--seeds", "3,1,3"], "pixels", ["--seeds 3,1,3", "seed(s) 3 listed more than once", "--seeds 3 (= 0,1,2)"]),
    (["--seeds", "0"], "pixels", ["--seeds 0: a seed count must be at least 1", "--seeds 0,1,2"]),
    (["--seeds", "-1"], "pixels", ["--seeds -1: a seed count must be at least 1"]),
    (["--seeds", "1,-2"], "pixels", ["--seeds 1,-2: seed -2 is negative", "distinct non-negative integers"]),
    (["--size", "0"], "pixels", ["--size 0", "positive multiple of the backbone's patch size", "224"]),
    (["--size", "-16"], "pixels", ["--size -16", "positive multiple"]),
    (["--size", "7"], "pixels", ["size 7 is not a multiple of the patch size 16: use --size 16,", "--resize pad"]),
    (["--size", "70"], "pixels", ["size 70 is not a multiple of the patch size 16: use --size 64 or 80"]),
    (["--device", "tpu"], "pixels", ["--device 'tpu' is not supported: use auto, cpu, cuda or cuda:N"]),
    (["--device", "mps"], "pixels", ["--device 'mps' is not supported: use auto, cpu, cuda or cuda:N"]),
    (["--batch-size", "-4"], "pixels", ["--batch-size -4", "at least 1", "default (64 on GPU, 16 on CPU)"]),
    (["--batch-size", "0"], "pixels", ["--batch-size 0", "at least 1"]),
    (["--workers", "-1"], "pixels", ["--workers -1", "0 (decode in the main process) or more"]),
    (["--layer", "99"], "random_vits16", ["--layer 99 is out of range for backbone 'random_vits16' with 12 "
                                          "transformer blocks: use -12 to 11"]),
    (["--layer", "-13"], "random_vits16", ["--layer -13 is out of range", "use -12 to 11"]),
    (["--layer", "0"], "pixels", ["--layer 0 is out of range for backbone 'pixels' with 0 transformer blocks: use -1"]),
]


@pytest.mark.parametrize("extra, backbone, expected", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_run_options_are_refused_before_any_work(small_synthetic, tmp_path, monkeypatch, capsys, extra, backbone,
                                                     expected):
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    assert main([*_run_args(tmp_path, small_synthetic, backbone), *extra]) == 2  # an error, not a traceback
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error:") and all(e in err for e in expected), err
    _nothing_written(tmp_path)
    assert not (tmp_path / "cache" / "features").exists(), "extraction started before the refusal"


def test_a_device_that_is_not_here_is_refused_naming_the_valid_ones(small_synthetic, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert main([*_run_args(tmp_path, small_synthetic), "--device", f"cuda:{n}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--device cuda:{n}" in err
    assert (f"has {n} GPU(s): use cuda, or cuda:0 to cuda:{n - 1}" if n else
            "CUDA is not available on this machine") in err, err
    _nothing_written(tmp_path)


def test_valid_edge_values_run_as_given(small_synthetic, tmp_path, monkeypatch):
    """The smallest valid values are taken as given: seeds in the listed order, one image per call, no workers,
    the first and last block of a 12-block ViT."""
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    base = _run_args(tmp_path, small_synthetic, "random_vits16")
    assert main([*base, "--seeds", "3,0", "--batch-size", "1", "--workers", "0", "--layer", "-12"]) == 0
    assert main([*base, "--seeds", "1", "--layer", "11"]) == 0
    recs = sorted((r for _, r in iter_records(tmp_path / "res")), key=lambda r: r.backbone["layer"])
    assert [(r.backbone["layer"], r.seeds) for r in recs] == [(-12, [3, 0]), (11, [0])]
    assert recs[0].provenance["batch_size"] == 1


def _opts(tmp_path, data, **changes) -> RunOptions:
    return RunOptions(**{"backbone": "pixels", "dataset": "synthetic", "data_root": str(data), "protocols": ("kmeans",),
                         "size": 64, "seeds": 1, "results_dir": tmp_path / "res", **changes})


def test_the_python_api_checks_run_options_too(small_synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    for changes, expected in [({"seeds": [0, 0]}, "--seeds 0,0"), ({"seeds": True}, "--seeds True"),
                              ({"batch_size": 0}, "--batch-size 0"), ({"size": 0}, "--size 0"),
                              ({"device": "mps"}, "--device 'mps'"), ({"overwrite": "never"}, "--overwrite 'never'"),
                              ({"resize": "crop"}, "--resize 'crop': use one of shorter, square, pad")]:
        with pytest.raises(RunOptionsError, match=expected):
            run(_opts(tmp_path, small_synthetic, **changes))
    _nothing_written(tmp_path)
    # every problem at once, each under its option
    problems = option_problems(_opts(tmp_path, small_synthetic, seeds=[2, 2], size=-1, device="tpu", workers=-2))
    assert [key for key, _ in problems] == ["seeds", "device", "size", "workers"]
    # a count and a list are both seeds; the record holds the seeds actually run
    (_, _, rec), = run(_opts(tmp_path, small_synthetic, seeds=[4, 2]))
    assert rec.seeds == [4, 2]


def test_layer_range_follows_the_backbones_depth():
    spec = load_registry()["dinov2_vits14"]  # 12 blocks, known from the registry: no checkpoint needed
    for ok in (-12, -1, 0, 11):
        check_layer(ok, spec)
    for bad in (-13, 12, 99):
        with pytest.raises(RunOptionsError, match=f"--layer {bad} is out of range .* use -12 to 11"):
            check_layer(bad, spec)
    check_layer(99, dataclasses.replace(spec, num_layers=None))  # unknown before loading: the backbone checks it


@pytest.mark.parametrize("size, patch, fix", [(7, 16, "use --size 16,"), (230, 16, "use --size 224 or 240,"),
                                              (20, 14, "use --size 14 or 28,"), (13, 14, "use --size 14,")])
def test_a_size_off_the_patch_grid_suggests_the_nearest_multiples(size, patch, fix):
    with pytest.raises(TransformError, match=fix):
        Transform("shorter", size, patch)
    Transform("pad", size, patch)  # pad reaches the grid by padding
