"""Leaderboard plots (matplotlib SVG, byte-stable: Agg, fixed hash salt, glyphs as paths, no date and no creator
version in the metadata): mIoU against backbone size per protocol column; rank agreement between protocol columns
(Kendall τ over the backbones both ranked, with a 95% bootstrap interval over backbones); a per-class IoU heat map per
dataset. Used by the static site and by `leaderboard --plots`."""
from __future__ import annotations

import io

import numpy as np

from .extras import require
from .pages import page_name
from .records import Record
from .setting import unique_labels

N_BOOT = 1000
# what matplotlib serves, as `extras.require` names it when the `site` extra is missing
PLOTS = "the leaderboard's plots and static site (leaderboard --format md or html; csv and json need neither)"


class PlotFiles(dict):
    """{(dataset, caption): file name}, with the SVG bytes of each file in `blobs`."""

    def __init__(self):
        super().__init__()
        self.blobs: dict[str, bytes] = {}


def _svg(fig) -> bytes:
    plt = require("matplotlib.pyplot", PLOTS)
    buf = io.BytesIO()
    with plt.rc_context({"svg.hashsalt": "ssl-segbench", "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _columns(recs: list[Record]) -> dict[str, dict[str, Record]]:
    """column label → {backbone: record} (labels made unique by column id)."""
    labels = unique_labels(r.setting.column for r in recs)
    out: dict[str, dict[str, Record]] = {label: {} for label in labels.values()}
    for r in sorted(recs, key=lambda r: (labels[r.setting.column.id], r.backbone["id"])):
        out[labels[r.setting.column.id]].setdefault(r.backbone["id"], r)
    return out


def kendall_tau(a: list[float], b: list[float], n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """Kendall's τ-b between two score lists over the same backbones, and its 95% percentile bootstrap interval
    (backbones resampled with replacement; resamples where τ is undefined are left out)."""
    from scipy.stats import kendalltau

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    tau = float(kendalltau(x, y).statistic)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        t = kendalltau(x[i], y[i]).statistic
        if np.isfinite(t):
            boots.append(t)
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if boots else (np.nan, np.nan))
    return tau, float(lo), float(hi)


def rank_agreement(recs: list[Record], min_backbones: int = 3) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(column labels, τ matrix, (…, 2) intervals) over the columns ranking at least `min_backbones` backbones;
    each pair uses the backbones both columns have (NaN where fewer than `min_backbones`)."""
    cols = {k: v for k, v in _columns(recs).items() if len(v) >= min_backbones}
    labels = sorted(cols)
    n = len(labels)
    tau, ci = np.full((n, n), np.nan), np.full((n, n, 2), np.nan)
    for i in range(n):
        for j in range(n):
            common = sorted(set(cols[labels[i]]) & set(cols[labels[j]]))
            if len(common) < min_backbones:
                continue
            a = [cols[labels[i]][b].metrics["miou"]["mean"] for b in common]
            b_ = [cols[labels[j]][b].metrics["miou"]["mean"] for b in common]
            t, lo, hi = kendall_tau(a, b_)
            tau[i, j], ci[i, j] = t, (lo, hi)
    return labels, tau, ci


def write_plots(records: list[Record], registry: dict) -> PlotFiles:
    """The plots of every dataset, named after its page (`page_name`)."""
    require("matplotlib", PLOTS).use("Agg")
    plt = require("matplotlib.pyplot", PLOTS)
    files = PlotFiles()
    by_dataset: dict[str, list[Record]] = {}
    for r in records:
        by_dataset.setdefault(r.identity["dataset"], []).append(r)
    for ds, recs in sorted(by_dataset.items()):
        name = page_name(ds)
        cols = _columns(recs)
        sized = {label: sorted((registry[b].n_parameters / 1e6, r.metrics["miou"]["mean"] * 100, b)
                               for b, r in col.items() if b in registry and registry[b].n_parameters)
                 for label, col in cols.items()}
        sized = {k: v for k, v in sized.items() if v}
        if sized:
            fig, ax = plt.subplots(figsize=(7, 4))
            for label, pts in sorted(sized.items()):
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=_text(label))
            ax.set_xscale("log")
            ax.set_xlabel("backbone parameters (M)")
            ax.set_ylabel("mIoU (%)")
            ax.set_title(_text(f"{ds}: mIoU against backbone size"))
            ax.legend(fontsize=6, loc="best")
            _add(files, ds, f"{ds}: mIoU against backbone size", f"{name}_size.svg", _svg(fig))
        labels, tau, ci = rank_agreement(recs)
        if len(labels) >= 2:
            fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(labels), 1.2 + 1.0 * len(labels)))
            ax.imshow(np.nan_to_num(tau, nan=0.0), vmin=-1, vmax=1, cmap="RdBu")
            for i in range(len(labels)):
                for j in range(len(labels)):
                    text = "n/a" if np.isnan(tau[i, j]) else f"{tau[i, j]:.2f}\n[{ci[i, j, 0]:.2f}, {ci[i, j, 1]:.2f}]"
                    dark = not np.isnan(tau[i, j]) and abs(tau[i, j]) > 0.5
                    ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w" if dark else "k")
            short = [_text(lab.split(" · ")[0]) for lab in labels]
            ax.set_xticks(range(len(labels)), short, rotation=30, ha="right", fontsize=7)
            ax.set_yticks(range(len(labels)), short, fontsize=7)
            ax.set_title(_text(f"{ds}: rank agreement of protocols (Kendall τ [95% CI])"), fontsize=9)
            _add(files, ds, f"{ds}: rank agreement between protocols (Kendall τ over backbones)",
                 f"{name}_rank.svg", _svg(fig))
        best = max(sorted(cols), key=lambda k: len(cols[k]))
        col = cols[best]
        classes = next(iter(col.values())).dataset.get("class_names") or []
        rows = sorted(col)
        mat = np.array([col[b].metrics.get("per_class_iou") or [np.nan] * len(classes) for b in rows], dtype=float)
        if classes and mat.shape == (len(rows), len(classes)):
            fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(classes), 1.2 + 0.4 * len(rows)))
            ax.imshow(mat * 100, vmin=0, vmax=100, cmap="viridis", aspect="auto")
            for i in range(len(rows)):
                for j in range(len(classes)):
                    ax.text(j, i, "–" if np.isnan(mat[i, j]) else f"{100 * mat[i, j]:.0f}", ha="center",
                            va="center", fontsize=6, color="w")
            ax.set_xticks(range(len(classes)), [_text(c) for c in classes], rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(rows)), [_text(r) for r in rows], fontsize=7)
            ax.set_title(_text(f"{ds}: per-class IoU (%), {best.split(' · ')[0]}"), fontsize=9)
            _add(files, ds, f"{ds}: per-class IoU ({best})", f"{name}_classes.svg", _svg(fig))
    return files


def _text(name) -> str:
    """A name from data as literal matplotlib text: a '$' is a character, never the start of a formula (an unbalanced
    one would stop the plot with a mathtext error)."""
    return str(name).replace("$", r"\$")


def _add(files: PlotFiles, ds: str, caption: str, fname: str, blob: bytes) -> None:
    files[(ds, caption)] = fname
    files.blobs[fname] = blob
