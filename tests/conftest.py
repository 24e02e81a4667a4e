"""Test environment: no network, a private fake Hugging Face cache, private feature cache and results.

The Hub variables must be set before timm / transformers / huggingface_hub are imported, so they are set here at
import time; `hub` builds tiny checkpoints into that cache with the libraries' own save functions. faiss is
imported through the package first, so every test runs the matrix-product kernel a run does (faiss_blas.py).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

_ROOT = Path(tempfile.mkdtemp(prefix="ssl-segbench-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = str(_ROOT / "hub")
os.environ["HF_HOME"] = str(_ROOT / "hf-home")
os.environ["SSL_SEGBENCH_CACHE"] = str(_ROOT / "cache")
os.environ["SSL_SEGBENCH_RESULTS"] = str(_ROOT / "results")

import pytest  # noqa: E402

import ssl_segbench.faiss_blas  # noqa: E402,F401  (faiss loaded as a run loads it, before a test module imports it)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def hub_cache() -> Path:
    return Path(os.environ["HF_HUB_CACHE"])


@pytest.fixture()
def shared() -> Path:
    """../shared next to the repository, or skip."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory) -> Path:
    """A small synthetic SUIM-layout dataset (16 train / 8 test images)."""
    from ssl_segbench.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("data") / "synthetic", n_train=16, n_test=8, seed=3)
