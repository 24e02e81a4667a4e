"""Dataset registry: dataset ids → loader classes reading the authors' own layouts.

Every module of this package is a dataset (registered with `@register_dataset`) or a helper they share
(SHARED_MODULES); a new dataset is one new file."""
from __future__ import annotations

import inspect
from pathlib import Path

from ..paths import data_dir, safe_component
from .base import DATASETS, HF_PREFIX, DatasetError, Sample, SegmentationDataset, register_dataset, voc_palette
from .hf import HFDataset

# helpers the datasets share, and `hf` (opened by the `hf:<org>/<name>` prefix, not registered); every other module is
# a dataset
SHARED_MODULES = ("base", "check", "hf", "labels")


def dataset_options(cls: type[SegmentationDataset]) -> list[str]:
    """The keyword options a dataset class accepts (e.g. skip_bad, curated_list); off_palette only where masks may be
    decoded by colour."""
    return [p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is p.KEYWORD_ONLY and (p.name != "off_palette" or cls.colour_masks)]


def get_dataset(dataset_id: str, root: str | Path | None, split: str | None = None, **options) -> SegmentationDataset:
    """Open `dataset_id` at `root`; without one, at $SSL_SEGBENCH_DATA/<dataset id> (default ./data/<dataset id>;
    the synthetic set generates its own root).

    `options` go to the loader: ``skip_bad=True`` for every dataset, others per dataset (see `dataset_options`).
    ``hf:<org>/<name>`` opens a Hugging Face `datasets` dataset (root: a local copy, or None for the Hub / cache).
    """
    if dataset_id.startswith(HF_PREFIX):
        cls, options = HFDataset, {**options, "repo": dataset_id[len(HF_PREFIX):]}
    else:
        cls = DATASETS.get(dataset_id)
    unknown = sorted(set(options) - set(dataset_options(cls)))
    if unknown:
        raise DatasetError(f"dataset '{dataset_id}' takes no option(s) {unknown}; it takes: "
                           f"{', '.join(o for o in dataset_options(cls) if o != 'repo')}")
    if root is None and cls.__name__ != "HFDataset":  # the Hub source needs no root
        default_root = getattr(cls, "default_root", None)
        if default_root is not None:
            root = default_root()
        else:
            root = data_dir() / safe_component(dataset_id)
            if not root.is_dir():
                raise DatasetError(f"dataset '{dataset_id}' not found: no --data-root given and {root} does not "
                                   "exist. Pass --data-root DIR, or put the dataset there ($SSL_SEGBENCH_DATA/<dataset "
                                   f"id>, default ./data/<dataset id>). Expected layout:\n{cls.layout}\n"
                                   f"{cls.where_to_get()}")
    return cls(root, split, **options)


DATASETS.discover(__name__, shared=SHARED_MODULES)

__all__ = ["DATASETS", "HF_PREFIX", "SHARED_MODULES", "DatasetError", "Sample", "SegmentationDataset",
           "dataset_options", "get_dataset", "register_dataset", "voc_palette"]
