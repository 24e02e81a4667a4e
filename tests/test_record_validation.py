"""Records that cannot be true (issue 19) are refused on load: through `leaderboard` and `check`, each is reported by
file with what is wrong, the command fails, and the bad value is on no written page and is never gated as a number.
`check` refuses an empty baseline, an impossible baseline value and a results folder that does not exist."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from ssl_segbench.cli import main
from ssl_segbench.metrics import bootstrap_ci, scores_from_stats
from ssl_segbench.records import SCHEMA, Record
from ssl_segbench.setting import Setting


def _record(backbone: str, per_seed: list[float], ci: list[float] | None = None) -> dict:
    """A record as a run writes it: mean and population std of `per_seed`, key = digest of the identity."""
    params = {"k": 8, "resize": "shorter", "size": 224, "matching": "hungarian-pixels", "eval_size": None}
    seeds = list(range(len(per_seed)))
    ident = {"backbone": backbone, "source": backbone, "revision": "a" * 40, "dataset": "suim", "split": "test",
             "content_sha256": "f" * 64, "protocol": "kmeans", "version": "1", "params": params, "layer": -1,
             "seeds": seeds}
    m = {"mean": float(np.mean(per_seed)), "std": float(np.std(per_seed)), "per_seed": per_seed}
    if ci is not None:
        m["ci95"] = ci
    return {"schema": SCHEMA, "key": Setting.of_identity(ident).key, "identity": ident,
            "backbone": {"id": backbone, "revision_resolved": "a" * 40, "layer": -1},
            "dataset": {"n_images": 8}, "protocol": {"name": "kmeans", "version": "1", "preset": None,
                                                     "params": params},
            "seeds": seeds, "info": {"k": 8}, "metrics": {"miou": m, "pixel_acc": dict(m), "mf1": dict(m),
                                                           "per_class_iou": [0.5, None, 0.25]}}


def _write(res: Path, obj: dict, name: str | None = None) -> Path:
    path = res / "suim" / f"{name or obj['key']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))  # json writes NaN and Infinity as a buggy tool or a hand edit would
    return path


def _set(obj: dict, metric_values: dict) -> dict:
    obj = copy.deepcopy(obj)
    obj["metrics"]["miou"].update(metric_values)
    return obj


GOOD = _record("good_net", [0.40, 0.44], ci=[0.35, 0.47])
BAD = _record("bad_net", [0.30, 0.34], ci=[0.25, 0.37])
_renamed_identity = copy.deepcopy(BAD)
_renamed_identity["identity"]["backbone"] = "other_net"  # the key no longer is the identity's digest

CASES = {  # name: (bad record, file name or None, expected message, a string of the bad value no page may hold)
    "500 %": (_set(BAD, {"mean": 5.0, "per_seed": [5.0, 5.0], "std": 0.0}), None, "mean 5.0 is not a fraction",
              "500.0"),
    "negative": (_set(BAD, {"mean": -0.5, "per_seed": [-0.5, -0.5], "std": 0.0}), None,
                 "mean -0.5 is not a fraction", "-50.0"),
    "inf": (_set(BAD, {"mean": float("inf")}), None, "mean inf is not a fraction", "inf"),
    "nan": (_set(BAD, {"mean": float("nan")}), None, "mean nan is not a fraction", "nan"),
    "mean is not the seeds' mean": (_set(BAD, {"mean": 0.9}), None, "are not the mean 0.32", "90.0"),
    "std is not the seeds' std": (_set(BAD, {"std": 0.2}), None, "population std 0.02", "20.0"),
    "reversed interval": (_set(BAD, {"ci95": [0.37, 0.25]}), None, "is not ordered", "[37.0, 25.0]"),
    "interval above 1": (_set(BAD, {"ci95": [0.25, 1.7]}), None, "ci95 1.7 is not a fraction", "170.0"),
    "seed count": (_set(BAD, {"per_seed": [0.32], "std": 0.0}), None, "1 per-seed values for 2 seed(s)", "bad_net"),
    "class IoU": ({**BAD, "metrics": {**BAD["metrics"], "per_class_iou": [0.5, 2.0]}}, None,
                  "'per_class_iou' must be a list of fractions", "bad_net"),
    "key is not the file name": (BAD, "0123456789abcdef", "is not its file name", "bad_net"),
    "key is not the identity's digest": (_renamed_identity, None, "is not the digest of its identity", "other_net"),
    "unknown field": ({**BAD, "score_override": 0.99}, None, "unknown field(s) ['score_override']", "99.0"),
    "no pixel accuracy": ({**BAD, "metrics": {k: v for k, v in BAD["metrics"].items() if k != "pixel_acc"}}, None,
                          "no 'miou' or no 'pixel_acc' metric", "bad_net"),
}


def _flat(text: str) -> str:
    """Rich wraps long lines: compare without whitespace."""
    return "".join(text.split())


@pytest.mark.parametrize("case", list(CASES))
def test_leaderboard_reports_an_impossible_record_by_file_and_renders_only_the_good_one(case, tmp_path, capsys):
    bad, name, expected, shown = CASES[case]
    res, out = tmp_path / "res", tmp_path / "lb"
    _write(res, GOOD)
    path = _write(res, bad, name)
    assert main(["leaderboard", "--results-dir", str(res), "--out", str(out)]) == 1
    err = _flat(capsys.readouterr().err)
    assert _flat(f"{path}: ") in err and _flat(expected) in err and "deleteitandre-run" in err
    pages = {p: p.read_text() for p in out.rglob("*") if p.suffix in (".md", ".html")}
    assert any("good_net" in text and "42.0" in text for text in pages.values())  # the true record is rendered
    for p, text in pages.items():
        assert "bad_net" not in text and "other_net" not in text and shown not in text, p


@pytest.mark.parametrize("case", list(CASES))
def test_check_fails_on_an_impossible_record_it_was_given(case, tmp_path, capsys):
    """The impossible record replaces a baseline result ('invalid', never 'improved'), and a refused record that no
    baseline entry names fails the gate too."""
    bad, name, expected, _ = CASES[case]
    res, baseline = tmp_path / "res", tmp_path / "baseline.json"
    _write(res, GOOD)
    good_bad = _write(res, BAD)
    assert main(["check", "--baseline", str(baseline), "--results-dir", str(res), "--update-baseline"]) == 0
    assert main(["check", "--baseline", str(baseline), "--results-dir", str(res)]) == 0
    capsys.readouterr()
    good_bad.unlink()
    path = _write(res, bad, name)
    assert main(["check", "--baseline", str(baseline), "--results-dir", str(res)]) == 1
    captured = capsys.readouterr()
    err = _flat(captured.err)
    assert _flat(f"{path}: ") in err and _flat(expected) in err and "checkfailed" in err
    assert "improved" not in captured.out
    if name is None and case != "key is not the identity's digest":  # the baseline's own key, refused
        assert "invalid" in captured.out and "missing" not in captured.out


def test_a_500_percent_edit_of_a_baseline_result_is_invalid_not_improved(tmp_path, capsys):
    res, baseline = tmp_path / "res", tmp_path / "baseline.json"
    path = _write(res, GOOD)
    assert main(["check", "--baseline", str(baseline), "--results-dir", str(res), "--update-baseline"]) == 0
    _write(res, _set(GOOD, {"mean": 5.0, "per_seed": [5.0, 5.0], "std": 0.0}))
    assert main(["check", "--baseline", str(baseline), "--results-dir", str(res)]) == 1
    captured = capsys.readouterr()
    assert "invalid" in captured.out and "improved" not in captured.out and "500.00" not in captured.out
    assert _flat(str(path)) in _flat(captured.err)


def test_the_runners_bootstrap_interval_need_not_contain_the_mean_so_such_a_record_loads():
    """Why the interval is only required to be ordered: a class seen in one image drops out of most resamples, so
    the percentile interval can lie wholly below the full-data mIoU. Eight images: class 0 in each (IoU 0.2), class i
    only in image i (IoU 1). All images: mIoU = (0.2 + 7) / 8 = 0.9; a resample with k of the seven rare images:
    (0.2 + k) / (k + 1) <= 0.8857 < 0.9 unless it holds all eight images, which 1000 resamples almost never do."""
    stats = np.zeros((1, 8, 8, 3), dtype=np.int64)
    for i in range(8):
        stats[0, i, 0] = [20, 40, 40]
        if i:
            stats[0, i, i] = [100, 0, 0]
    point = float(scores_from_stats(stats.sum(1))["miou"][0])
    lo, hi = bootstrap_ci(stats)["miou"]
    assert point == pytest.approx(0.9) and hi <= (0.2 + 6) / 7 + 1e-12 < point
    rec = Record.from_json(_record("net", [point], ci=[lo, hi]))
    assert rec.metrics["miou"]["ci95"] == [lo, hi]


def _baseline(path: Path, entries: dict) -> Path:
    path.write_text(json.dumps({"schema": "ssl-segbench/baseline/v1", "entries": entries}))
    return path


@pytest.mark.parametrize("value, field", [(5.0, "mean"), (-0.5, "mean"), (float("inf"), "mean"), (1.5, "std")])
def test_check_refuses_an_impossible_baseline_value(value, field, tmp_path, capsys):
    res = tmp_path / "res"
    _write(res, GOOD)
    metric = {"mean": 0.42, "std": 0.02, "n_seeds": 2, field: value}
    baseline = _baseline(tmp_path / "b.json", {GOOD["key"]: {"label": "x", "metrics": {"miou": metric}}})
    assert main(["check", "--baseline", str(baseline), "--results-dir", str(res)]) == 2
    err = _flat(capsys.readouterr().err)
    assert _flat(f"{baseline}: entry '{GOOD['key']}'") in err and "fractionsin[0,1]" in err
    assert "--update-baseline" in err


def test_check_refuses_an_empty_baseline_and_a_missing_results_folder(tmp_path, capsys):
    res = tmp_path / "res"
    _write(res, GOOD)
    empty = _baseline(tmp_path / "empty.json", {})
    assert main(["check", "--baseline", str(empty), "--results-dir", str(res)]) == 2
    err = _flat(capsys.readouterr().err)
    assert _flat(f"{empty} has no entries") in err and "--update-baseline" in err

    baseline = tmp_path / "b.json"
    assert main(["check", "--baseline", str(baseline), "--results-dir", str(res), "--update-baseline"]) == 0
    missing = tmp_path / "no-such-results"
    assert main(["check", "--baseline", str(baseline), "--results-dir", str(missing)]) == 2
    err = _flat(capsys.readouterr().err)
    assert _flat(f"results folder {missing} does not exist") in err and "--results-dir" in err
    assert not missing.exists()

    before = baseline.read_bytes()  # nor is an empty baseline written from a missing or empty folder
    assert main(["check", "--baseline", str(baseline), "--results-dir", str(missing), "--update-baseline"]) == 2
    assert _flat(f"results folder {missing} does not exist") in _flat(capsys.readouterr().err)
    (tmp_path / "empty-res").mkdir()
    assert main(["check", "--baseline", str(baseline), "--results-dir", str(tmp_path / "empty-res"),
                 "--update-baseline"]) == 2
    assert _flat(f"no records under {tmp_path / 'empty-res'}") in _flat(capsys.readouterr().err)
    assert baseline.read_bytes() == before


def test_leaderboard_refuses_a_missing_results_folder(tmp_path, capsys):
    out = tmp_path / "lb"
    assert main(["leaderboard", "--results-dir", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert _flat(f"results folder {tmp_path / 'nope'} does not exist") in _flat(capsys.readouterr().err)
    assert not out.exists()
