"""`ssl-segbench leaderboard --format html`: the leaderboards as a static site (`<out>/site/`) that opens from disk or
GitHub Pages with no server and no network: an index (datasets × protocols), a page per dataset whose table sorts by
any column and filters its columns by the axes that change numbers (protocol, K, matching, resolution, evaluation
size, CRF, seeds) and its rows by backbone family and size, a provenance page per record, and plots
(`plots.py`). The pages are the board model (`board.py`, the same one the markdown is drawn from) put through the jinja2
templates of `templates/`, which escape every value by default. Byte-stable: the same records give the same bytes
(sorted everything, no dates, no random ids)."""
from __future__ import annotations

import json
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from .atomic import replacing_dir, write_guard
from .board import Boards
from .figures import figure_path
from .pages import fmt_metric, page_name
from .paths import safe_component
from .plots import write_plots
from .published import measured_network
from .records import Record

TEMPLATES = Path(__file__).with_name("templates")
# Every value is escaped where a template puts it (autoescape), so no name taken from data becomes markup; an
# undefined name is an error, never an empty string.
_ENV = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(default=True),
                   undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
_ENV.globals.update(fmt_metric=fmt_metric, page_name=page_name, safe_component=safe_component,
                    measured_network=measured_network)


def _html(template: str, **context) -> bytes:
    return _ENV.get_template(template).render(**context).encode()


def _record_facts(rec: Record) -> list[tuple[str, str]]:
    """A record's facts as (name, text). Details of the run itself (start time, wall seconds, git sha, cache state)
    stay in the record file and are left off the page: they differ on every run, so a regenerated site of unchanged
    results would differ from the committed one."""
    prov = rec.provenance
    facts = [("backbone", rec.backbone["id"]), ("source", rec.identity["source"]),
             ("revision", rec.backbone.get("revision_resolved") or "–"),
             ("dataset", f"{rec.identity['dataset']}/{rec.identity['split']}"),
             ("images", rec.dataset["n_images"]), ("content sha256", rec.identity["content_sha256"]),
             ("protocol", f"{rec.protocol_spec} v{rec.protocol['version']}"), ("seeds", rec.seeds),
             ("mIoU", f"{100 * rec.metrics['miou']['mean']:.2f} ± {100 * rec.metrics['miou']['std']:.2f}"),
             ("pixel accuracy", f"{100 * rec.metrics['pixel_acc']['mean']:.2f}"),
             ("device", prov.get("device")), ("compute precision", prov.get("compute_precision")),
             ("ssl_segbench", prov.get("ssl_segbench")), ("packages", prov.get("packages"))]
    return [(k, json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)) for k, v in facts]


def render_site(boards: Boards, out_dir: Path, registry: dict) -> dict[str, bytes]:
    """{path under site/: bytes} for the whole site (plots and copied prediction grids included)."""
    files: dict[str, bytes] = {"style.css": (TEMPLATES / "style.css").read_bytes(),
                               "board.js": (TEMPLATES / "board.js").read_bytes(),
                               "index.html": _html("index.html", up="", summary=boards.summary)}
    plot_files = write_plots(list(boards.records), registry)
    for board in boards.pages:
        name = page_name(board.dataset)
        plots = [(alt, f"plots/{fname}") for (pds, alt), fname in plot_files.items() if pds == board.dataset]
        thumbs = []
        for r in sorted(board.records, key=lambda r: (r.backbone["id"], r.protocol_spec)):
            fig = figure_path(out_dir, board.dataset, r.backbone["id"], r.protocol_spec)
            rel = f"figures/{name}/{fig.name}"
            if fig.is_file() and rel not in files:
                files[rel] = fig.read_bytes()
                thumbs.append((f"{r.backbone['id']} · {r.protocol_spec}", rel))
        files[f"{name}.html"] = _html("dataset.html", up="", board=board, plots=plots, thumbs=thumbs)
        for r in board.records:
            files[f"records/{safe_component(r.key)}.html"] = _html(
                "record.html", up="../", key=r.key, facts=_record_facts(r),
                params=json.dumps(r.protocol["params"], indent=1, sort_keys=True))
    for (_ds, _alt), fname in plot_files.items():
        files[f"plots/{fname}"] = plot_files.blobs[fname]
    return files


def write_site(files: dict[str, bytes], site_dir: Path) -> list[Path]:
    """Replace `site_dir` with exactly `files`, built beside it and exchanged with it in one step (`replacing_dir`), so
    a reader sees the old site or the new one; a failed build (a full disk is a WriteError) leaves the old site as it
    was and no temporary folder."""
    site_dir = Path(site_dir)
    with write_guard(site_dir, "site"), replacing_dir(site_dir) as tmp:
        for rel, data in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return [site_dir / rel for rel in sorted(files)]

