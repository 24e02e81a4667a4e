"""`ssl-segbench check` fails on a planted regression beyond tolerance and passes within it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ssl_segbench.atomic import write_json_atomic
from ssl_segbench.cli import main
from ssl_segbench.records import iter_records
from ssl_segbench.regression import TOLERANCE_FLOOR, default_tolerance


@pytest.fixture(scope="module")
def results(small_synthetic, tmp_path_factory):
    res = tmp_path_factory.mktemp("res")
    assert main(["run", "--backbone", "pixels", "--dataset", "synthetic", "--data-root", str(small_synthetic),
                 "--size", "64", "--protocol", "kmeans", "--seeds", "3", "--results-dir", str(res)]) == 0
    return res


def _shift(results, metric, delta):
    """Move every seed's value by `delta` (a record whose mean is not its seeds' mean is refused on load)."""
    (path, rec), = iter_records(results)
    rec.metrics[metric]["per_seed"] = [v + delta for v in rec.metrics[metric]["per_seed"]]
    rec.metrics[metric]["mean"] = float(np.mean(rec.metrics[metric]["per_seed"]))
    write_json_atomic(path, rec.to_json())
    return rec


def _check(baseline, results, *extra):
    return main(["check", "--baseline", str(baseline), "--results-dir", str(results), *extra])


def test_gate(results, tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    assert _check(baseline, results) == 2  # no baseline yet: a clear error naming the fix
    assert "--update-baseline" in capsys.readouterr().err
    assert _check(baseline, results, "--update-baseline") == 0
    base = json.loads(baseline.read_text())
    (entry,) = base["entries"].values()
    tol = default_tolerance(entry["metrics"]["miou"])
    assert tol == max(TOLERANCE_FLOOR, 2 * entry["metrics"]["miou"]["std"])
    assert _check(baseline, results) == 0

    work = tmp_path / "work"
    import shutil

    shutil.copytree(results, work)
    _shift(work, "miou", -0.9 * tol)  # within tolerance
    assert _check(baseline, work) == 0
    _shift(work, "miou", -0.2 * tol)  # now 1.1 × tol below: a regression
    capsys.readouterr()
    assert _check(baseline, work) == 1
    assert "regressed" in capsys.readouterr().out
    assert _check(baseline, work, "--tolerance", "miou=0.5") == 0  # an explicit, looser tolerance
    _shift(work, "miou", +5 * tol)  # improvements pass
    assert _check(baseline, work) == 0


def test_missing_result_fails(results, tmp_path):
    baseline = tmp_path / "b.json"
    assert _check(baseline, results, "--update-baseline") == 0
    (tmp_path / "empty").mkdir()
    assert _check(baseline, tmp_path / "empty") == 1


def test_baseline_is_byte_stable(results, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    _check(a, results, "--update-baseline")
    _check(b, results, "--update-baseline")
    assert a.read_bytes() == b.read_bytes()
