"""Command line: `ssl-segbench run | list | leaderboard`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml
from rich.markup import escape

from . import __version__
from .errors import SegbenchError
from .pages import fmt_metric
from .paths import results_dir
from .progress import console, out, quiet_libraries

EPILOG = """examples:
  ssl-segbench run --backbone dino_vitb8 --dataset suim --data-root /data/SUIM
  ssl-segbench run --backbone pixels --dataset synthetic --protocol kmeans,linear
  ssl-segbench run --backbone ../shared/models/dinov2-small-imgfocus --dataset suim \\
      --data-root ../shared/data/suim_sample --protocol kmeans:stego
  ssl-segbench list backbones --family dinov3      # --wide: every column; --format csv|json: every field
  ssl-segbench leaderboard --plots                  # markdown + plots + the static site in leaderboards/site/
  torchrun --nproc-per-node 8 -m ssl_segbench run --backbone dinov2_vitl14 --dataset voc --device cuda
  ssl-segbench sweep grid.yaml --executor slurm --partition gpu --gpus 1
  ssl-segbench sweep status grid.yaml
"""


def _seeds(text: str) -> int | list[int]:
    """'5' → 5 (a count: seeds 0..4); '0,3,7' → [0, 3, 7]. The runner checks them (`runner.option_problems`)."""
    try:
        parts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a count (5) or a comma list (0,1,2), got {text!r}") from None
    return parts[0] if len(parts) == 1 and "," not in text else parts


def _channels(text: str) -> tuple[float, ...]:
    """'0.5,0.5,0.5' → (0.5, 0.5, 0.5). The runner checks the count and values (`runner.option_problems`)."""
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes one number per RGB channel, R,G,B (e.g. 0.5,0.5,0.5), got "
                                         f"{text!r}") from None


def _param(text: str) -> tuple[str, str, object]:
    """'kmeans.k=10' → ('kmeans', 'k', 10)."""
    key, eq, value = text.partition("=")
    proto, dot, name = key.partition(".")
    if not eq or not dot:
        raise argparse.ArgumentTypeError(f"--param takes PROTOCOL.NAME=VALUE (e.g. kmeans.k=10), got {text!r}")
    return proto, name, yaml.safe_load(value)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Show a default only where it says something: not for None/False/empty defaults, and not when the help text
    already names the default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text or action.option_strings == []:
            return text
        return text + " (default: %(default)s)"


def _run_options() -> argparse.ArgumentParser:
    """The options `run` and `show` share (argparse parent): what to run on (the dataset options of `datasets check`
    too, declared once in data/check.py), and how."""
    from .data.check import dataset_arguments  # lazy: start-up time (numpy)
    from .transforms import POLICIES  # lazy: start-up time (numpy)

    common = argparse.ArgumentParser(add_help=False, parents=[dataset_arguments("synthetic")])
    common.add_argument("--backbone", required=True,
                        help="registry id (see `list backbones`), a local checkpoint directory, "
                             "hf-hub:org/name[@rev] (timm), org/name[@rev] (transformers) or a training checkpoint "
                             "file (.pth, .pt, .pth.tar, .ckpt: DINO, DINOv2/v3, iBOT, MAE, I-JEPA) with --arch")
    common.add_argument("--arch", metavar="TIMM_ARCH",
                        help="timm architecture of a training checkpoint file's backbone, e.g. "
                             "vit_small_patch14_dinov2 or vit_base_patch16_224; its timm pretrained_cfg gives the "
                             "normalisation unless --mean/--std are given")
    common.add_argument("--checkpoint-key", metavar="KEY",
                        help="state dict of a training checkpoint file to read (teacher, student, model, "
                             "target_encoder, encoder, model.student, ...; default: the teacher, or I-JEPA's target "
                             "encoder)")
    common.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (N below the number of GPUs)")
    common.add_argument("--batch-size", type=int, help="images per backbone call (default: 64 on GPU, 16 on CPU)")
    common.add_argument("--workers", type=int,
                        help="DataLoader workers decoding images (default: on GPU one per core but one, at most 16; "
                             "on CPU 0 and a prefetch thread)")
    common.add_argument("--layer", type=int, default=-1, help="transformer block to read (-1 = last, final norm)")
    common.add_argument("--resize", choices=POLICIES, default="shorter",
                        help="resize policy (a protocol preset may fix its own)")
    common.add_argument("--size", type=int, default=224, help="input size (shorter side / square side)")
    common.add_argument("--param", type=_param, action="append", default=[], metavar="PROTO.NAME=VALUE",
                        help="override a parameter of a protocol of this run, e.g. kmeans.k=20 (repeatable); names, "
                             "keys and values are checked before any work")
    common.add_argument("--registry", help="backbones.yaml to use (default: the packaged registry)")
    common.add_argument("--mean", type=_channels, metavar="R,G,B",
                        help="input normalisation mean, with --std: replaces the registry's or the checkpoint's "
                             "(preprocessor_config.json, timm pretrained_cfg); needed for a checkpoint that states "
                             "none. Part of the record's identity when given")
    common.add_argument("--std", type=_channels, metavar="R,G,B", help="input normalisation std, with --mean")
    common.add_argument("--crf", action="store_true",
                        help="dense-CRF post-processing of every protocol's label maps (pip install '.[crf]'); "
                             "unaries softmax(scores / PROTO.crf_temperature); recorded as parameters, so CRF and "
                             "non-CRF results never share a column")
    return common


def _results_option() -> argparse.ArgumentParser:
    """--results-dir, declared once for the commands that read or write records (argparse parent)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--results-dir", type=Path, help="records root (default: $SSL_SEGBENCH_RESULTS or ./results)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    from .data.check import add_datasets_parser  # lazy: start-up time (numpy)

    parser = argparse.ArgumentParser(
        prog="ssl-segbench", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Benchmark frozen self-supervised ViT patch features on unsupervised semantic segmentation.")
    parser.add_argument("--version", action="version", version=f"ssl-segbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    common, results = _run_options(), _results_option()

    run = sub.add_parser("run", help="extract (cached) features and run protocols, writing one record each",
                         parents=[common, results], formatter_class=_HelpFormatter)
    run.add_argument("--protocol", default="kmeans,linear",
                     help="comma list of protocols, each optionally with a preset: kmeans:leopart,linear")
    run.add_argument("--seeds", type=_seeds, help="seed count or comma list (default: per protocol, kmeans 5)")
    run.add_argument("--overwrite", choices=("skip", "always"), default="skip",
                     help="what to do when a record with the same key exists")
    run.add_argument("--save-masks", type=Path, metavar="DIR",
                     help="keep the pseudo masks of protocols that make them (PNG per image, dataset palette)")

    lst = sub.add_parser("list", help="list known backbones, datasets or protocols")
    lst.add_argument("what", choices=("backbones", "datasets", "protocols"))
    lst.add_argument("--registry", help="backbones: the backbones.yaml to read (default: the packaged registry)")
    lst.add_argument("--family", help="backbones: only this family (e.g. dinov3, siglip2, eva02)")
    lst.add_argument("--wide", action="store_true",
                     help="backbones: every column (method, arch, loader, repo_id, full revision, prefix tokens) "
                          "besides id, family, params, patch and license (marked gated where the Hub asks first)")
    lst.add_argument("--format", choices=("table", "csv", "json"), default=_BACKBONE_ONLY["format"],
                     help="backbones: csv or json to stdout with every registry field, nothing shortened")

    add_datasets_parser(sub)

    lb = sub.add_parser("leaderboard", help="regenerate markdown leaderboards from records", parents=[results],
                        formatter_class=_HelpFormatter)
    lb.add_argument("--out", type=Path, default=Path("leaderboards"), help="output directory")
    lb.add_argument("--format", choices=("md", "html", "csv", "json"), default="md",
                    help="md: a page per dataset + README.md summary, and the static site in OUT/site/; html: the "
                         "site alone (sortable, filterable tables, plots, provenance pages; opens from disk); "
                         "csv/json: one flat file for other tools")
    lb.add_argument("--plots", action="store_true",
                    help="md: add the plots (mIoU against size, rank agreement, per-class IoU) to the pages")
    lb.add_argument("--published", type=Path, metavar="FILE",
                    help="published numbers to put beside the columns (default: the package's published.yaml; "
                         "format and classes: ssl_segbench/published.py)")

    cmp_ = sub.add_parser("compare", help="two backbones side by side: per-class IoU and paired-bootstrap significance",
                          parents=[results], formatter_class=_HelpFormatter)
    cmp_.add_argument("a", help="backbone id (as in the records)")
    cmp_.add_argument("b", help="backbone id (as in the records)")
    cmp_.add_argument("--dataset", help="only this dataset")
    cmp_.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the images")

    show = sub.add_parser("show", help="PNG grid of images, ground truth and predictions (linked from the leaderboard)",
                          parents=[common], formatter_class=_HelpFormatter)
    show.add_argument("--protocol", required=True, help="one protocol, optionally with a preset (kmeans:stego)")
    show.add_argument("-n", "--images", type=int, default=4, help="rows in the grid")
    show.add_argument("--out", type=Path, help="PNG path (default: leaderboards/figures/<dataset>/"
                                               "<backbone>__<protocol>.png, where the leaderboard links it)")

    sw = sub.add_parser("sweep", help="a backbones × datasets grid of runs (local processes or Slurm via submitit); "
                                      "`sweep status FILE` lists its cells", formatter_class=_HelpFormatter)
    sw.add_argument("target", nargs="+", metavar="[status] SWEEP.yaml",
                    help="the sweep file (see ssl_segbench/sweep.py); `status SWEEP.yaml` lists done, running, "
                         "failed (with logs) and missing cells")
    sw.add_argument("--executor", choices=("local", "slurm"), help="default: the file's executor.kind (local)")
    sw.add_argument("--workers", type=int, help="local: cells at once (default: the file's, 1)")
    sw.add_argument("--no-wait", action="store_true", help="slurm: return once the jobs are submitted")
    for flag, kind, what in (("--partition", str, "Slurm partition"), ("--gpus", int, "GPUs per job"),
                             ("--cpus", int, "CPUs per job"), ("--mem-gb", int, "memory per job (GB)"),
                             ("--time", int, "time limit per job (minutes)"), ("--account", str, "Slurm account"),
                             ("--nproc-per-node", int, "processes per job (torchrun, one per GPU)")):
        sw.add_argument(flag, type=kind, help=f"slurm: {what} (default: the file's slurm section)")

    chk = sub.add_parser("check", help="CI gate: compare records with a committed baseline; non-zero on regression",
                         parents=[results], formatter_class=_HelpFormatter)
    chk.add_argument("--baseline", type=Path, required=True, help="baseline JSON file")
    chk.add_argument("--tolerance", type=_tolerance, default={},
                     help="absolute tolerance, for all metrics (0.01) or per metric (miou=0.01,pixel_acc=0.005); "
                          "default max(0.002, 2 × the baseline's std over seeds)")
    chk.add_argument("--update-baseline", action="store_true", help="write the current records as the new baseline")
    return parser


def _tolerance(text: str) -> dict[str, float]:
    """'0.01' → every metric; 'miou=0.01,pixel_acc=0.005' → per metric."""
    from .records import METRICS  # lazy: start-up time (numpy)

    try:
        if "=" not in text:
            return dict.fromkeys(METRICS, float(text))
        out = {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tolerance takes 0.01 or miou=0.01,pixel_acc=0.005, got {text!r}") from None
    unknown = set(out) - set(METRICS)
    if unknown:
        raise argparse.ArgumentTypeError(f"--tolerance: unknown metric(s) {sorted(unknown)}; metrics: {METRICS}")
    return out


def _run_options_of(args, protocols: tuple[str, ...], **more):
    """RunOptions from the options `run` and `show` share: --param and --crf become protocol parameters, -o and
    --skip-bad dataset options."""
    from .data.check import dataset_options_of  # lazy: start-up time (numpy)
    from .runner import RunOptions  # lazy: start-up time (torch)

    params: dict[str, dict] = {}
    for proto, name, value in args.param:
        params.setdefault(proto, {})[name] = value
    if args.crf:
        for spec in protocols:  # every protocol has a `crf` parameter (tested)
            params.setdefault(spec.partition(":")[0], {})["crf"] = True
    return RunOptions(backbone=args.backbone, dataset=args.dataset, protocols=protocols, data_root=args.data_root,
                      split=args.split, device=args.device, batch_size=args.batch_size, workers=args.workers,
                      layer=args.layer, resize=args.resize, size=args.size, registry=args.registry, params=params,
                      dataset_options=dataset_options_of(args), mean=args.mean, std=args.std, arch=args.arch,
                      checkpoint_key=args.checkpoint_key, **more)


def run_options(args):
    """The RunOptions of parsed `ssl-segbench run` arguments."""
    return _run_options_of(args, tuple(p.strip() for p in args.protocol.split(",") if p.strip()), seeds=args.seeds,
                           results_dir=args.results_dir, overwrite=args.overwrite, save_masks=args.save_masks)


def _cmd_run(args) -> int:
    from rich.table import Table

    from . import distributed  # lazy: start-up time (torch)
    from .runner import run  # lazy: start-up time (torch)

    opts = run_options(args)

    def report(status, path, record):
        console.print(f"[{'green' if status == 'written' else 'yellow'}]{status}[/] {path}"
                      + ("  (exists; --overwrite always to recompute)" if status == "skipped" else ""))

    results = run(opts, on_record=report)
    if not distributed.world().main:  # a helper rank of a data-parallel run: rank 0 reports
        return 0
    table = Table(title=f"{args.backbone} on {args.dataset}")
    for col in ("protocol", "mIoU (%)", "pixel acc (%)", "seeds", "cache hit", "seconds", "⚠ caveats"):
        table.add_column(col, overflow="fold")
    for _status, path, rec in results:
        if rec is None:
            table.add_row(path.parent.name, "(skipped: record exists)", "", "", "", "", "")
            continue
        m = rec.metrics
        table.add_row(rec.protocol_spec, fmt_metric(m["miou"], 2, False), fmt_metric(m["pixel_acc"], 2, False),
                      str(len(rec.seeds)), str(rec.provenance["cache_hit"]), f"{rec.provenance['wall_seconds']:.1f}",
                      escape("; ".join(rec.caveats())) or "–")
    out.print(table)
    return 0


# `list backbones` views: the compact one fits an 80-column terminal, --wide shows every column of the table
_COMPACT = ("id", "family", "params", "patch", "license")
_WIDE = ("id", "family", "method", "arch", "loader", "repo_id", "revision", "patch", "prefix", "params", "license")
_BACKBONE_ONLY = {"registry": None, "family": None, "wide": False, "format": "table"}  # read by `list backbones` only


class UsageError(SegbenchError):
    """An option given to a command that does not read it; the message says which command does."""


def _backbone_cells(spec) -> dict[str, str]:
    """A registry entry's table cells, whole: parameters in millions, the license marked "(gated)" where the Hub copy
    asks its users to accept it first."""
    return {"id": spec.id, "family": spec.family, "method": spec.method, "arch": spec.arch, "loader": spec.loader,
            "repo_id": spec.repo_id, "revision": spec.revision or "resolved at run", "patch": str(spec.patch_size),
            "prefix": str(spec.num_prefix_tokens),
            "params": f"{spec.n_parameters / 1e6:,.1f} M" if spec.n_parameters else "-",
            "license": spec.license + (" (gated)" if spec.gated else "")}


def _backbone_table(specs, title: str, wide: bool):
    """The `list backbones` table. The id column never wraps or shrinks (a row is found by its id); other cells fold
    onto more lines rather than being cut when the terminal is narrow."""
    from rich import box
    from rich.table import Table

    columns = _WIDE if wide else _COMPACT
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for col in columns:
        if col == "id":
            table.add_column(col, no_wrap=True, min_width=max(len(s.id) for s in specs))
        else:
            table.add_column(col, overflow="fold", justify="right" if col in ("params", "patch", "prefix") else "left")
    for spec in specs:
        cells = _backbone_cells(spec)
        table.add_row(*(escape(cells[col]) for col in columns))
    return table


def _write_backbones(specs, fmt: str) -> None:
    """Every field of every entry, unshortened, to stdout: json (a list of objects) or csv (one row each; lists and
    numbers as JSON, an absent value empty)."""
    import csv
    import dataclasses

    from .registry import BackboneSpec  # lazy: start-up time (yaml)

    rows = [spec.to_dict() for spec in specs]
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    writer = csv.writer(sys.stdout, lineterminator="\n")
    fields = [f.name for f in dataclasses.fields(BackboneSpec)]
    writer.writerow(fields)
    for row in rows:
        writer.writerow(["" if row[f] is None else row[f] if isinstance(row[f], str) else json.dumps(row[f])
                         for f in fields])


def _cmd_list(args) -> int:
    from rich.table import Table

    if args.what != "backbones":
        given = [f"--{name}" for name, unset in _BACKBONE_ONLY.items() if getattr(args, name) != unset]
        if given:
            raise UsageError(f"{', '.join(given)}: option(s) of `list backbones` only; drop them from "
                             f"`list {args.what}`")
    if args.what == "backbones":
        from .registry import default_registry_path, load_registry  # lazy: start-up time (yaml)

        registry = load_registry(args.registry)
        if not registry:
            raise UsageError(f"the registry {args.registry or default_registry_path()} lists no backbones: add "
                             f"entries under `backbones:`")
        specs = [s for s in registry.values() if args.family in (None, s.family)]
        if not specs:
            families = sorted({s.family for s in registry.values()})
            raise UsageError(f"no backbone of family '{args.family}'; families: {', '.join(families)}")
        if args.format != "table":
            if args.wide:
                raise UsageError(f"--wide shapes the table; --format {args.format} already holds every field")
            _write_backbones(specs, args.format)
            return 0
        table = _backbone_table(specs, "backbones (backbones.yaml)" + (f", family {args.family}" if args.family
                                                                         else ""), args.wide)
    elif args.what == "datasets":
        from .data.check import run_list  # lazy: start-up time (numpy)

        return run_list(args, console=out)
    else:
        from .protocols import PROTOCOLS  # lazy: start-up time (torch)

        table = Table(title="protocols")
        for col in ("name", "version", "presets", "default seeds", "description"):
            table.add_column(col)
        for key, cls in sorted(PROTOCOLS.items()):
            groups = [f"{g} (= {', '.join(m)})" for g, m in cls.preset_groups.items()]
            table.add_row(key, cls.version, ", ".join([*cls.presets, *groups]) or "-", str(cls.default_seeds),
                          cls.description)
    out.print(table)
    return 0


def _cmd_leaderboard(args) -> int:
    from .leaderboard import write  # lazy: start-up time (numpy)

    written, problems = write(args.results_dir or results_dir(), args.out, args.format, args.plots, args.published)
    for path in written:
        console.print(f"wrote {escape(str(path))}", highlight=False)
    for p in problems:  # refused records are left out of every page, and the command fails
        console.print(f"[bold red]refused record:[/] {escape(p)}", highlight=False)
    if not written and not problems:
        console.print(f"no records under {args.results_dir or results_dir()}: run `ssl-segbench run` first")
    return 1 if problems else 0


def _cmd_compare(args) -> int:
    from rich.table import Table

    from .compare import compare_pair, pairs  # lazy: start-up time (numpy)

    for ra, rb in pairs(args.results_dir or results_dir(), args.a, args.b, args.dataset):
        res = compare_pair(ra, rb, n_boot=args.n_boot)
        table = Table(title=f"{res['setting']} ({res['n_images']} images): {args.a} vs {args.b}",
                      caption="⚠ " + escape("; ".join(res["caveats"])) if res["caveats"] else None)
        for col in ("", args.a, args.b, "Δ", "95% CI of Δ", "p"):
            table.add_column(col, justify="right")
        for row in res["rows"]:
            sig = "[bold]" if row["p"] < 0.05 else ""

            def pct(v):
                return "–" if v != v else f"{100 * v:.1f}"  # NaN: class absent

            table.add_row(row["what"], pct(row["a"]), pct(row["b"]), f"{sig}{100 * row['delta']:+.1f}",
                          f"[{100 * row['ci'][0]:+.1f}, {100 * row['ci'][1]:+.1f}]", f"{sig}{row['p']:.3f}")
        out.print(table)
    out.print("p: two-sided paired bootstrap over images (both backbones resampled jointly); bold: p < 0.05")
    return 0


def _cmd_show(args) -> int:
    import tempfile

    from .figures import figure_path, prediction_grid  # lazy: start-up time (numpy)
    from .runner import run  # lazy: start-up time (torch)

    with tempfile.TemporaryDirectory(prefix="ssl-segbench-show-") as tmp:
        opts = _run_options_of(args, (args.protocol,), seeds=[0], save_masks=Path(tmp), write_records=False)
        (_status, _path, rec), = run(opts)
        from .data import get_dataset  # lazy: start-up time (numpy)
        from .protocols import PROTOCOLS  # lazy: start-up time (torch)
        from .transforms import Transform  # lazy: start-up time (numpy)

        ds = get_dataset(args.dataset, args.data_root, rec.dataset["split"], **opts.dataset_options)
        transform = Transform(**rec.transform)
        out_path = args.out or figure_path(Path("leaderboards"), rec.identity["dataset"], rec.backbone["id"],
                                           args.protocol)
        title = (f"{rec.backbone['id']} · {ds.id}/{ds.split} · {args.protocol}: mIoU "
                 f"{100 * rec.metrics['miou']['mean']:.1f} (seed 0)")
        masks = Path(tmp) / rec.protocol["name"]
        subdir = PROTOCOLS[rec.protocol["name"]].masks_subdir(rec.protocol["params"])
        prediction_grid(ds, transform, masks / subdir if subdir else masks, out_path, args.images, title)
    console.print(f"wrote {out_path}")
    return 0


def _cmd_check(args) -> int:
    from rich.table import Table

    from .regression import compare, gate_failed, read_baseline, write_baseline  # lazy: start-up time (numpy)

    results = args.results_dir or results_dir()
    if args.update_baseline:
        n = write_baseline(results, args.baseline)
        console.print(f"wrote baseline {args.baseline} with {n} record(s) from {results}")
        return 0
    rows, problems = compare(read_baseline(args.baseline), results, args.tolerance)
    table = Table(title=f"{args.baseline} vs {results}")
    for col in ("status", "result", "metric", "baseline", "current", "delta", "tolerance"):
        table.add_column(col)
    colour = {"ok": "green", "improved": "cyan", "new": "blue", "regressed": "bold red", "missing": "bold red",
              "invalid": "bold red"}

    def pct(v):
        return "–" if v is None else f"{100 * v:.2f}"

    for r in sorted(rows, key=lambda r: (r.status in ("ok", "new"), r.label, r.metric)):
        table.add_row(f"[{colour[r.status]}]{r.status}[/]", escape(r.label), r.metric, pct(r.baseline), pct(r.current),
                      "–" if r.delta is None else f"{100 * r.delta:+.2f}", pct(r.tolerance))
    out.print(table)
    for p in problems:
        console.print(f"[bold red]refused record:[/] {escape(p)}", highlight=False)
    failed = gate_failed(rows, problems)
    console.print("[bold red]check failed[/]: a metric regressed beyond its tolerance, a baseline result is missing, "
                  "or a record was refused" if failed else "[green]check passed[/]")
    return 1 if failed else 0


def _cmd_sweep(args) -> int:
    from rich.table import Table

    from .sweep import SweepError, load_sweep, run_sweep, status  # lazy: start-up time (numpy)

    target = args.target
    if target[0] == "status":
        if len(target) != 2:
            raise SweepError("usage: ssl-segbench sweep status SWEEP.yaml")
        sweep = load_sweep(target[1])
        table = Table(title=f"sweep {sweep.path} ({len(sweep.cells)} cells)")
        for col in ("cell", "status", "detail"):
            table.add_column(col, overflow="fold")
        rows = status(sweep)
        for name, state, detail in rows:
            colour = {"done": "green", "failed": "red", "error": "red", "missing": "yellow"}.get(state, "cyan")
            table.add_row(name, f"[{colour}]{state}[/]", escape(detail))
        out.print(table)
        return 1 if any(state in ("failed", "error") for _, state, _ in rows) else 0
    if len(target) != 1:
        raise SweepError("usage: ssl-segbench sweep SWEEP.yaml [--executor local|slurm] (or: sweep status FILE)")
    overrides = {"partition": args.partition, "gpus_per_node": args.gpus, "cpus_per_task": args.cpus,
                 "mem_gb": args.mem_gb, "timeout_min": args.time, "account": args.account,
                 "nproc_per_node": args.nproc_per_node}
    return run_sweep(load_sweep(target[0]), args.executor, args.workers, not args.no_wait, overrides,
                     say=lambda m: console.print(escape(m), highlight=False))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": _cmd_run, "list": _cmd_list, "leaderboard": _cmd_leaderboard, "check": _cmd_check,
               "compare": _cmd_compare, "show": _cmd_show, "sweep": _cmd_sweep,
               "datasets": lambda a: a.func(a)}[args.command]
    try:
        with quiet_libraries():
            return handler(args)
    except SegbenchError as e:  # expected failures: a message and exit 2; anything else is a bug with a traceback
        console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: nothing half-written is kept; rerun to resume from the cache")
        return 130
    except BrokenPipeError:  # the reader left (`list backbones | head`): stop quietly, as a tool killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        return 141


if __name__ == "__main__":
    sys.exit(main())
