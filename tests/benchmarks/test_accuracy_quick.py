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


def test_a_cut_off_run_resumes_and_shards_merge(tmp_path):
    """--resume keeps the answers already given and does only the rest; --merge joins
    shards into one report whose rows count every case once."""
    common = ["--lengths", "600", "--seeds", "0", "--methods", "full", "icecache", "--budgets", "256"]
    shard_a, shard_b = tmp_path / "a.json", tmp_path / "b.json"
    assert accuracy.main(["--tasks", "passkey", "--cases", "1", "--out", str(shard_a), *common]) == 0
    first = json.loads(shard_a.read_text())["records"]
    assert len(first) == 2  # one case, two methods
    assert accuracy.main(["--tasks", "passkey", "--cases", "2", "--resume", "--out", str(shard_a), *common]) == 0
    resumed = json.loads(shard_a.read_text())
    assert len(resumed["records"]) == 4 and resumed["records"][:2] == first
    assert sorted(r["case"] for r in resumed["records"][2:]) == [1, 1]  # only the new case was answered
    assert not shard_a.with_suffix(".partial.json").exists()
    assert accuracy.main(["--tasks", "niah_single", "--cases", "1", "--out", str(shard_b), *common]) == 0
    merged_path = tmp_path / "suite.json"
    assert accuracy.main(["--merge", str(shard_a), str(shard_b), str(shard_a), "--cases", "1", "--methods", "full",
                          "icecache", "--out", str(merged_path)]) == 0
    merged = json.loads(merged_path.read_text())
    assert merged_path.with_suffix(".png").stat().st_size > 0
    assert {(r["task"], r["method"]): r["cases"] for r in merged["rows"]} == {
        ("passkey", "full"): 1, ("passkey", "icecache"): 1, ("niah_single", "full"): 1, ("niah_single", "icecache"): 1}
    assert len(merged["records"]) == 4  # shard a given twice, and its second case left out by --cases 1
