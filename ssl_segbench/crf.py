"""Dense CRF post-processing (PROTOCOLS.md §0 "CRF post-processing", §6): label maps refined against the image.

The CRF is Krähenbühl & Koltun's fully connected CRF through `pydensecrf2` (a maintained build of Lucas Beyer's
`pydensecrf` bindings; install with `pip install 'ssl-segbench[crf]'`). Parameters are MaskDistill's and
MaskContrast's (`segmentation/utils/crf.py` in their code): 10 mean-field iterations, a Gaussian kernel with sxy 1 and
compat 3, a bilateral kernel with sxy 67, srgb 3 and compat 4, unaries −log of the softmax of the bilinearly upsampled
scores, and the RGB image at label resolution as the bilateral reference. (The original reads the image with OpenCV,
i.e. in BGR order; the bilateral kernel uses one srgb for all three channels, so the channel order does not change the
result.)

The CRF costs seconds per image, so many images go through a bounded pool (`pool_map`): worker processes started with
the *spawn* method (no fork of a process holding torch or OpenMP threads, a known cause of silent hangs), at most
`workers` tasks in flight, each with its own time limit. A task that outlives its limit ends the whole pool: the workers
are killed and `CRFTimeoutError` says which task and how to change the limit, instead of waiting for hours. This module
imports neither torch nor the CRF package at import time, so workers start fast and the package stays optional.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import multiprocessing
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from .errors import SegbenchError
from .extras import MissingExtraError, require
from .paths import crf_timeout, crf_workers

DEFAULT_TIMEOUT = 600.0  # seconds per task; $SSL_SEGBENCH_CRF_TIMEOUT overrides
UNARY_CLIP = 1e-5  # probabilities are clipped here before −log, as pydensecrf.utils.unary_from_softmax does


class CRFError(SegbenchError, RuntimeError):
    """The CRF cannot run (package missing, a worker died); the message says what to do."""


class CRFTimeoutError(CRFError):
    """A CRF task ran past its time limit; the pool was killed."""


@dataclass(frozen=True)
class CRFParams:
    """Mean-field dense CRF parameters; the defaults are MaskDistill's."""

    iterations: int = 10
    gauss_sxy: float = 1.0
    gauss_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0

    @classmethod
    def from_param(cls, value) -> "CRFParams | None":
        """A protocol's `crf` parameter → parameters: False/None → None (off), True → the original's, a dict →
        the original's with these fields replaced."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise CRFError(f"crf: unknown field(s) {sorted(unknown)}; fields: {sorted(cls.__dataclass_fields__)}")
            return cls(**value)
        raise CRFError(f"crf must be true, false or a dict of CRF parameters, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _densecrf():
    try:
        return require("pydensecrf.densecrf", "CRF post-processing (--crf, crf=true)")
    except MissingExtraError as e:  # as a CRFError, which the protocols' scoring reports with the protocol's name
        raise CRFError(str(e)) from None


def require_crf() -> None:
    """Raise CRFError now (before any work) when the CRF package is missing."""
    _densecrf()


def crf_refine(image: np.ndarray, probs: np.ndarray, params: CRFParams | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB image and (C, H, W) class probabilities → (H, W) int64 labels after mean-field inference."""
    dcrf = _densecrf()
    params = params or CRFParams()
    probs = np.asarray(probs, dtype=np.float32)
    c, h, w = probs.shape
    if image.shape != (h, w, 3):
        raise ValueError(f"crf: image is {image.shape} but the probabilities are {h}x{w}: they must have the same size")
    unary = np.ascontiguousarray(-np.log(np.clip(probs, UNARY_CLIP, None)).reshape(c, -1), dtype=np.float32)
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    d.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                           rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=params.bilateral_compat)
    q = np.asarray(d.inference(params.iterations), dtype=np.float32).reshape(c, h, w)
    return q.argmax(0).astype(np.int64)


# --- scores → probabilities at label resolution, in numpy (equal to torch.nn.functional.interpolate) ----------------

def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of 1-D linear interpolation with half-pixel centres (align_corners=False)."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def upsample(scores: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """(K, h, w) → (K, H, W) float32, as `F.interpolate(..., mode, align_corners=False)` computes it."""
    x = np.asarray(scores, dtype=np.float32)
    _, h, w = x.shape
    out_h, out_w = size
    if mode == "nearest":
        rows = np.minimum(np.floor(np.arange(out_h, dtype=np.float32) * np.float32(h / out_h)).astype(np.int64), h - 1)
        cols = np.minimum(np.floor(np.arange(out_w, dtype=np.float32) * np.float32(w / out_w)).astype(np.int64), w - 1)
        return x[:, rows][:, :, cols]
    if mode == "bilinear":
        r0, r1, rw = _linear_weights(h, out_h)
        x = x[:, r0] * (1 - rw)[None, :, None] + x[:, r1] * rw[None, :, None]
        c0, c1, cw = _linear_weights(w, out_w)
        return x[:, :, c0] * (1 - cw) + x[:, :, c1] * cw
    raise ValueError(f"upsample must be 'bilinear' or 'nearest', got {mode!r}")


def softmax(x: np.ndarray, axis: int = 0) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def refine_scores(image: np.ndarray, scores: np.ndarray, mode: str, params: CRFParams | None = None) -> np.ndarray:
    """(K, h, w) scores at token resolution → (H, W) labels: upsample to the image's size, softmax, CRF. The pool sends
    this (small scores, not full-resolution probabilities) to its workers."""
    probs = softmax(upsample(scores, image.shape[:2], mode), axis=0)
    return crf_refine(image, probs, params)


# --- a bounded, killable process pool -------------------------------------------------------------------------------

def default_workers() -> int:
    """$SSL_SEGBENCH_CRF_WORKERS, else min(8, CPU count); 0 means run in this process (no time limit)."""
    return crf_workers()


def default_timeout() -> float:
    return crf_timeout(DEFAULT_TIMEOUT)


def _kill(executor: cf.ProcessPoolExecutor) -> None:
    """Stop a pool now, including workers stuck inside a task (shutdown alone would wait for them forever)."""
    procs = list((getattr(executor, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            p.kill()
    executor.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.join(timeout=5)


def pool_map(fn: Callable, tasks: Iterable[tuple], *, workers: int | None = None, timeout: float | None = None,
             advance: Callable[[int], None] | None = None) -> Iterator:
    """Yield `fn(*task)` for each task, in order, computed in at most `workers` spawned processes.

    Tasks are drawn lazily and at most `workers` are in flight, so memory stays bounded and every submitted task is
    running (its time limit counts from its submission). A task still unfinished `timeout` seconds after submission
    kills the pool and raises `CRFTimeoutError`; a worker that dies raises `CRFError`. `workers=0` runs the tasks
    here, one after the other, without a time limit. `advance(1)` is called per finished task (a progress bar)."""
    workers = default_workers() if workers is None else workers
    timeout = default_timeout() if timeout is None else float(timeout)
    advance = advance or (lambda n=1: None)
    if workers <= 0:
        for task in tasks:
            yield fn(*task)
            advance(1)
        return
    it = iter(tasks)
    executor = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    pending: collections.deque = collections.deque()  # (task number, future, submitted at)
    done_cleanly = False
    try:
        n = 0
        exhausted = False
        while True:
            while not exhausted and len(pending) < workers:
                try:
                    task = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((n, executor.submit(fn, *task), time.monotonic()))
                n += 1
            if not pending:
                break
            number, fut, started = pending.popleft()
            try:
                result = fut.result(timeout=max(0.0, started + timeout - time.monotonic()))
            except cf.TimeoutError:
                raise CRFTimeoutError(
                    f"CRF task {number} did not finish within {timeout:g} s; the worker pool was killed. A dense CRF "
                    "on one image takes seconds: this is a hang or an image far larger than usual. Raise the limit "
                    "with SSL_SEGBENCH_CRF_TIMEOUT=<seconds>, or run serially with SSL_SEGBENCH_CRF_WORKERS=0 to "
                    "debug.") from None
            except cf.process.BrokenProcessPool as e:
                raise CRFError(f"a CRF worker process died during task {number} ({e}); out of memory? Use fewer "
                               "workers with SSL_SEGBENCH_CRF_WORKERS=<n>.") from None
            yield result
            advance(1)
        done_cleanly = True
    finally:
        if done_cleanly:
            executor.shutdown(wait=True)
        else:  # an error, a timeout, an interrupt or an abandoned generator: never wait on a stuck worker
            _kill(executor)
