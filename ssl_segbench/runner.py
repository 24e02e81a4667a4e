"""One benchmark run: backbone × dataset × protocols → records. The only place the pipeline's stages meet."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .backbones import BackboneRef
from .data import get_dataset
from .features import extract
from .metrics import bootstrap_ci
from .paths import results_dir as default_results_dir
from .protocols import Context, get_protocol
from .records import SCHEMA, encode_array, environment, record_key, record_path, summarize, write_json_atomic
from .transforms import Transform

OVERWRITE = ("skip", "always")


@dataclass
class RunOptions:
    backbone: str
    dataset: str
    protocols: tuple[str, ...] = ("kmeans", "linear")
    data_root: str | None = None
    split: str | None = None
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    seeds: list[int] | None = None
    layer: int = -1
    resize: str = "shorter"
    size: int = 224
    results_dir: Path | None = None
    overwrite: str = "skip"
    registry: str | None = None
    params: dict | None = None  # {protocol name: {param: value}}
    dataset_options: dict | None = None  # loader options (skip_bad, curated_list, ...), for every split alike
    save_masks: Path | None = None  # label maps (first seed, class space) as PNGs under <save_masks>/<protocol>/
    write_records: bool = True  # False: compute and return records without storing them (e.g. for `show`)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} requested but CUDA is not available (torch {torch.__version__})")
    return device


def run(opts: RunOptions, on_record=lambda status, path, record: None) -> list[tuple[str, Path, dict | None]]:
    """Run every protocol; returns (status, path, record) with status 'written', 'skipped' (record exists) or
    'computed' (write_records=False)."""
    if opts.overwrite not in OVERWRITE:
        raise ValueError(f"overwrite must be one of {OVERWRITE}")
    device = resolve_device(opts.device)
    ref = BackboneRef(opts.backbone, opts.registry)
    options = opts.dataset_options or {}
    eval_set = get_dataset(opts.dataset, opts.data_root, opts.split, **options)
    train_set = None
    tsplit = eval_set.train_split
    if tsplit and tsplit != eval_set.split and tsplit in eval_set.available_splits():
        train_set = get_dataset(opts.dataset, opts.data_root, tsplit, **options)
    batch_size = opts.batch_size or (64 if device.startswith("cuda") else 16)
    workers = opts.workers if opts.workers is not None else (4 if device.startswith("cuda") else 0)
    results = Path(opts.results_dir or default_results_dir())
    out = []
    for spec in opts.protocols:
        name = spec.partition(":")[0]
        proto = get_protocol(spec, **((opts.params or {}).get(name, {})))
        params = dict(proto.params)
        params["resize"] = params["resize"] or opts.resize
        params["size"] = params["size"] or opts.size
        transform = Transform(params["resize"], params["size"], ref.spec.patch_size)
        seeds = list(opts.seeds) if opts.seeds is not None else list(range(proto.default_seeds))
        identity = {"backbone": ref.spec.id, "source": ref.source, "revision": ref.revision,
                    "dataset": eval_set.id, "split": eval_set.split, "files_sha256": eval_set.file_list_sha256(),
                    "protocol": proto.name, "version": proto.version, "params": params, "layer": opts.layer,
                    "seeds": seeds}
        path = record_path(results, identity)
        if opts.write_records and path.exists() and opts.overwrite == "skip":
            out.append(("skipped", path, None))
            on_record("skipped", path, None)
            continue

        def features(ds, facets, transform=transform):
            return extract(ref, ds, transform, opts.layer, facets, device, batch_size, workers)

        ctx = Context(eval_set=eval_set, train_set=train_set, features=features, seeds=seeds, device=device,
                      backbone_ref=ref, transform=transform,
                      save_masks=Path(opts.save_masks) / proto.name if opts.save_masks else None)
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        t0 = time.perf_counter()
        result = proto.run(ctx)
        metrics = summarize(result["per_seed"])
        stats = result.get("image_stats")
        if stats is not None:  # 95% interval of the seed mean, resampling images
            for m, ci in bootstrap_ci(stats).items():
                metrics[m]["ci95"] = ci
        record = {
            "schema": SCHEMA, "key": record_key(identity), "identity": identity,
            "backbone": {**ref.spec.to_dict(), "source": ref.source, "revision_resolved": ref.revision,
                         "layer": opts.layer},
            "dataset": eval_set.describe(),
            "protocol": {"name": proto.name, "version": proto.version, "preset": proto.preset, "params": params},
            "transform": transform.to_dict(), "seeds": seeds,
            "metrics": metrics, "per_seed": result["per_seed"],
            "info": {**result.get("info", {}), **ctx.info}, "confusions": result.get("confusions"),
            "image_stats": None if stats is None else {
                "what": "per seed, per image (dataset order), per class: [tp, fp, fn] after matching",
                **encode_array(stats)},
            "provenance": {**environment(), "ssl_segbench": __version__, "device": device,
                           "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
                           "batch_size": batch_size, "started": started,
                           "wall_seconds": round(time.perf_counter() - t0, 3),
                           "cache_hit": all(ctx.cache_hits), "feature_entries": len(ctx.cache_hits)},
        }
        status = "written" if opts.write_records else "computed"
        if opts.write_records:
            write_json_atomic(path, record)
        out.append((status, path, record))
        on_record(status, path, record)
    return out
