"""faiss, imported here and nowhere else in the package, with the matrix-product kernel of its bundled OpenBLAS pinned,
and the name of the kernel it runs (`blas_config`) for each record's provenance.

Why: faiss's k-means assignment and exact search are OpenBLAS matrix products. The OpenBLAS inside faiss-cpu (0.3.15
in faiss-cpu 1.15.1) chooses its kernel from the CPU when it is loaded, and falls back to the SSE3 `Prescott` kernel
on CPUs newer than itself: on this project's AVX-512 Xeon, k-means assignments ran 2.2× slower than with the AVX2
kernel. Kernels also sum in different orders, so the centroids of one fit could differ in their last bits (and, at
a tie, a point's cluster) between machines whose CPUs OpenBLAS classes differently. Loading it with
`OPENBLAS_CORETYPE=Haswell` (AVX2 and FMA: every x86-64 CPU of the last decade) runs one kernel on all of them.

The variable is set only around `import faiss` and only where the CPU has AVX2 and FMA (Linux x86-64): numpy's own
OpenBLAS is loaded before it and keeps its choice, child processes do not inherit it, and a value the user set wins.
Where faiss was imported before this package, or the CPU lacks AVX2, OpenBLAS keeps its own choice; either way the
record says which kernel ran."""
from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys

import numpy  # noqa: F401  (loads numpy's own OpenBLAS first, so the variable below reaches faiss's alone)

PINNED_CORE = "Haswell"
_VAR = "OPENBLAS_CORETYPE"


def _has_avx2_fma() -> bool:
    """Whether this is Linux x86-64 on a CPU with AVX2 and FMA (the pinned kernel's instructions)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return {"avx2", "fma"} <= set(flags)


def _import_faiss():
    if "faiss" in sys.modules or _VAR in os.environ or not _has_avx2_fma():
        import faiss  # lazy: imported with OpenBLAS's own choice (see the module docstring)
        return faiss
    os.environ[_VAR] = PINNED_CORE
    try:
        import faiss  # lazy: OpenBLAS reads the variable when faiss loads it, here
    finally:
        del os.environ[_VAR]
    return faiss


faiss = _import_faiss()


def blas_config() -> str | None:
    """faiss's OpenBLAS build and the kernel it runs (e.g. 'OpenBLAS 0.3.15 DYNAMIC_ARCH ... core Haswell'), or None
    where faiss links no OpenBLAS of its own (a conda or GPU build)."""
    libs = os.path.join(os.path.dirname(os.path.dirname(faiss.__file__)), "faiss_cpu.libs")
    for path in sorted(glob.glob(os.path.join(libs, "libopenblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)
            lib.openblas_get_config.restype = lib.openblas_get_corename.restype = ctypes.c_char_p
            return f"{lib.openblas_get_config().decode()} core {lib.openblas_get_corename().decode()}"
        except (OSError, AttributeError):
            return None
    return None
