"""benchmarks/agreement.py on the real model and RULER's own cases: a budget holding the whole
context scores full attention's answer as full attention does, StreamingLLM (which cannot see
the needle) finds it much less likely than the default, and an interrupted run resumes."""

import json

import pytest

from benchmarks import agreement, ruler

pytestmark = pytest.mark.slow


def test_agreement_with_full_attention(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "agreement.json"
    cases = ["--tasks", "niah_single_1", "--lengths", "2048", "--seeds", "0", "--samples", "2"]
    assert ruler.main(["--generate-only", "--cache", str(cache), *cases]) == 0
    run = ["--cache", str(cache), *cases, "--max-tokens", "16", "--methods", "icecache", "streaming",
           "--variant", "whole:token_budget=4096", "--out", str(out)]
    assert agreement.main(run) == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    records = {(r["method"], r["case"]): r for r in report["records"]}
    assert len(records) == 2 * 3 and report["cases"] == 2
    for case in (0, 1):
        whole = records[("whole", case)]
        assert whole["nll_gap"] == pytest.approx(0.0, abs=1e-3) and whole["same_answer"], whole
        assert records[("streaming", case)]["nll_gap"] > records[("icecache", case)]["nll_gap"] + 0.5
        assert records[("icecache", case)]["full_score"] == 1.0  # full attention finds the needle
    methods = report["methods"]
    assert methods["streaming"]["nll_gap_vs_default"]["ci95"][0] > 0
    assert "nll_gap_vs_default" not in methods["icecache"]
    # a second run over the same cases finds them done and writes the same report
    log = out.with_suffix(".records.jsonl").read_text()
    assert agreement.main([*run, "--resume"]) == 0
    assert out.with_suffix(".records.jsonl").read_text() == log
    assert json.loads(out.read_text())["methods"] == methods


def test_variants_are_checked_by_field():
    with pytest.raises(SystemExit):
        agreement.main(["--cache", "x", "--variant", "bad:rerank=0"])
    with pytest.raises(SystemExit):
        agreement.main(["--cache", "x", "--variant", "bad:no_such_field=1"])
