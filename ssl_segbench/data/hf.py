"""`hf:<org>/<name>`: a Hugging Face `datasets` dataset with an image column and a mask column.

Sources, in order:
- ``root`` written by `save_to_disk` (has dataset_dict.json or state.json): read with `datasets.load_from_disk`;
- ``root`` any other folder (a local copy of the Hub repository, e.g. parquet files): `datasets.load_dataset(root)`;
- no ``root``: `datasets.load_dataset("<org>/<name>", revision=...)` from the Hub or, with HF_DATASETS_OFFLINE=1, from
  the local cache only. A ``revision`` (commit sha or tag) is required here so every run reads the same data.
Rows are materialised one at a time from the memory-mapped Arrow files, so memory stays flat whatever the split size.
Classes come from ``classes`` (a classes file as for `folder`, or a list of names) or from classes.yaml/json in
``root``; masks are integer label maps (or RGB with a palette), checked against the class range and ignore index.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..fingerprint import content_sha256
from .base import ColourLabels, DatasetError, Sample, SegmentationDataset
from .folder import decode_user_mask, find_classes_file, read_classes_file


class HFDataset(SegmentationDataset):
    """A `datasets` split as a segmentation dataset; its id is ``hf:<repo>``."""

    source = "the Hugging Face Hub dataset <org>/<name> (or a local copy of it)"
    licence = "the dataset card's"
    layout = ("  hf:<org>/<name> with --data-root unset: the Hub (or the local cache with HF_DATASETS_OFFLINE=1),\n"
              "      options revision=<sha|tag> (required), image_column=image, mask_column=mask, classes=FILE\n"
              "  --data-root DIR: a save_to_disk folder (dataset_dict.json / state.json) or a local copy of the repo,\n"
              "      with classes.yaml|json in DIR or classes=FILE")
    colour_masks = True  # with a palette in the classes file (then per dataset: see __init__)

    def __init__(self, root, split=None, *, repo: str, revision: str | None = None, config: str | None = None,
                 image_column: str = "image", mask_column: str = "mask", name_column: str | None = None,
                 classes: str | Path | list[str] | None = None, cache_dir: str | Path | None = None,
                 skip_bad: bool = False, resize_masks: bool = False, off_palette: str = "refuse"):
        self.id = f"hf:{repo}"
        self.repo, self.revision = repo, revision
        self.image_column, self.mask_column, self.name_column = image_column, mask_column, name_column
        local = Path(root).expanduser() if root is not None else None
        self._splits, self._source = self._open(local, config, cache_dir)
        self._read_classes(local, classes)
        keys = list(self._splits)
        self.eval_split = next((s for s in ("validation", "val", "test") if s in keys), keys[0])
        self.train_split = "train" if "train" in keys else None
        if split == "val" and "val" not in keys and "validation" in keys:
            split = "validation"
        if local is None:
            import datasets
            local = Path(cache_dir or datasets.config.HF_DATASETS_CACHE)
        self.colour_masks = self._palette is not None
        super().__init__(local, split, skip_bad=skip_bad, resize_masks=resize_masks, off_palette=off_palette)

    def _open(self, local: Path | None, config: str | None, cache_dir) -> tuple[dict, str]:
        import datasets

        try:
            if local is not None and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
                loaded, source = datasets.load_from_disk(str(local)), f"load_from_disk({local})"
            elif local is not None:
                if not local.is_dir():
                    raise DatasetError(f"dataset root {local} does not exist.\nExpected layout for '{self.id}':\n"
                                       f"{self.layout}")
                loaded = datasets.load_dataset(str(local), name=config, cache_dir=cache_dir)
                source = f"load_dataset({local}) (local copy; revision {self.revision or 'not given'})"
            else:
                if not self.revision:
                    raise DatasetError(f"'{self.id}' from the Hub needs revision=<commit sha or tag> so every run "
                                       "reads the same data (or give --data-root to a local copy)")
                loaded = datasets.load_dataset(self.repo, name=config, revision=self.revision, cache_dir=cache_dir)
                source = f"load_dataset({self.repo}, revision={self.revision})"
        except DatasetError:
            raise
        except Exception as e:  # noqa: BLE001 - the Hub client raises many kinds (connection, missing repo, offline)
            raise DatasetError(f"cannot load '{self.id}': {type(e).__name__}: {e}\nOffline, set HF_DATASETS_OFFLINE=1 "
                               "with the dataset in the cache, or pass --data-root to a save_to_disk copy.") from e
        if isinstance(loaded, datasets.Dataset):
            loaded = {str(loaded.split or "all"): loaded}
        for name, ds in loaded.items():
            missing = [c for c in (self.image_column, self.mask_column, self.name_column)
                       if c is not None and c not in ds.column_names]
            if missing:
                raise DatasetError(f"'{self.id}' split '{name}' has no column(s) {missing}; columns: "
                                   f"{ds.column_names}. Choose with image_column=, mask_column=, name_column=.")
        return dict(loaded), source

    def _read_classes(self, local: Path | None, classes) -> None:
        self._palette = None
        if isinstance(classes, (list, tuple)):
            self.class_names, self.ignore_index = tuple(str(c) for c in classes), 255
            return
        if classes is not None:
            path = Path(classes).expanduser()
        else:
            path = find_classes_file(local) if local is not None else None
        if path is None:
            raise DatasetError(f"'{self.id}' needs class names: pass classes=FILE (YAML/JSON with names, ignore_index, "
                               "palette) or put classes.yaml in the data root")
        self.class_names, self.ignore_index, self._palette = read_classes_file(path)

    def available_splits(self) -> list[str]:
        return list(self._splits)

    @property
    def palette(self) -> np.ndarray:
        return self._palette if self._palette is not None else super().palette

    def _find_samples(self) -> list[Sample]:
        self.notes.append(f"source: {self._source}")
        ds = self._splits[self.split]
        names = [str(n) for n in ds[self.name_column]] if self.name_column else [f"{i:06d}" for i in range(len(ds))]
        if len(set(names)) != len(names):
            raise DatasetError(f"'{self.id}' split '{self.split}': column '{self.name_column}' has duplicate values; "
                               "choose a unique name_column or leave it unset (row numbers are used)")
        self._rows = {n: i for i, n in enumerate(names)}
        self._images = ds.select_columns([self.image_column])
        self._masks = ds.select_columns([self.mask_column])
        where = Path(self.repo, self.split)  # rows have no files: these paths only name the cell in messages
        return [Sample(n, where / n / self.image_column, where / n / self.mask_column) for n in names]

    def _cell(self, table, column: str, name: str):
        try:
            value = table[self._rows[name]][column]
        except (OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"cannot decode {column} of row '{name}' in '{self.id}' split '{self.split}': "
                               f"{e}") from e
        if value is None:
            raise DatasetError(f"row '{name}' of '{self.id}' split '{self.split}' has no {column}")
        return value

    def load_image(self, i: int) -> Image.Image:
        value = self._cell(self._images, self.image_column, self.samples[i].name)
        if not isinstance(value, Image.Image):
            raise DatasetError(f"column '{self.image_column}' of '{self.id}' holds {type(value).__name__}, not images")
        return value.convert("RGB")

    def image_size(self, i: int) -> tuple[int, int]:
        return self.load_image(i).size

    def _read_mask(self, sample: Sample) -> np.ndarray | ColourLabels:
        value = self._cell(self._masks, self.mask_column, sample.name)
        return decode_user_mask(value if isinstance(value, Image.Image) else np.asarray(value), self.num_classes,
                                self.ignore_index, self._palette, sample.mask)

    def decoding_identity(self) -> dict:
        return {**super().decoding_identity(), "repo": self.repo, "revision": self.revision,
                "image_column": self.image_column, "mask_column": self.mask_column, "name_column": self.name_column,
                "class_names": list(self.class_names), "ignore_index": self.ignore_index,
                "palette": None if self._palette is None else self._palette.tolist()}

    def _digest_content(self) -> str:
        """sha256 over the decoding options, the row names and the bytes of the split's Arrow files (through the
        manifest, as for file datasets); a split held only in memory falls back to its `datasets` fingerprint."""
        ds = self._splits[self.split]
        arrow = [Path(f["filename"]) for f in ds.cache_files]
        header = {"id": self.id, "version": self.version, "split": self.split, "decoding": self.decoding_identity(),
                  "rows": [s.name for s in self.samples], "fingerprint": None if arrow else ds._fingerprint}
        files = [(f"arrow|{p.name}", p) for p in arrow]
        return content_sha256(header, files, arrow[0].parent if arrow else self.root, self.id)
