"""Leaderboards generated from records (never edited by hand): markdown per dataset, a cross-dataset summary, or flat
CSV / JSON for other tools.

A column is one exact combination of protocol, version, parameters, transform, layer and seeds, so numbers produced
under different settings never share a column; its header carries the axes that change numbers. Rows are backbones
(id @ resolved revision), ranked by mIoU within each column. A published number (`published.yaml`) is shown beside ours,
with the difference, only where the entry is `compare: exact` and its column identity (protocol, version, full
parameters, layer) equals the column's; every other published number is listed under "Reported numbers" as context,
never as a difference. Output is sorted and uses fixed float formats, so the same records always give the same bytes.
Records of the legacy schema v1 are marked in their row. Every name taken from data (dataset, split, backbone, column
label, published entry) is escaped as literal markdown text (`md`), and page file names come from
`safe_component(..., portable=True)` (no colons), the same names the static site uses.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pandas as pd

from . import yamlload
from .atomic import write_bytes_atomic, write_text_atomic
from .errors import SegbenchError
from .figures import figure_path
from .paths import inside, safe_component
from .records import METRICS, Record, RecordError, iter_records, require_results_dir

PUBLISHED = Path(__file__).with_name("published.yaml")
_DEMO_DATASETS = {"synthetic": "Synthetic demo data (generated shapes and textures): this checks the pipeline end to "
                               "end and says nothing about real images."}


def collect(results_dir: Path) -> tuple[list[Record], list[str]]:
    """Valid records and a list of problems (unreadable, foreign or impossible records, never rendered), both in path
    order."""
    records, problems = [], []
    for _path, rec in iter_records(require_results_dir(results_dir)):
        if isinstance(rec, RecordError):
            problems.append(str(rec))
        else:
            records.append(rec)
    return records, problems


class PublishedError(SegbenchError):
    """published.yaml is malformed; the message names the entry and the key."""


_PUBLISHED_KEYS = {"dataset", "split", "method", "backbone", "metric", "value", "stage", "measured_on", "compare",
                   "why", "source", "protocol"}
STAGES = ("frozen backbone", "frozen backbone, other protocol", "trained head", "fine-tuned backbone",
          "distilled network", "unstated")  # unstated: the source does not say what was measured (reported-only)
_PROTOCOL_KEYS = {"name", "version", "preset", "overrides", "layer"}


def load_published(path: Path = PUBLISHED) -> list[dict]:
    """The validated entries of published.yaml (module docstring of this file's YAML for the fields)."""
    if not path.is_file():
        return []
    doc = yamlload.load(path.read_text(), str(path))
    if not isinstance(doc, dict) or not isinstance(doc.get("published"), list):
        raise PublishedError(f"{path}: expected a top-level list 'published'")
    for n, e in enumerate(doc["published"], 1):
        at = f"{path} entry #{n}"
        if not isinstance(e, dict):
            raise PublishedError(f"{at}: must be a mapping")
        unknown, missing = set(e) - _PUBLISHED_KEYS, {"dataset", "split", "method", "metric", "value", "stage",
                                                      "measured_on", "compare", "source"} - set(e)
        if unknown or missing:
            raise PublishedError(f"{at}: unknown key(s) {sorted(unknown)}, missing key(s) {sorted(missing)}")
        if e["metric"] not in METRICS or not isinstance(e["value"], float) or not 0 <= e["value"] <= 1:
            raise PublishedError(f"{at}: metric must be one of {METRICS} and value a fraction in [0, 1]")
        if e["stage"] not in STAGES:
            raise PublishedError(f"{at}: stage must be one of {STAGES}, got {e['stage']!r}")
        if e["stage"] == "unstated" and e["compare"] != "reported-only":
            raise PublishedError(f"{at}: a number whose stage is unstated can only be reported-only")
        if e["compare"] == "reported-only":
            if not e.get("why") or "protocol" in e:
                raise PublishedError(f"{at}: a reported-only entry says `why` it is not comparable and names no "
                                     "protocol")
        elif e["compare"] == "exact":
            proto = e.get("protocol")
            if not isinstance(proto, dict) or set(proto) - _PROTOCOL_KEYS or not {"name", "version"} <= set(proto) \
                    or not e.get("backbone") or e["stage"] != "frozen backbone":
                raise PublishedError(f"{at}: an exact entry is measured on a frozen backbone (stage) and names its "
                                     f"backbone and its column: protocol with {sorted(_PROTOCOL_KEYS)} (name and "
                                     "version required)")
        else:
            raise PublishedError(f"{at}: compare must be 'exact' or 'reported-only', got {e['compare']!r}")
    return doc["published"]


def published_identity(entry: dict) -> dict:
    """The column identity an exact entry claims: the protocol's full parameters (preset + overrides, as a run
    records them), version and layer. Raises ProtocolError when the claim names parameters the protocol lacks."""
    from .protocols import get_protocol

    proto = entry["protocol"]
    spec = proto["name"] + (f":{proto['preset']}" if proto.get("preset") else "")
    made = get_protocol(spec, **(proto.get("overrides") or {}))
    return {"protocol": made.name, "version": str(proto["version"]), "params": made.params,
            "layer": proto.get("layer", -1)}


def published_for(rec: Record, published: list[dict]) -> dict | None:
    """The exact entry for this record's dataset, split, backbone and column identity (protocol, version, every
    parameter, layer), or None."""
    ident = rec.identity
    for entry in published:
        if entry["compare"] != "exact" or (entry["dataset"], entry["split"], entry["backbone"]) != \
                (ident["dataset"], ident["split"], ident["backbone"]):
            continue
        claimed = published_identity(entry)
        if claimed["version"] != str(ident["version"]):
            continue
        if (claimed["protocol"], claimed["params"], claimed["layer"]) == (ident["protocol"], ident["params"],
                                                                          ident["layer"]):
            return entry
    return None


def reported_for(dataset: str, split: str, published: list[dict]) -> list[dict]:
    """Reported-only entries of a dataset split: context for its page."""
    return sorted((e for e in published if e["compare"] == "reported-only" and (e["dataset"], e["split"]) ==
                   (dataset, split)), key=lambda e: (e["method"], e.get("backbone") or "", e["metric"], e["value"]))


_MD_ESCAPES = str.maketrans({"\\": "\\\\", "|": "\\|", "`": "\\`", "[": "\\[", "]": "\\]", "<": "&lt;", ">": "&gt;",
                             "&": "&amp;", "\n": " ", "\r": " "})


def md(text) -> str:
    """`text` taken from data as literal markdown: a '|' cannot split a table cell, brackets and backticks cannot open
    a link or code span, '<' '>' '&' are entities (no raw HTML), and a line break cannot end a table row or heading."""
    return str(text).translate(_MD_ESCAPES)


def page_name(dataset: str) -> str:
    """The file name stem of a dataset's page (`.md` and the site's `.html`): a safe component without colons."""
    return safe_component(dataset, portable=True)


def _fmt(metric: dict | None) -> str:
    if not metric:
        return "–"
    text = f"{100 * metric['mean']:.1f} ± {100 * metric['std']:.1f}"
    ci = metric.get("ci95")
    return text + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _columns(records: list[Record]) -> dict[str, str]:
    """column id → header, with the id appended where two different columns would read the same."""
    labels: dict[str, str] = {}
    for r in records:
        labels.setdefault(r.column_id(), r.column_label())
    out = {}
    for cid, label in sorted(labels.items(), key=lambda kv: (kv[1], kv[0])):
        clash = sum(1 for other in labels.values() if other == label) > 1
        out[cid] = f"{label} [{cid}]" if clash else label
    return out


def render(records: list[Record], published: list[dict] | None = None, out_dir: Path | None = None) -> dict[str, str]:
    """{file name: markdown}: one file per dataset and a README.md summary across datasets. Prediction grids that
    `ssl-segbench show` left under `out_dir/figures/` are linked beside their numbers."""
    published = load_published() if published is None else published
    by_dataset: dict[str, list[Record]] = {}
    for rec in records:
        by_dataset.setdefault(rec.identity["dataset"], []).append(rec)
    files = {f"{page_name(ds)}.md": _render_dataset(ds, recs, published, out_dir)
             for ds, recs in sorted(by_dataset.items())}
    if files:
        files["README.md"] = _render_summary(by_dataset)
    return files


def _render_dataset(dataset: str, recs: list[Record], published: list[dict], out_dir: Path | None) -> str:
    lines = [f"# Leaderboard: {md(dataset)}", "",
             "_Generated by `ssl-segbench leaderboard` from result records; do not edit by hand._", ""]
    if dataset in _DEMO_DATASETS:
        lines += [f"> {_DEMO_DATASETS[dataset]}", ""]
    by_split: dict[str, list[Record]] = {}
    for rec in recs:
        by_split.setdefault(rec.identity["split"], []).append(rec)
    for split, srecs in sorted(by_split.items()):
        files = sorted({(r.dataset["n_images"], r.data_digest()[:12]) for r in srecs})
        lines += [f"## split {md(split)}", "",
                  "Images: " + "; ".join(f"{md(n)} (content sha256 {md(h)})" for n, h in files) + ". "
                  "Cells: mean ± std over seeds, in %; [95% bootstrap interval over images] where the record has "
                  "per-image statistics.", ""]
        columns = _columns(srecs)
        overview: dict[str, dict[str, str]] = {}
        for r in srecs:
            overview.setdefault(r.row_label(), {})[r.column_id()] = f"{100 * r.metrics['miou']['mean']:.1f}"
        first = next(iter(columns))
        order = sorted(overview, key=lambda row: (-float(overview[row].get(first, "-1")), row))
        wide = pd.DataFrame([[md(row)] + [overview[row].get(c, "–") for c in columns] for row in order],
                            columns=["backbone @ revision"] + [md(label) for label in columns.values()])
        lines += ["### Overview: mIoU (%)", "", wide.to_markdown(index=False, stralign="right"), ""]
        for cid, label in columns.items():
            col = [r for r in srecs if r.column_id() == cid]
            col.sort(key=lambda r: (-r.metrics["miou"]["mean"], r.row_label()))
            pub = {r.row_label(): published_for(r, published) for r in col}
            table = pd.DataFrame(
                [[rank, md(r.row_label()), _fmt(r.metrics["miou"]), _fmt(r.metrics["pixel_acc"]),
                  _published_cell(r, pub[r.row_label()])] for rank, r in enumerate(col, 1)],
                columns=["#", "backbone @ revision", "mIoU", "pixel accuracy", "published (ours − published)"])
            if not any(pub.values()):
                table = table.drop(columns=["published (ours − published)"])
            lines += [f"### {md(label)}", "", table.to_markdown(index=False, stralign="right"), ""]
            sources = sorted({p["source"] for p in pub.values() if p})
            lines += [f"Published: {md(s)}" for s in sources] + ([""] if sources else [])
            if out_dir is not None:
                figures = []
                for r in col:
                    fig = figure_path(out_dir, dataset, r.backbone["id"], r.protocol_spec)
                    if fig.is_file():
                        figures.append(f"[{md(r.backbone['id'])}]({fig.relative_to(out_dir).as_posix()})")
                lines += ["Predictions (`ssl-segbench show`): " + ", ".join(figures), ""] if figures else []
        reported = reported_for(dataset, split, published)
        if reported:
            table = pd.DataFrame([[md(e["method"]), md(e.get("backbone") or "–"), md(e["metric"]),
                                   f"{100 * e['value']:.1f}", md(e["stage"]), md(e["measured_on"]), md(e["why"]),
                                   md(e["source"])] for e in reported],
                                 columns=["method", "backbone", "metric", "reported", "stage", "measured on",
                                          "why it is not beside a column", "source"])
            lines += ["### Reported numbers (context only)", "",
                      "Published numbers measured under other protocols or on trained networks: shown for orientation, "
                      "never compared with the columns above.", "", table.to_markdown(index=False), ""]
    return "\n".join(lines).rstrip() + "\n"


def _published_cell(rec: Record, entry: dict | None) -> str:
    if not entry:
        return "–"
    ours = rec.metrics[entry["metric"]]["mean"]
    what = "" if entry["metric"] == "miou" else f" {entry['metric']}"
    return f"{100 * entry['value']:.1f}{md(what)} ({100 * (ours - entry['value']):+.1f})"


def _render_summary(by_dataset: dict[str, list[Record]]) -> str:
    """Rows = backbones, columns = (dataset, protocol[:preset]) with the column holding the most backbones."""
    chosen: dict[tuple[str, str], str] = {}
    for ds, recs in by_dataset.items():
        counts: dict[tuple[str, str], dict[str, set]] = {}
        for r in recs:
            name = r.protocol_spec
            counts.setdefault((f"{ds}/{r.identity['split']}", name), {}).setdefault(r.column_id(), set()).add(
                r.row_label())
        for key, cols in counts.items():
            chosen[key] = max(sorted(cols), key=lambda c: len(cols[c]))
    cells: dict[str, dict[tuple[str, str], str]] = {}
    for recs in by_dataset.values():
        for r in recs:
            name = r.protocol_spec
            key = (f"{r.identity['dataset']}/{r.identity['split']}", name)
            if chosen.get(key) == r.column_id():
                cells.setdefault(r.row_label(), {})[key] = f"{100 * r.metrics['miou']['mean']:.1f}"
    keys = sorted(chosen)
    table = pd.DataFrame([[md(row)] + [cells[row].get(k, "–") for k in keys] for row in sorted(cells)],
                         columns=["backbone @ revision"] + [md(f"{d} {p}") for d, p in keys])
    lines = ["# Leaderboards", "",
             "_Generated by `ssl-segbench leaderboard` from result records; do not edit by hand._", "",
             "mIoU (%) per dataset and protocol; each cell is the column of that protocol holding the most backbones: "
             "see the dataset's page for its exact settings and the other columns.", "",
             table.to_markdown(index=False, stralign="right"), "", "Pages: "
             + ", ".join(f"[{md(ds)}]({page_name(ds)}.md)" for ds in sorted(by_dataset)) + "."]
    for ds in sorted(by_dataset):
        if ds in _DEMO_DATASETS:
            lines += ["", f"> {md(ds)}: {_DEMO_DATASETS[ds]}"]
    return "\n".join(lines) + "\n"


def flat_rows(records: list[Record]) -> list[dict]:
    """One row per record with the columns other tools need, sorted."""
    rows = []
    for r in records:
        row = {"dataset": r.identity["dataset"], "split": r.identity["split"], "backbone": r.backbone["id"],
               "revision": r.backbone["revision_resolved"] or "", "protocol": r.protocol["name"],
               "preset": r.protocol["preset"] or "", "version": r.protocol["version"],
               "column": r.column_label(), "column_id": r.column_id(), "n_seeds": len(r.seeds),
               "n_images": r.dataset["n_images"], "record_key": r.key}
        for m in METRICS:
            met = r.metrics.get(m, {})
            row[f"{m}_mean"] = round(met["mean"], 6) if met else None
            row[f"{m}_std"] = round(met["std"], 6) if met else None
            ci = met.get("ci95") if met else None
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = (round(ci[0], 6), round(ci[1], 6)) if ci else (None, None)
        rows.append(row)
    return sorted(rows, key=lambda x: (x["dataset"], x["split"], x["column"], -(x["miou_mean"] or 0), x["backbone"]))


def write(results_dir: Path, out_dir: Path, fmt: str = "md", plots: bool = False) -> tuple[list[Path], list[str]]:
    """Regenerate the leaderboard under out_dir; returns (written paths, record problems). `md` also writes the static
    site (`<out_dir>/site/`, as `html` alone does); `plots` adds the plots to the markdown pages
    (`<out_dir>/plots/`)."""
    from .registry import load_registry

    records, problems = collect(results_dir)
    out_dir = Path(out_dir)
    written = []
    if fmt in ("md", "html") and records:
        from .site import render_site, write_site

        written += write_site(render_site(records, out_dir, load_published(), load_registry()), out_dir / "site")
    if fmt == "html":
        return written, problems
    if fmt == "md":
        files = render(records, out_dir=out_dir)
        if plots and records:
            from .plots import write_plots

            made = write_plots(records, load_registry())
            for (ds, caption), fname in sorted(made.items()):
                page = f"{page_name(ds)}.md"
                files[page] = files[page] + f"\n![{md(caption)}](plots/{fname})\n"
            for fname, blob in sorted(made.blobs.items()):
                write_bytes_atomic(inside(out_dir, f"plots/{fname}"), blob)
                written.append(out_dir / "plots" / fname)
    elif fmt == "csv":
        rows = flat_rows(records)
        buf = io.StringIO()
        if rows:
            w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
        files = {"leaderboard.csv": buf.getvalue()}
    elif fmt == "json":
        files = {"leaderboard.json": json.dumps(flat_rows(records), indent=1, sort_keys=True) + "\n"}
    else:
        raise SegbenchError(f"unknown leaderboard format {fmt!r}: use md, html, csv or json")
    for name, text in files.items():
        write_text_atomic(inside(out_dir, name), text)
        written.append(out_dir / name)
    return written, problems
