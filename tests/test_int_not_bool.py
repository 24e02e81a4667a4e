"""One rule for "an integer (or number) that is not a bool" (`registry.is_int`, `registry.is_number`), used by the
registry, the runner, protocol parameters, records and the regression baseline: YAML and JSON give `true` where a
count was meant, and Python counts True as the integer 1."""
import json

import pytest

from ssl_segbench.protocols import ProtocolError, get_protocol
from ssl_segbench.registry import is_int, is_number
from ssl_segbench.regression import BaselineError, read_baseline


def test_bools_are_neither_ints_nor_numbers():
    assert [is_int(v) for v in (0, 3, -2, True, False, 3.0, "3", None)] == [True] * 3 + [False] * 5
    assert [is_number(v) for v in (0, 0.5, -1e9, True, False, "0.5", None)] == [True] * 3 + [False] * 4


@pytest.mark.parametrize("name, key, good, bad", [
    ("fs4", "pyramid_levels", [1, 2], [True, 2]),
    ("leopart-cd", "distances", [1], [True]),
    ("leopart-cd", "cbfe_threshold", 1, True),
    ("kmeans", "k", 3, True),
])
def test_protocol_parameters_refuse_a_bool_where_the_int_passes(name, key, good, bad):
    get_protocol(name, **{key: good})
    with pytest.raises(ProtocolError, match=key):
        get_protocol(name, **{key: bad})


@pytest.mark.parametrize("mean, ok", [(0.5, True), (1, True), (True, False)])
def test_baseline_metric_must_be_a_number_not_a_bool(tmp_path, mean, ok):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"schema": "ssl-segbench/baseline/v1", "entries": {
        "k": {"label": "x", "metrics": {"miou": {"mean": mean, "std": 0.0, "n": 1}}}}}))
    if ok:
        assert read_baseline(path)["entries"]["k"]["metrics"]["miou"]["mean"] == mean
    else:
        with pytest.raises(BaselineError, match="miou"):
            read_baseline(path)
