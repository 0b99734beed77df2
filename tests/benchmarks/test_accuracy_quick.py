"""benchmarks/accuracy.py --quick on the real model: passkey at 100% and IceCache ahead of
StreamingLLM at the same budget; the JSON and the plot are written."""

import json

import pytest

from benchmarks import accuracy

pytestmark = pytest.mark.slow


def test_quick_suite(tmp_path):
    out = tmp_path / "accuracy.json"
    assert accuracy.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    passkey = {r["method"]: r["mean"] for r in report["rows"] if r["task"] == "passkey"}
    assert passkey["full"] == passkey["icecache"] == 1.0
    average = report["suite_average"]
    assert average["icecache@256"] > average["streaming@256"]
    assert average["icecache@256"] >= 0.99 * average["full@0"]


def test_selectors_are_validated():
    from icecache import IceCacheConfig
    with pytest.raises(ValueError, match="selector"):
        IceCacheConfig(selector="h2o")
