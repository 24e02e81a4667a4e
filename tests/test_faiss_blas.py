"""faiss's OpenBLAS kernel (`faiss_blas.py`): pinned to the AVX2 kernel where the CPU has it, the variable gone again
after the import (children and numpy keep their own choice), a user's choice respected, and the kernel recorded in
every record's provenance."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ssl_segbench import faiss_blas
from ssl_segbench.cli import main
from ssl_segbench.records import iter_records

pytestmark = pytest.mark.skipif(faiss_blas.blas_config() is None, reason="this faiss links no OpenBLAS of its own")

_PROBE = ("import json, os, ssl_segbench.cluster as c, ssl_segbench.faiss_blas as b; "
          "print(json.dumps([b.blas_config(), os.environ.get('OPENBLAS_CORETYPE')]))")


def _probe(**env) -> tuple[str, str | None]:
    """(faiss's OpenBLAS config, the variable after the import) in a fresh interpreter."""
    clean = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return tuple(json.loads(out.stdout))


@pytest.mark.skipif(not faiss_blas._has_avx2_fma(), reason="the CPU has no AVX2/FMA: OpenBLAS keeps its own kernel")
def test_the_avx2_kernel_is_pinned_and_the_variable_is_gone_after_the_import():
    config, var = _probe()
    assert config.endswith(f"core {faiss_blas.PINNED_CORE}") and var is None


@pytest.mark.skipif(not faiss_blas._has_avx2_fma(), reason="'Prescott' names an x86 kernel: this is not Linux x86-64")
def test_a_kernel_the_user_chose_is_kept_and_named():
    config, var = _probe(OPENBLAS_CORETYPE="Prescott")
    assert config.endswith("core Prescott") and var == "Prescott"


def test_the_kernel_is_in_the_record(small_synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    assert main(["run", "--backbone", "pixels", "--dataset", "synthetic", "--data-root", str(small_synthetic),
                 "--size", "64", "--protocol", "kmeans", "--seeds", "1", "--results-dir", str(tmp_path / "r")]) == 0
    [(_, rec)] = list(iter_records(tmp_path / "r"))
    assert rec.provenance["faiss_blas"] == faiss_blas.blas_config() and "OpenBLAS" in rec.provenance["faiss_blas"]
