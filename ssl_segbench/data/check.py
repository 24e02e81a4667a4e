"""`ssl-segbench datasets check` (validate a dataset on disk before spending compute on it) and `list datasets`.

`check_dataset` reads every image and mask of a split once: each image must decode and have its mask, the mask must
decode at the image's size (or be resized where `-o resize_masks=true` allows it), every label must be a class
index or the ignore index, and a colour mask must hold no colour off the palette (a warning, with the count, where
`-o off_palette=nearest|ignore` maps them). It prints counts and a class histogram and returns non-zero with the
offending files listed.
"""
from __future__ import annotations

import argparse

import numpy as np
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from ..paths import data_dir, safe_component
from ..progress import out
from . import DATASETS, HF_PREFIX, dataset_options, get_dataset
from .base import OFF_PALETTE_CHOICES, DatasetError, SegmentationDataset
from .hf import HFDataset

EXIT_OK, EXIT_BAD_FILES, EXIT_UNOPENABLE = 0, 1, 2


def _scan(dataset: SegmentationDataset, progress: Progress | None) -> dict:
    """One pass over the split: per-class pixel counts and every problem, each naming its file."""
    n_cls, ignore = dataset.num_classes, dataset.ignore_index
    out = {"pixels": np.zeros(n_cls, np.int64), "images_with": np.zeros(n_cls, np.int64), "ignored": 0,
           "masks": 0, "unlabelled": 0, "problems": [], "resized": [], "warnings": []}
    task = progress.add_task(f"checking {dataset.id}/{dataset.split}", total=len(dataset)) if progress else None
    for i, s in enumerate(dataset.samples):
        if progress:
            progress.advance(task)
        try:
            dataset.load_image(i)
        except DatasetError as e:
            out["problems"].append((str(s.image), str(e)))
            continue
        if s.mask is None:
            out["unlabelled"] += 1
            continue
        try:
            mask, resized = dataset.load_mask_checked(i)
            warning = dataset.check_mask(i)
        except DatasetError as e:
            out["problems"].append((str(s.mask), str(e)))
            continue
        if resized:
            out["resized"].append((str(s.mask), "resized to its image's size (resize_masks)"))
        if warning:
            out["warnings"].append((str(s.mask), warning))
        out["masks"] += 1
        labelled = mask != ignore
        outside = labelled & ((mask < 0) | (mask >= n_cls))
        if outside.any():
            out["problems"].append((str(s.mask), f"label values {np.unique(mask[outside])[:10].tolist()} outside "
                                                  f"0..{n_cls - 1} and ignore {ignore}"))
            continue
        counts = np.bincount(mask[labelled], minlength=n_cls)
        out["pixels"] += counts
        out["images_with"] += counts > 0
        out["ignored"] += int((~labelled).sum())
    return out


def _file_table(title: str, rows: list[tuple[str, str]], limit: int, style: str) -> Table:
    table = Table(title=title, title_style=style, show_lines=False)
    table.add_column("file", overflow="fold")
    table.add_column("problem", overflow="fold")
    for path, msg in rows[:limit]:
        table.add_row(escape(path), escape(msg))
    if len(rows) > limit:
        table.add_row(f"... and {len(rows) - limit} more", "")
    return table


def check_dataset(dataset: SegmentationDataset, console: Console | None = None, *, fail_on_skipped: bool = True,
                  max_listed: int = 50) -> int:
    """Validate every sample of `dataset`, print counts, a class histogram and the problems; 0 when clean, else 1.

    Samples the dataset left out under skip_bad count as problems unless ``fail_on_skipped=False``.
    """
    console = console or out
    if console.is_terminal:
        with Progress(console=console, transient=True) as progress:
            res = _scan(dataset, progress)
    else:
        res = _scan(dataset, None)

    try:
        digest = dataset.content_sha256()
    except DatasetError as e:  # a split refused as a whole (off-palette masks): its masks are listed as problems
        digest = f"none: {e}"
    summary = Table(title=f"{dataset.id} / {dataset.split}", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    for key, value in (("root", str(dataset.root)), ("images", len(dataset)), ("masks decoded", res["masks"]),
                       ("images without mask (unlabelled split)", res["unlabelled"]),
                       ("skipped (skip_bad)", len(dataset.skipped)), ("masks resized", len(res["resized"])),
                       ("masks with warnings", len(res["warnings"])), ("problems", len(res["problems"])),
                       ("content_sha256", digest)):
        summary.add_row(key, escape(str(value)))
    for note in dataset.notes:
        summary.add_row("note", escape(note))
    console.print(summary)

    hist = Table(title="class histogram")
    for col in ("index", "class", "pixels", "% of labelled", "images"):
        hist.add_column(col, justify="left" if col == "class" else "right")
    total = max(int(res["pixels"].sum()), 1)
    for c, name in enumerate(dataset.class_names):
        hist.add_row(str(c), escape(name), f"{res['pixels'][c]:,}", f"{100 * res['pixels'][c] / total:.2f}",
                     f"{res['images_with'][c]:,}")
    hist.add_row(str(dataset.ignore_index), "(ignore)", f"{res['ignored']:,}", "", "")
    console.print(hist)

    if res["resized"]:
        console.print(_file_table("masks resized to their image (resize_masks)", res["resized"], max_listed, "yellow"))
    if res["warnings"]:
        console.print(_file_table("mask warnings", res["warnings"], max_listed, "yellow"))
    if dataset.skipped:
        style = "red" if fail_on_skipped else "yellow"
        console.print(_file_table("skipped samples", dataset.skipped, max_listed, style))
    if res["problems"]:
        console.print(_file_table("problems", res["problems"], max_listed, "red"))
    failed = bool(res["problems"]) or (fail_on_skipped and bool(dataset.skipped))
    console.print("[red]FAILED[/red]" if failed else "[green]OK[/green]")
    return EXIT_BAD_FILES if failed else EXIT_OK


def parse_options(pairs: list[str] | None) -> dict:
    """["key=value", ...] → {key: YAML-parsed value} (so true, 3 and paths come out as bool, int and str)."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DatasetError(f"option '{pair}' is not KEY=VALUE")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


def dataset_arguments(dataset_default: str | None = None) -> argparse.ArgumentParser:
    """The dataset options of `run`, `show` and `datasets check`, declared once (an argparse parent): which dataset,
    where, which split, its loader options. With no `dataset_default`, --dataset is required."""
    where = str(data_dir()).replace("%", "%%")  # argparse %-formats help texts
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--dataset", default=dataset_default, required=dataset_default is None,
                        help="dataset id (see `list datasets`) or hf:<org>/<name>")
    parent.add_argument("--data-root",
                        help=f"dataset root in its native layout (default: the folder `list datasets` shows: "
                             f"$SSL_SEGBENCH_DATA/<dataset id>, now {where}/<dataset id>; synthetic: generated)")
    parent.add_argument("--split", help="split to read (default: the dataset's evaluation split)")
    parent.add_argument("-o", "--option", action="append", metavar="KEY=VALUE",
                        help="dataset option, repeatable (e.g. curated_list=PATH, resize_masks=true, revision=SHA; "
                             "`list datasets` names each dataset's)")
    parent.add_argument("--skip-bad", action="store_true",
                        help="leave unreadable or malformed samples out instead of failing (a record counts them, "
                             "`datasets check` lists them)")
    return parent


def dataset_options_of(args: argparse.Namespace) -> dict:
    """The loader options of parsed `dataset_arguments`: each -o KEY=VALUE, and skip_bad=True from --skip-bad."""
    options = parse_options(args.option)
    if args.skip_bad:
        options["skip_bad"] = True
    return options


def run_check(args: argparse.Namespace, console: Console | None = None) -> int:
    """Handler of `datasets check`: 2 if the dataset cannot be opened, 1 if files are bad, 0 if clean."""
    console = console or out
    try:
        dataset = get_dataset(args.dataset, args.data_root, args.split, **dataset_options_of(args))
    except DatasetError as e:
        console.print(f"[red]cannot open '{escape(args.dataset)}':[/red] {escape(str(e))}", highlight=False)
        return EXIT_UNOPENABLE
    return check_dataset(dataset, console, fail_on_skipped=not args.skip_bad)


def _options(cls) -> str:
    """The options column of `list datasets`; off_palette with its choices."""
    return ", ".join("off_palette=" + "|".join(OFF_PALETTE_CHOICES) if o == "off_palette" else o
                     for o in dataset_options(cls) if o != "repo")


def run_list(args: argparse.Namespace, console: Console | None = None) -> int:
    """Handler of `list datasets`: every dataset id with its classes, splits, options, the folder it is read from
    when no --data-root is given, and where it is downloaded from under which licence."""
    console = console or out
    table = Table(title=f"datasets (default root: $SSL_SEGBENCH_DATA/<id>, now {data_dir()}/<id>)")
    for col in ("id", "classes", "splits", "options", "default root"):
        table.add_column(col)
    for name in sorted(DATASETS):
        cls = DATASETS[name]
        where = "generated in the cache" if getattr(cls, "default_root", None) else str(data_dir() / name)
        table.add_row(name, str(len(cls.class_names)) if cls.class_names else "from classes file",
                      ", ".join(cls.splits) or "from folders", _options(cls), escape(where))
    hf_id = f"{HF_PREFIX}<org>/<name>"
    table.add_row(escape(hf_id), "from classes file", "from the dataset", _options(HFDataset),
                  escape(f"the Hub cache, or {data_dir() / safe_component('hf:<org>/<name>')}"))
    console.print(table)
    console.print("where to get them:")
    for name, cls in [*sorted(DATASETS.items()), (hf_id, HFDataset)]:  # one line each, so no URL is broken
        console.print(escape(f"  {name}: {cls.source}. Licence: {cls.licence}"), soft_wrap=True, highlight=False)
    return EXIT_OK


def add_datasets_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `datasets check` to a CLI (it sets ``func(args) -> exit code``); datasets are listed by `list datasets`."""
    parser = subparsers.add_parser("datasets", help="check a dataset on disk (list them with `list datasets`)")
    sub = parser.add_subparsers(dest="datasets_command", required=True)
    check = sub.add_parser("check", help="validate layout, masks and labels of a split; print a class histogram",
                           parents=[dataset_arguments()])
    check.set_defaults(func=run_check)
    return parser
