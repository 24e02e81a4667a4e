"""Issue cases 2, 3, 8 and 9 replayed through the command line: broken checkpoints, typos, bad files, a full disk and
hostile names each end in a clear non-zero error naming the file or parameter, and leave no record, no complete cache
entry and no file outside the results, cache and masks directories."""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_segbench.cli import main
from ssl_segbench.records import iter_records


def _cli(tmp_path, *args, preexec_fn=None, env=None):
    """Run the CLI in a subprocess with the test's own cache; returns (exit code, stderr on one line)."""
    full_env = {**os.environ, "SSL_SEGBENCH_CACHE": str(tmp_path / "cache"), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "ssl_segbench", *args], env=full_env, capture_output=True, text=True,
                          preexec_fn=preexec_fn, cwd=tmp_path)
    return proc.returncode, " ".join(proc.stderr.split())


def _run_args(tmp_path, data, backbone="pixels", protocol="kmeans", *extra):
    return ["run", "--backbone", str(backbone), "--dataset", "synthetic", "--data-root", str(data), "--size", "64",
            "--protocol", protocol, "--seeds", "1", "--results-dir", str(tmp_path / "res"), *extra]


def _nothing_written(tmp_path):
    """No record, no complete feature or label entry, no partial entry left behind."""
    assert not list((tmp_path / "res").rglob("*.json")) if (tmp_path / "res").exists() else True
    cache = tmp_path / "cache"
    assert not [p for p in cache.rglob("meta.json") if "features" in p.parts], "a complete feature entry was left"
    assert not list(cache.rglob("*.partial")), "a partial entry was left"


def _cli_refused(tmp_path, args, *expected):
    """Run the CLI with `args`; assert exit 2, every `expected` text in the message, no traceback, nothing written.
    Returns the message."""
    rc, err = _cli(tmp_path, *args)
    assert rc == 2 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    _nothing_written(tmp_path)
    return err


def _dinov2_dir(path, poison=None):
    """A tiny random DINOv2 in transformers' save_pretrained layout, with its preprocessor_config.json; `poison(model)`
    edits its weights first."""
    from hubfake import save_preprocessor
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     image_size=32, patch_size=8)).eval()
    if poison is not None:
        with torch.no_grad():
            poison(model)
    model.save_pretrained(path)
    save_preprocessor(path)
    return path


# --- case 2: non-finite features and metrics -----------------------------------------------------------------------

def test_nan_weights_are_refused_with_backbone_layer_facet_and_image(small_synthetic, tmp_path):
    ckpt = _dinov2_dir(tmp_path / "nan-ckpt",
                       lambda m: m.encoder.layer[0].attention.q_proj.weight.__setitem__((0, 0), float("nan")))
    rc, err = _cli(tmp_path, *_run_args(tmp_path, small_synthetic, ckpt, "linear", "--param", "linear.epochs=1"))
    assert rc == 2 and "Traceback" not in err
    assert "NaN or infinite" in err and "facet 'tokens'" in err and "layer -1" in err and "nan-ckpt" in err
    assert "syn_test_00000" in err  # the first bad image
    _nothing_written(tmp_path)


def _pixels_registry(path, id_, std="0.5", replace=None):
    """A registry holding one raw-pixels baseline; `replace` = (key, line) swaps that key's line (None: appends)."""
    lines = ["backbones:", f"  - id: {id_}", "    loader: builtin", "    repo_id: pixels", "    revision: null",
             "    patch_size: 16", "    embed_dim: 768", "    num_prefix_tokens: 0", "    mean: [0.5, 0.5, 0.5]",
             f"    std: [{std}, {std}, {std}]", "    method: baseline", "    paper: null", "    license: none"]
    if replace is not None:
        key, line = replace
        lines = [ln for ln in lines if key is None or not ln.strip().startswith(f"{key}:")] + [line]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_values_beyond_float16_are_refused_not_stored_as_inf(small_synthetic, tmp_path):
    registry = _pixels_registry(tmp_path / "registry.yaml", "loud_pixels", std="0.000001")
    rc, err = _cli(tmp_path, *_run_args(tmp_path, small_synthetic, "loud_pixels"), "--registry", str(registry))
    assert rc == 2 and "beyond float16's range" in err and "loud_pixels" in err
    _nothing_written(tmp_path)


def test_a_nan_metric_is_never_written(tmp_path):
    root = tmp_path / "folder"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text("names: [a, b]\n")
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(np.full((32, 32), 255, np.uint8)).save(root / "masks" / f"{i}.png")  # nothing labelled
    rc, err = _cli(tmp_path, "run", "--backbone", "pixels", "--dataset", "folder", "--data-root", str(root),
                   "--size", "32", "--protocol", "kmeans", "--seeds", "1", "--param", "kmeans.k=2",
                   "--results-dir", str(tmp_path / "res"))
    assert rc == 2 and "metric 'miou' is nan" in err and "no record was written" in err
    assert not list((tmp_path / "res").rglob("*.json")) if (tmp_path / "res").exists() else True


def test_check_fails_on_nan_or_missing_metrics_and_refuses_a_malformed_baseline(small_synthetic, tmp_path):
    res = tmp_path / "res"
    assert main(_run_args(tmp_path, small_synthetic)) == 0
    baseline = tmp_path / "baseline.json"
    assert main(["check", "--baseline", str(baseline), "--results-dir", str(res), "--update-baseline"]) == 0
    (path, rec), = iter_records(res)
    rec.metrics["miou"]["mean"] = float("nan")
    path.write_text(json.dumps(rec.to_json()))  # json writes NaN: a record a buggy tool could leave
    rc, err = _cli(tmp_path, "check", "--baseline", str(baseline), "--results-dir", str(res))
    assert rc == 1 and "check failed" in err
    del rec.metrics["pixel_acc"]
    path.write_text(json.dumps(rec.to_json()))
    assert main(["check", "--baseline", str(baseline), "--results-dir", str(res)]) == 1
    for bad in ('{"schema": "ssl-segbench/baseline/v1", "entries": {"k": {"label": "x", "metrics": {"miou": '
                '{"mean": "high", "std": 0}}}}}', '{"schema": "ssl-segbench/baseline/v1", "entries": {"k": 3}}',
                "{not json"):
        baseline.write_text(bad)
        rc, err = _cli(tmp_path, "check", "--baseline", str(baseline), "--results-dir", str(res))
        assert rc == 2 and "Traceback" not in err and "baseline" in err


# --- case 3: typos and wrong types, all found before any work -------------------------------------------------------

@pytest.mark.parametrize("extra, expected", [
    (["--param", "kmean.k=3"], "'kmean' is not among this run's protocols (kmeans) and is not a protocol"),
    (["--param", "kmeans.kk=3"], "unknown parameter(s) ['kk']"),
    (["--param", "kmeans.k=abc"], "k must be int or null, got 'abc'"),
    (["--param", "kmeans.k=true"], "k must be int or null, got True"),
    (["--param", "kmeans.upsample=cubic"], "upsample must be one of ('bilinear', 'nearest')"),
    (["--protocol", "kmeans,linear:nope"], "protocol 'linear' has no preset 'nope'"),
])
def test_typos_stop_the_run_before_any_record(small_synthetic, tmp_path, extra, expected, capsys, monkeypatch):
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    args = _run_args(tmp_path, small_synthetic)
    if extra[0] == "--protocol":
        args[args.index("--protocol") + 1] = extra[1]
        extra = []
    assert main([*args, *extra]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert expected in err, err
    assert not (tmp_path / "res").exists() and not (tmp_path / "cache" / "features").exists()


@pytest.mark.parametrize("line, expected", [
    ("    num_prefix_tokens: true", "num_prefix_tokens': must be an integer >= 0"),
    ("    paper: 123", "paper': must be a string or null"),
    ("    patch_size: 16", "duplicate key 'patch_size'"),
])
def test_registry_values_are_type_checked_strictly(tmp_path, line, expected, capsys):
    key = line.split(":")[0].strip()
    _pixels_registry(tmp_path / "r.yaml", "mini", replace=(None if key == "patch_size" else key, line))
    assert main(["list", "backbones", "--registry", str(tmp_path / "r.yaml")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert expected in err and "r.yaml" in err, err


# --- case 8: crashes become errors ------------------------------------------------------------------------------------

def test_truncated_safetensors_names_the_file_and_the_fix(small_synthetic, tmp_path):
    ckpt = _dinov2_dir(tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rc, err = _cli(tmp_path, *_run_args(tmp_path, small_synthetic, ckpt))
    assert rc == 2 and "Traceback" not in err
    assert f"{weights} is damaged" in err and "truncated" in err and "complete copy" in err
    _nothing_written(tmp_path)


def test_truncated_safetensors_in_the_hub_cache_says_how_to_download_again(small_synthetic, tmp_path, hub_cache):
    from hubfake import make_dinov2_checkpoint

    _, sha = make_dinov2_checkpoint(hub_cache, "tiny-org/dinov2-broken")
    weights = next((hub_cache / "models--tiny-org--dinov2-broken" / "snapshots" / sha).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    args = _run_args(tmp_path, small_synthetic, "tiny-org/dinov2-broken")
    args[args.index("--size") + 1] = "56"  # the fake checkpoint's patch is 7
    rc, err = _cli(tmp_path, *args)
    assert rc == 2 and "is damaged" in err and "hf download tiny-org/dinov2-broken" in err


@pytest.mark.parametrize("name", ["/no/such/dinov2-small", "./models/dinov2-smal", "../models/x"])
def test_a_mistyped_local_directory_is_no_such_directory_not_a_hub_download(small_synthetic, tmp_path, name):
    rc, err = _cli(tmp_path, *_run_args(tmp_path, small_synthetic, name))
    assert rc == 2 and "no such directory" in err and "hf download" not in err
    _nothing_written(tmp_path)


def test_a_full_disk_is_an_error_with_the_size_and_no_partial_entry(small_synthetic, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the cache entry's allocation (EFBIG), a real write failure any user can
    cause; without the reservation the memory map would later die of SIGBUS."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))  # the entry needs 196 kB

    rc, err = _cli(tmp_path, *_run_args(tmp_path, small_synthetic), preexec_fn=limit)
    assert rc == 2 and "the feature cache needs" in err and "MiB" in err and "SSL_SEGBENCH_CACHE" in err
    _nothing_written(tmp_path)
    rc, err = _cli(tmp_path, *_run_args(tmp_path, small_synthetic))  # with room again, the same command works
    assert rc == 0, err


def test_too_little_free_space_is_found_before_allocating(small_synthetic, tmp_path, monkeypatch):
    import ssl_segbench.cache as cache
    import ssl_segbench.features as features
    from ssl_segbench.backbones import BackboneRef
    from ssl_segbench.data import get_dataset
    from ssl_segbench.transforms import Transform

    real = shutil.disk_usage
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    with pytest.raises(cache.CacheError, match=r"needs 0\.\d MiB \(plus 64 MiB kept free\).*10\.0 MiB are free"):
        features.extract(BackboneRef("pixels"), get_dataset("synthetic", small_synthetic),
                         Transform("shorter", 64, 16), root=tmp_path / "cache")
    _nothing_written(tmp_path)


def test_a_mask_smaller_than_its_image_is_an_error_unless_resizing_is_asked_and_then_counted(small_synthetic,
                                                                                             tmp_path):
    data = shutil.copytree(small_synthetic, tmp_path / "data")
    mask = sorted((data / "TEST" / "masks").iterdir())[2]
    Image.open(mask).resize((128, 96), Image.NEAREST).save(mask)
    rc, err = _cli(tmp_path, *_run_args(tmp_path, data))
    image = data / "TEST" / "images" / (mask.stem + ".jpg")
    assert rc == 2 and str(mask) in err and str(image) in err and "-o resize_masks=true" in err
    _nothing_written(tmp_path)
    rc, err = _cli(tmp_path, *_run_args(tmp_path, data, "pixels", "kmeans", "-o", "resize_masks=true"))
    assert rc == 0, err
    (_, rec), = iter_records(tmp_path / "res")
    assert rec.dataset["n_resized_masks"] == 1 and rec.dataset["resized_masks"] == [mask.stem]
    assert rec.dataset["resize_masks"] is True


def test_bad_file_messages_name_the_flag_that_exists(small_synthetic, tmp_path):
    data = shutil.copytree(small_synthetic, tmp_path / "data")
    (data / "TEST" / "masks" / "syn_test_00001.bmp").unlink()
    rc, err = _cli(tmp_path, *_run_args(tmp_path, data))
    assert rc == 2 and "--skip-bad" in err and "skip_bad=True" not in err
    _nothing_written(tmp_path)


# --- case 9: writes stay inside their roots ------------------------------------------------------------------------

def test_hostile_dataset_ids_and_sample_names_cannot_write_outside_the_roots(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    n = 3
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image(),
                                  "name": datasets.Value("string")})
    split = datasets.Dataset.from_dict({
        "image": [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)],
        "mask": [Image.fromarray(rng.integers(0, 2, (32, 32), dtype=np.uint8)) for _ in range(n)],
        "name": ["../../../escaped", "a/../../b", "plain"]}, features=features)
    work = tmp_path / "work"
    root = work / "saved"
    datasets.DatasetDict({"validation": split}).save_to_disk(str(root))
    (root / "classes.yaml").write_text("names: [a, b]\n")
    roots = [work / "res", work / "cache", work / "masks"]
    rc, err = _cli(work, "run", "--backbone", "pixels", "--dataset", "hf:../../../../evil", "--data-root", str(root),
                   "--size", "32", "--protocol", "kmeans", "--seeds", "1", "--param", "kmeans.k=2",
                   "-o", "name_column=name", "--results-dir", str(roots[0]), "--save-masks", str(roots[2]),
                   env={"SSL_SEGBENCH_CACHE": str(roots[1])})
    assert rc == 0, err
    made = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(root)]
    outside = [p for p in made if not any(p.is_relative_to(r) for r in roots)]
    assert outside == [], outside
    pngs = sorted(p.name for p in (roots[2] / "kmeans").glob("*.png"))
    assert len(pngs) == 3 and "plain.png" in pngs and all(".." not in p and "/" not in p for p in pngs)
    (rec_path, rec), = iter_records(roots[0])
    assert rec.identity["dataset"] == "hf:../../../../evil" and rec_path.is_relative_to(roots[0])


def test_safe_component_and_inside():
    from ssl_segbench.paths import PathError, inside, safe_component

    assert safe_component("dino_vits16") == "dino_vits16" and safe_component("local-sha256:ab") == "local-sha256:ab"
    for hostile in ("..", "../x", "a/b", "x\\y", ".hidden", "", "hf:org/name"):
        s = safe_component(hostile)
        assert "/" not in s and "\\" not in s and not s.startswith(".") and s
    assert safe_component("a/b") != safe_component("a_b")  # no two names share a file
    root = Path("/tmp/some-root")
    assert inside(root, "a/b.json") == root / "a/b.json"
    with pytest.raises(PathError, match="outside"):
        inside(root, "../escape.json")


def test_a_record_that_cannot_be_written_is_a_one_line_error_and_no_torn_file(small_synthetic, tmp_path):
    """The features come from the cache (nothing else is written), so a 2 kB file size limit hits the record itself
    (several kB): a one-line WriteError naming it, no traceback, no temporary or partial record left."""
    rc, err = _cli(tmp_path, *_run_args(tmp_path, small_synthetic, "pixels", "kmeans", "--results-dir",
                                        str(tmp_path / "warm")))
    assert rc == 0, err
    size = next((tmp_path / "warm").rglob("*.json")).stat().st_size
    assert size > 2000

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    rc, err = _cli(tmp_path, *_run_args(tmp_path, small_synthetic), preexec_fn=limit)
    assert rc == 2 and "Traceback" not in err, err
    assert "could not write the file" in err and str(tmp_path / "res") in err and "Nothing half-written" in err
    assert not [p for p in (tmp_path / "res").rglob("*") if p.is_file()], "a torn or temporary record was left"
    rc, err = _cli(tmp_path, *_run_args(tmp_path, small_synthetic))  # with room again, the same command writes it
    assert rc == 0, err
    assert len(list((tmp_path / "res").rglob("*.json"))) == 1
