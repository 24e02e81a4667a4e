"""Issue 21, the first hour: a mistyped backbone, dataset, protocol or preset suggests the close names instead of
printing the whole registry; a Hub that cannot be reached is said at once, naming HF_HUB_OFFLINE=1 and HF_HUB_CACHE,
without huggingface_hub's retries; a missing dataset and `list datasets` say where each dataset comes from."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from hubfake import registry_entry
from test_refusals import _cli, _cli_refused, _nothing_written, _run_args

from ssl_segbench.backbones import BackboneError, BackboneRef
from ssl_segbench.data import DATASETS
from ssl_segbench.protocols import ProtocolError, get_protocol
from ssl_segbench.registry import did_you_mean, load_registry

# --- did you mean ---------------------------------------------------------------------------------------------------


def test_did_you_mean_puts_close_names_first_and_lists_only_short_registries():
    assert did_you_mean("kmeanz", ["datus", "kmeans", "linear"], "ssl-segbench list protocols") == \
        " Did you mean 'kmeans'? Known: datus, kmeans, linear (`ssl-segbench list protocols` describes them)"
    assert did_you_mean("xyz", ["datus", "kmeans"], "L") == " Known: datus, kmeans (`L` describes them)"
    many = ["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14"] + [f"other_{i}" for i in range(26)]
    tail = did_you_mean("dinov2_vits41", many, "ssl-segbench list backbones")
    # similarity 24/26 for dinov2_vits14, 22/26 for the other three: the closest first, three named, then the count
    assert tail.startswith(" Did you mean 'dinov2_vits14', ") and tail.count("'dinov2_") == 3, tail
    assert "other_" not in tail and tail.endswith(" Known: 30 (`ssl-segbench list backbones` lists them)")
    assert did_you_mean("zzz", many, "L") == " Known: 30 (`L` lists them)"


def test_mistyped_backbone_suggests_neighbours_not_the_registry(small_synthetic, tmp_path):
    registry = load_registry()
    assert len(registry) > 20  # the case of the issue: the packaged registry is too long to print
    err = _cli_refused(tmp_path, _run_args(tmp_path, small_synthetic, "dino_vitz"), "unknown backbone 'dino_vitz'.",
                       "`ssl-segbench list backbones`", f"Known: {len(registry)} ")
    named = {i for i in registry if f"'{i}'" in err}
    assert named == {"dino_vits8", "dino_vitb8", "dino_vits16"}, named
    assert err.index("Did you mean") < err.index("Known:")


def test_mistyped_dataset_suggests_the_close_id(small_synthetic, tmp_path):
    args = _run_args(tmp_path, small_synthetic)
    args[args.index("synthetic")] = "synthetc"
    _cli_refused(tmp_path, args, "unknown dataset 'synthetc'. Did you mean 'synthetic'?",
                 "`ssl-segbench list datasets`", "hf:<org>/<name>")


def test_mistyped_preset_suggests_the_close_one(small_synthetic, tmp_path):
    _cli_refused(tmp_path, _run_args(tmp_path, small_synthetic, "pixels", "kmeans:leopar"),
                 "protocol 'kmeans' has no preset 'leopar'. Did you mean 'leopart'?", "`ssl-segbench list protocols`")


def test_mistyped_protocol_suggests_the_close_one(small_synthetic, tmp_path):
    _cli_refused(tmp_path, _run_args(tmp_path, small_synthetic, "pixels", "kmeanz,linear"),
                 "unknown protocol 'kmeanz'. Did you mean 'kmeans'? Known: datus, ")
    with pytest.raises(ProtocolError, match=r"no preset 'stgo'\. Did you mean 'stego'\?"):
        get_protocol("kmeans:stgo")


# --- an unreachable Hub ---------------------------------------------------------------------------------------------

def _closed_port() -> int:
    """A local port nothing listens on: a connection to it is refused at once, as with no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_and_not_cached_names_hf_hub_offline_and_the_cache(small_synthetic, tmp_path, hub_cache):
    # the tests run with HF_HUB_OFFLINE=1 and a fake cache that lacks this repo
    for name in ("nobody-org/absent-model", "hf-hub:nobody-org/absent-model"):
        _cli_refused(tmp_path, _run_args(tmp_path, small_synthetic, name), "checkpoint nobody-org/absent-model",
                     "HF_HUB_OFFLINE is set, so the Hub was not asked", f"HF_HUB_CACHE={hub_cache}",
                     "`hf download nobody-org/absent-model`")


@pytest.mark.parametrize("backbone", ["dino_vits16", "nobody-org/absent-model"])  # registry entry, ad-hoc repo
def test_unreachable_hub_is_said_at_once_with_hf_hub_offline(small_synthetic, tmp_path, backbone):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    rc, err = _cli(tmp_path, *_run_args(tmp_path, small_synthetic, backbone),
                   env={"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": endpoint})
    assert rc == 2 and "Traceback" not in err, err
    assert f"the Hugging Face Hub ({endpoint}) could not be reached" in err, err
    assert "set HF_HUB_OFFLINE=1" in err and "point HF_HUB_CACHE at a cache that holds it" in err
    # huggingface_hub logs each of its retries ("Retrying in 1s [Retry 1/5]", about 25 s in all): none happened
    assert "Retry" not in err, err
    _nothing_written(tmp_path)


@pytest.fixture()
def online_registry(tmp_path, monkeypatch):
    """A registry whose one entry is not in the fake cache, with HF_HUB_OFFLINE unset for ssl-segbench's own check."""
    reg = tmp_path / "backbones.yaml"
    reg.write_text("backbones:\n" + registry_entry("absent", "timm", "nobody-org/absent", None, 8, 32, 1))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    return str(reg)


def test_a_connection_error_while_downloading_names_hf_hub_offline(online_registry, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def lost(*args, **kwargs):  # the Hub answered the first request, then the connection went
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lost)
    with pytest.raises(BackboneError, match=r"could not be reached .*set HF_HUB_OFFLINE=1"):
        BackboneRef("absent", online_registry)


def test_the_first_failed_connection_ends_it_before_the_retrying_download(online_registry, monkeypatch):
    import huggingface_hub

    def refused(*args, **kwargs):
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    def never(*args, **kwargs):
        raise AssertionError("hf_hub_download (which retries 5 times) was called after the Hub was found unreachable")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", refused)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", never)
    with pytest.raises(BackboneError, match=r"(?s)could not be reached .*set HF_HUB_OFFLINE=1.*ConnectionRefusedError"):
        BackboneRef("absent", online_registry)


def test_an_answer_from_the_hub_is_not_called_unreachable(online_registry, monkeypatch):
    import huggingface_hub

    class RepositoryNotFoundError(Exception):
        """Stands in for the Hub's 404 answer."""

    def not_found(*args, **kwargs):
        raise RepositoryNotFoundError("404 Client Error: Repository Not Found for url")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", not_found)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found)
    with pytest.raises(BackboneError, match="the Hub did not serve it: check the repo id and revision") as info:
        BackboneRef("absent", online_registry)
    assert "could not be reached" not in str(info.value) and "HF_HUB_OFFLINE" not in str(info.value)


# --- where each dataset comes from ----------------------------------------------------------------------------------

def test_list_datasets_shows_each_source_and_licence(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ssl_segbench", "list", "datasets"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "COLUMNS": "80"})
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    for name, cls in DATASETS.items():  # one line each, unbroken even on a narrow terminal
        assert f"  {name}: {cls.source}. Licence: {cls.licence}" in out, name
    # facts from the datasets' own pages, spot-checked
    assert "https://www.cityscapes-dataset.com" in DATASETS["cityscapes27"].source
    assert "https://github.com/janghyuncho/PiCIE" in DATASETS["cocostuff27"].source
    assert "CC BY 4.0" in DATASETS["cocostuff27"].licence
    assert "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/" in DATASETS["voc"].source


@pytest.mark.parametrize("dataset", ["voc", "cityscapes27", "suim"])
def test_missing_dataset_names_its_source(small_synthetic, tmp_path, dataset):
    cls = DATASETS[dataset]
    args = _run_args(tmp_path, small_synthetic)
    args[args.index("synthetic")] = dataset
    args[args.index(str(small_synthetic))] = str(tmp_path / "not-downloaded")
    _cli_refused(tmp_path, args, f"dataset root {tmp_path / 'not-downloaded'} does not exist",
                 f"Source: {cls.source} Licence: {cls.licence}")  # (the message's line breaks read as spaces)
    args = [a for a in args if a not in ("--data-root", str(tmp_path / "not-downloaded"))]
    _cli_refused(tmp_path, args, f"dataset '{dataset}' not found: no --data-root given", f"Source: {cls.source}")
