"""Command line: `ssl-segbench run | list | leaderboard`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from rich.markup import escape

from . import __version__
from .progress import console, out

EPILOG = """examples:
  ssl-segbench run --backbone dino_vitb8 --dataset suim --data-root /data/SUIM
  ssl-segbench run --backbone pixels --dataset synthetic --protocol kmeans,linear
  ssl-segbench run --backbone ../shared/models/dinov2-small-imgfocus --dataset suim \\
      --data-root ../shared/data/suim_sample --protocol kmeans:stego
  ssl-segbench list backbones
  ssl-segbench leaderboard
"""


def _seeds(text: str) -> list[int]:
    """'5' → [0..4]; '0,3,7' → [0, 3, 7]."""
    try:
        parts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a count (5) or a comma list (0,1,2), got {text!r}") from None
    if len(parts) == 1 and "," not in text:
        return list(range(parts[0]))
    return parts


def _param(text: str) -> tuple[str, str, object]:
    """'kmeans.k=10' → ('kmeans', 'k', 10)."""
    key, eq, value = text.partition("=")
    proto, dot, name = key.partition(".")
    if not eq or not dot:
        raise argparse.ArgumentTypeError(f"--param takes PROTOCOL.NAME=VALUE (e.g. kmeans.k=10), got {text!r}")
    return proto, name, yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    from .data.check import add_datasets_parser
    from .transforms import POLICIES

    parser = argparse.ArgumentParser(
        prog="ssl-segbench", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Benchmark frozen self-supervised ViT patch features on unsupervised semantic segmentation.")
    parser.add_argument("--version", action="version", version=f"ssl-segbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="extract (cached) features and run protocols, writing one record each",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--backbone", required=True,
                     help="registry id (see `list backbones`), a local checkpoint directory, "
                          "hf-hub:org/name[@rev] (timm) or org/name[@rev] (transformers)")
    run.add_argument("--dataset", required=True, help="dataset id (see `list datasets`)")
    run.add_argument("--protocol", default="kmeans,linear",
                     help="comma list of protocols, each optionally with a preset: kmeans:leopart,linear")
    run.add_argument("--data-root", help="dataset root in its native layout (synthetic: generated when omitted)")
    run.add_argument("--split", help="evaluation split (default: the dataset's evaluation split)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--batch-size", type=int, help="extraction batch size (default 64 on GPU, 16 on CPU)")
    run.add_argument("--workers", type=int, help="DataLoader workers (default 4 on GPU, 0 on CPU)")
    run.add_argument("--seeds", type=_seeds, help="seed count or comma list (default: per protocol, kmeans 5)")
    run.add_argument("--layer", type=int, default=-1, help="transformer block to read (-1 = last, final norm applied)")
    run.add_argument("--resize", choices=POLICIES, default="shorter",
                     help="resize policy (a protocol preset may fix its own)")
    run.add_argument("--size", type=int, default=224, help="input size (shorter side / square side)")
    run.add_argument("--param", type=_param, action="append", default=[], metavar="PROTO.NAME=VALUE",
                     help="override a parameter of a protocol of this run, e.g. kmeans.k=20 (repeatable); names, "
                          "keys and values are checked before any work")
    run.add_argument("--results-dir", type=Path, help="records root (default $SSL_SEGBENCH_RESULTS or ./results)")
    run.add_argument("--overwrite", choices=("skip", "always"), default="skip",
                     help="what to do when a record with the same key exists")
    run.add_argument("--registry", help="backbones.yaml to use (default: the repository's)")
    run.add_argument("--crf", action="store_true",
                     help="dense-CRF post-processing of every protocol's label maps (pip install '.[crf]'); unaries "
                          "softmax(scores / PROTO.crf_temperature); recorded as parameters, so CRF and non-CRF results "
                          "never share a column")
    run.add_argument("--save-masks", type=Path, metavar="DIR",
                     help="keep the pseudo masks of protocols that make them (PNG per image, dataset palette)")
    run.add_argument("-o", "--option", action="append", metavar="KEY=VALUE",
                     help="dataset option, repeatable (e.g. curated_list=PATH, resize_masks=true; see `datasets list`)")
    run.add_argument("--skip-bad", action="store_true",
                     help="leave unreadable or malformed samples out (the record counts them) instead of failing")

    lst = sub.add_parser("list", help="list known backbones, datasets or protocols")
    lst.add_argument("what", choices=("backbones", "datasets", "protocols"))
    lst.add_argument("--registry", help="backbones.yaml to use")

    add_datasets_parser(sub)

    lb = sub.add_parser("leaderboard", help="regenerate markdown leaderboards from records",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    lb.add_argument("--results-dir", type=Path, help="records root (default $SSL_SEGBENCH_RESULTS or ./results)")
    lb.add_argument("--out", type=Path, default=Path("leaderboards"), help="output directory")
    lb.add_argument("--format", choices=("md", "csv", "json"), default="md",
                    help="md: a page per dataset + README.md summary; csv/json: one flat file for other tools")

    cmp_ = sub.add_parser("compare", help="two backbones side by side: per-class IoU and paired-bootstrap significance",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cmp_.add_argument("a", help="backbone id (as in the records)")
    cmp_.add_argument("b", help="backbone id (as in the records)")
    cmp_.add_argument("--dataset", help="only this dataset")
    cmp_.add_argument("--results-dir", type=Path, help="records root (default $SSL_SEGBENCH_RESULTS or ./results)")
    cmp_.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the images")

    show = sub.add_parser("show", help="PNG grid of images, ground truth and predictions (linked from the leaderboard)",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    show.add_argument("--backbone", required=True)
    show.add_argument("--dataset", required=True)
    show.add_argument("--protocol", required=True, help="one protocol, optionally with a preset (kmeans:stego)")
    show.add_argument("--data-root")
    show.add_argument("--split")
    show.add_argument("--device", default="auto")
    show.add_argument("--resize", choices=POLICIES, default="shorter")
    show.add_argument("--size", type=int, default=224)
    show.add_argument("--param", type=_param, action="append", default=[], metavar="PROTO.NAME=VALUE")
    show.add_argument("-n", "--images", type=int, default=4, help="rows in the grid")
    show.add_argument("--out", type=Path, help="PNG path (default: leaderboards/figures/<dataset>/"
                                               "<backbone>__<protocol>.png, where the leaderboard links it)")
    show.add_argument("--registry", help="backbones.yaml to use")

    chk = sub.add_parser("check", help="CI gate: compare records with a committed baseline; non-zero on regression",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    chk.add_argument("--baseline", type=Path, required=True, help="baseline JSON file")
    chk.add_argument("--results-dir", type=Path, help="records root (default $SSL_SEGBENCH_RESULTS or ./results)")
    chk.add_argument("--tolerance", type=_tolerance, default={},
                     help="absolute tolerance, for all metrics (0.01) or per metric (miou=0.01,pixel_acc=0.005); "
                          "default max(0.002, 2 × the baseline's std over seeds)")
    chk.add_argument("--update-baseline", action="store_true", help="write the current records as the new baseline")
    return parser


def _tolerance(text: str) -> dict[str, float]:
    """'0.01' → every metric; 'miou=0.01,pixel_acc=0.005' → per metric."""
    from .records import METRICS

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


def _cmd_run(args) -> int:
    from rich.table import Table

    from .data.check import parse_options
    from .runner import RunOptions, run

    params: dict[str, dict] = {}
    for proto, name, value in args.param:
        params.setdefault(proto, {})[name] = value
    if args.crf:
        for spec in args.protocol.split(","):  # every protocol has a `crf` parameter (tested)
            params.setdefault(spec.strip().partition(":")[0], {})["crf"] = True
    dataset_options = parse_options(args.option)
    if args.skip_bad:
        dataset_options["skip_bad"] = True
    opts = RunOptions(backbone=args.backbone, dataset=args.dataset,
                      protocols=tuple(p.strip() for p in args.protocol.split(",") if p.strip()),
                      data_root=args.data_root, split=args.split, device=args.device, batch_size=args.batch_size,
                      workers=args.workers, seeds=args.seeds, layer=args.layer, resize=args.resize, size=args.size,
                      results_dir=args.results_dir, overwrite=args.overwrite, registry=args.registry, params=params,
                      dataset_options=dataset_options, save_masks=args.save_masks)

    def report(status, path, record):
        console.print(f"[{'green' if status == 'written' else 'yellow'}]{status}[/] {path}"
                      + ("  (exists; --overwrite always to recompute)" if status == "skipped" else ""))

    results = run(opts, on_record=report)
    table = Table(title=f"{args.backbone} on {args.dataset}")
    for col in ("protocol", "mIoU (%)", "pixel acc (%)", "seeds", "cache hit", "seconds"):
        table.add_column(col)
    for _status, path, rec in results:
        if rec is None:
            table.add_row(path.parent.name, "(skipped: record exists)", "", "", "", "")
            continue
        m = rec.metrics
        table.add_row(rec.protocol_spec,
                      f"{100 * m['miou']['mean']:.2f} ± {100 * m['miou']['std']:.2f}",
                      f"{100 * m['pixel_acc']['mean']:.2f} ± {100 * m['pixel_acc']['std']:.2f}",
                      str(len(rec.seeds)), str(rec.provenance["cache_hit"]),
                      f"{rec.provenance['wall_seconds']:.1f}")
    out.print(table)
    return 0


def _cmd_list(args) -> int:
    from rich.table import Table

    if args.what == "backbones":
        from .registry import load_registry

        table = Table(title="backbones (backbones.yaml)")
        for col in ("id", "method", "arch", "loader", "repo_id", "revision", "patch", "prefix", "license"):
            table.add_column(col)
        for s in load_registry(args.registry).values():
            table.add_row(s.id, s.method, s.arch, s.loader, s.repo_id, (s.revision or "resolved at run")[:12],
                          str(s.patch_size), str(s.num_prefix_tokens), s.license)
    elif args.what == "datasets":
        from .data.check import run_list

        return run_list(args, console=out)
    else:
        from .protocols import PROTOCOLS

        table = Table(title="protocols")
        for col in ("name", "version", "presets", "default seeds", "description"):
            table.add_column(col)
        for key, cls in sorted(PROTOCOLS.items()):
            table.add_row(key, cls.version, ", ".join(cls.presets) or "-", str(cls.default_seeds), cls.description)
    out.print(table)
    return 0


def _cmd_leaderboard(args) -> int:
    from .leaderboard import write
    from .paths import results_dir

    written, problems = write(args.results_dir or results_dir(), args.out, args.format)
    for p in problems:
        console.print(f"[yellow]warning:[/] {p}")
    for path in written:
        console.print(f"wrote {path}")
    if not written:
        console.print(f"no records under {args.results_dir or results_dir()}: run `ssl-segbench run` first")
    return 1 if problems else 0


def _cmd_compare(args) -> int:
    from rich.table import Table

    from .compare import compare_pair, pairs
    from .paths import results_dir

    for ra, rb in pairs(args.results_dir or results_dir(), args.a, args.b, args.dataset):
        res = compare_pair(ra, rb, n_boot=args.n_boot)
        table = Table(title=f"{res['setting']} ({res['n_images']} images): {args.a} vs {args.b}")
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

    from .figures import figure_path, prediction_grid
    from .runner import RunOptions, run

    params: dict[str, dict] = {}
    for proto, name, value in args.param:
        params.setdefault(proto, {})[name] = value
    name = args.protocol.partition(":")[0]
    with tempfile.TemporaryDirectory(prefix="ssl-segbench-show-") as tmp:
        opts = RunOptions(backbone=args.backbone, dataset=args.dataset, protocols=(args.protocol,),
                          data_root=args.data_root, split=args.split, device=args.device, seeds=[0],
                          resize=args.resize, size=args.size, registry=args.registry, params=params,
                          save_masks=Path(tmp), write_records=False)
        (_status, _path, rec), = run(opts)
        from .data import get_dataset
        from .transforms import Transform

        ds = get_dataset(args.dataset, args.data_root, rec.dataset["split"])
        transform = Transform(**rec.transform)
        out_path = args.out or figure_path(Path("leaderboards"), rec.identity["dataset"], rec.backbone["id"],
                                           args.protocol)
        title = (f"{rec.backbone['id']} · {ds.id}/{ds.split} · {args.protocol}: mIoU "
                 f"{100 * rec.metrics['miou']['mean']:.1f} (seed 0)")
        masks = Path(tmp) / name
        if args.protocol.partition(":")[0] == "maskdistill" and rec.protocol["params"].get("stage") != "pseudo":
            masks = masks / rec.protocol["params"]["stage"]
        prediction_grid(ds, transform, masks, out_path, args.images, title)
    console.print(f"wrote {out_path}")
    return 0


def _cmd_check(args) -> int:
    from rich.table import Table

    from .paths import results_dir
    from .regression import compare, gate_failed, read_baseline, write_baseline

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
        table.add_row(f"[{colour[r.status]}]{r.status}[/]", r.label, r.metric, pct(r.baseline), pct(r.current),
                      "–" if r.delta is None else f"{100 * r.delta:+.2f}", pct(r.tolerance))
    out.print(table)
    for p in problems:
        console.print(f"[yellow]warning:[/] {p}")
    failed = gate_failed(rows)
    console.print("[bold red]check failed[/]: a metric regressed beyond its tolerance, or a baseline result is "
                  "missing or not a finite number" if failed else "[green]check passed[/]")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from .errors import SegbenchError

    args = build_parser().parse_args(argv)
    handler = {"run": _cmd_run, "list": _cmd_list, "leaderboard": _cmd_leaderboard, "check": _cmd_check,
               "compare": _cmd_compare, "show": _cmd_show, "datasets": lambda a: a.func(a)}[args.command]
    try:
        return handler(args)
    except (SegbenchError, ValueError, RuntimeError, FileNotFoundError) as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: nothing half-written is kept; rerun to resume from the cache")
        return 130


if __name__ == "__main__":
    sys.exit(main())
