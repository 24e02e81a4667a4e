"""The Python API: `evaluate(model, ...)` is `ssl-segbench run` called from Python.

It builds the same `runner.RunOptions` the CLI builds and calls the same `runner.run`, so a run from Python and the
same run from the CLI give the same record (key, metrics, provenance fields). `model` may be anything `--backbone`
takes, or an in-memory model object (`backbones/module.py`: a timm ViT/Eva, a transformers vision model, or an
`Adapter` around any nn.Module), whose identity is its state dict's digest. `cache=False` keeps every cache file
(features, digests, generated data) in a temporary folder removed after the run; `write_records=False` returns the
records without writing them.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .backbones.module import Adapter, preserved
from .records import Record, read_record
from .runner import RunOptions, RunOptionsError, run

__all__ = ["Adapter", "ProtocolResult", "Results", "evaluate"]


@dataclass(frozen=True)
class ProtocolResult:
    """One protocol's result: its record (`records.Record`), whether it was written, computed without writing or
    read back (status 'written', 'computed', 'skipped'), and the record's path."""

    record: Record
    status: str
    path: Path

    @property
    def miou(self) -> float:
        """Mean IoU over classes, a fraction in [0, 1], averaged over seeds."""
        return self.record.metrics["miou"]["mean"]

    @property
    def pixel_acc(self) -> float:
        """Pixel accuracy, a fraction in [0, 1], averaged over seeds."""
        return self.record.metrics["pixel_acc"]["mean"]


class Results(Mapping):
    """The protocols' results by protocol spec as given ('kmeans', 'kmeans:stego'); `records` lists their records."""

    def __init__(self, results: list[ProtocolResult]):
        self._by_spec = {r.record.protocol_spec: r for r in results}

    def __getitem__(self, spec: str) -> ProtocolResult:
        if spec not in self._by_spec:
            raise KeyError(f"no result for protocol '{spec}'; this run has: {', '.join(self._by_spec)}")
        return self._by_spec[spec]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_spec)

    def __len__(self) -> int:
        return len(self._by_spec)

    @property
    def records(self) -> list[Record]:
        return [r.record for r in self._by_spec.values()]

    def metrics(self, prefix: str = "segbench") -> dict[str, float]:
        """Flat {'<prefix>/<protocol>/miou': value, ... pixel_acc} for a training loop's logger."""
        return {f"{prefix}/{spec}/{m}": getattr(r, m) for spec, r in self._by_spec.items()
                for m in ("miou", "pixel_acc")}


def _protocol_params(params: dict | None) -> dict[str, dict]:
    """`params` as {protocol: {key: value}}: given nested ({"linear": {"epochs": 5}}) or flat with the protocol before
    a dot ({"linear.epochs": 5}), as `--param linear.epochs=5` writes it."""
    out: dict[str, dict] = {}
    for key, value in (params or {}).items():
        if isinstance(value, dict):
            out.setdefault(key, {}).update(value)
        elif isinstance(key, str) and "." in key:
            proto, _, name = key.partition(".")
            out.setdefault(proto, {})[name] = value
        else:
            raise RunOptionsError(f"params {{{key!r}: {value!r}}}: name the protocol, as {{'PROTOCOL.KEY': VALUE}} "
                                  "(e.g. {'linear.epochs': 5}) or {'PROTOCOL': {'KEY': VALUE}}")
    return out


@contextlib.contextmanager
def _temporary_cache() -> Iterator[None]:
    """SSL_SEGBENCH_CACHE pointed at a fresh temporary folder for the block, which is removed after it."""
    before = os.environ.get("SSL_SEGBENCH_CACHE")
    with tempfile.TemporaryDirectory(prefix="ssl-segbench-nocache-") as tmp:
        os.environ["SSL_SEGBENCH_CACHE"] = tmp
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("SSL_SEGBENCH_CACHE", None)
            else:
                os.environ["SSL_SEGBENCH_CACHE"] = before


def evaluate(model, dataset: str = "synthetic", data_root: str | Path | None = None, split: str | None = None,
             protocols=("kmeans", "linear"), device: str = "auto", params: dict | None = None,
             seeds: int | list[int] | None = None, size: int = 224, resize: str = "shorter", layer: int = -1,
             crf: bool = False, save_masks: str | Path | None = None, results_dir: str | Path | None = None,
             cache: bool = True, write_records: bool = True, batch_size: int | None = None,
             workers: int | None = None, mean=None, std=None, overwrite: str = "skip", registry: str | None = None,
             dataset_options: dict | None = None, arch: str | None = None,
             checkpoint_key: str | None = None) -> Results:
    """Benchmark `model` on `dataset` with each protocol of `protocols` (names or presets, 'kmeans:stego'; a comma
    string as --protocol takes it works too), exactly as `ssl-segbench run` does with the same options (same names,
    same defaults). `model`: a registry id or --backbone string, a timm VisionTransformer / Eva, a transformers vision
    model, or `Adapter(module, ...)`. `params`: {'linear.epochs': 5} or {'linear': {'epochs': 5}}; `crf`: the CRF for
    every protocol (--crf); `mean`/`std`: the input normalisation, replacing the model's own; `arch` / `checkpoint_key`:
    the timm architecture and key set of a training checkpoint file (--arch, --checkpoint-key). `device='auto'` runs an
    in-memory model where its parameters are. `cache=False`: nothing is written under the cache root;
    `write_records=False`: no record file is written. Returns the results by protocol spec."""
    if isinstance(protocols, str):
        protocols = [p.strip() for p in protocols.split(",") if p.strip()]
    protocols = tuple(protocols)
    by_protocol = _protocol_params(params)
    if crf:
        for spec in protocols:
            by_protocol.setdefault(spec.partition(":")[0], {})["crf"] = True
    module = model.module if isinstance(model, Adapter) else None if isinstance(model, str) else model
    if device == "auto" and module is not None:
        device = next((str(p.device) for p in module.parameters()), "auto")
    opts = RunOptions(backbone=model, dataset=dataset, protocols=protocols,
                      data_root=None if data_root is None else str(data_root), split=split, device=device,
                      batch_size=batch_size, workers=workers, seeds=seeds, layer=layer, resize=resize, size=size,
                      results_dir=None if results_dir is None else Path(results_dir), overwrite=overwrite,
                      registry=registry, params=by_protocol, dataset_options=dataset_options,
                      save_masks=None if save_masks is None else Path(save_masks), write_records=write_records,
                      mean=None if mean is None else tuple(mean), std=None if std is None else tuple(std),
                      arch=arch, checkpoint_key=checkpoint_key)
    with contextlib.ExitStack() as stack:
        if module is not None:
            stack.enter_context(preserved(module))
        if not cache:
            stack.enter_context(_temporary_cache())
        out = run(opts)
    return Results([ProtocolResult(record if record is not None else read_record(path), status, path)
                    for status, path, record in out])
