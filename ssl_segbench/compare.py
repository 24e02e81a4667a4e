"""`ssl-segbench compare A B`: two backbones side by side on every setting both were run with.

Two records pair up when their `Setting`s differ in the backbone alone (the same `Setting.column`: dataset split and
content, train data, protocol, version, parameters, layer, seeds). Differences are tested with a paired bootstrap over
images (both backbones' per-image [tp, fp, fn] resampled jointly), for mIoU, pixel accuracy and each class's IoU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import SegbenchError
from .metrics import paired_bootstrap, scores_from_stats
from .records import Record, decode_array, iter_records
from .setting import Column


class CompareError(SegbenchError):
    """Nothing to compare; the message says what the records hold."""


def pairs(results_dir: Path, a: str, b: str, dataset: str | None = None) -> list[tuple[Record, Record]]:
    """(record of a, record of b) for every setting both backbones share, in a stable order."""
    records = [r for _, r in iter_records(results_dir) if isinstance(r, Record)]
    by: dict[str, dict[Column, Record]] = {a: {}, b: {}}
    for r in records:
        bid = r.backbone["id"]
        if bid in by and (dataset is None or r.identity["dataset"] == dataset):
            by[bid][r.setting.column] = r
    for name in (a, b):
        if not by[name]:
            known = sorted({r.backbone["id"] for r in records})
            raise CompareError(f"no records of backbone '{name}'" + (f" on '{dataset}'" if dataset else "")
                               + f" under {results_dir}; backbones with records: {', '.join(known) or 'none'}")
    shared = sorted(set(by[a]) & set(by[b]), key=lambda c: (c.label, c.id))
    if not shared:
        raise CompareError(f"'{a}' and '{b}' have no setting in common (same dataset files, protocol, parameters and "
                           "seeds): run both with the same options")
    return [(by[a][k], by[b][k]) for k in shared]


def compare_pair(ra: Record, rb: Record, n_boot: int = 2000, seed: int = 0) -> dict:
    """Scores of both and the paired-bootstrap test of each difference; per-class rows carry the class names, and
    `caveats` what makes either number not comparable as it stands (`Record.caveats`)."""
    if ra.image_stats is None or rb.image_stats is None:
        raise CompareError(f"{ra.setting.column.label}: a record has no per-image statistics (protocol without them, "
                           "or an older record): significance cannot be tested")
    sa, sb = decode_array(ra.image_stats), decode_array(rb.image_stats)
    test = paired_bootstrap(sa, sb, n_boot=n_boot, seed=seed)
    fa, fb = scores_from_stats(sa.sum(1)), scores_from_stats(sb.sum(1))
    with np.errstate(invalid="ignore"):
        class_a, class_b = np.nanmean(fa["per_class_iou"], 0), np.nanmean(fb["per_class_iou"], 0)
    rows = [{"what": m, "a": float(fa[m].mean()), "b": float(fb[m].mean()), "delta": float(test[m]["delta"]),
             "ci": [float(test[m]["ci"][0]), float(test[m]["ci"][1])], "p": float(test[m]["p"])}
            for m in ("miou", "pixel_acc")]
    pc = test["per_class_iou"]
    for c, name in enumerate(ra.dataset["class_names"]):
        rows.append({"what": f"IoU {name}", "a": float(class_a[c]), "b": float(class_b[c]),
                     "delta": float(pc["delta"][c]), "ci": [float(pc["ci"][0][c]), float(pc["ci"][1][c])],
                     "p": float(pc["p"][c])})
    return {"setting": f"{ra.identity['dataset']}/{ra.identity['split']} · {ra.setting.column.label}",
            "n_images": ra.dataset["n_images"], "rows": rows,
            "caveats": list(dict.fromkeys(ra.caveats() + rb.caveats()))}
