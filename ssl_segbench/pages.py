"""What every leaderboard page shares, markdown and site alike: page file names, a metric's text and the note on demo
data. Below `board`, `leaderboard`, `site` and `plots`, so none of them imports another for these."""
from __future__ import annotations

from .paths import safe_component

DEMO_DATASETS = {"synthetic": "Synthetic demo data (generated shapes and textures): this checks the pipeline end to "
                              "end and says nothing about real images."}


def page_name(dataset: str) -> str:
    """The file name stem of a dataset's page (`.md` and the site's `.html`): a safe component without colons."""
    return safe_component(dataset, portable=True)


def fmt_metric(metric: dict | None, digits: int = 1, interval: bool = True) -> str:
    """'mean ± std [95% interval]' in %; a single seed has no spread, so its std reads '—', never '± 0.0'."""
    if not metric:
        return "–"
    std = f"{100 * metric['std']:.{digits}f}" if len(metric.get("per_seed", ())) > 1 else "—"
    text = f"{100 * metric['mean']:.{digits}f} ± {std}"
    ci = metric.get("ci95") if interval else None
    return text + (f" [{100 * ci[0]:.{digits}f}, {100 * ci[1]:.{digits}f}]" if ci else "")
