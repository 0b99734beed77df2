"""benchmarks/ruler.py --quick on the real model, with RULER's own generators and metric:
full attention and IceCache find the needle in the repeated-text haystack, IceCache is
ahead of StreamingLLM at the same budget, and the report (JSON, PNG) is whole; and
benchmarks/agreement.py on the same cases: a budget holding the whole context scores full
attention's answer as full attention does, StreamingLLM (which cannot see the needle)
finds it much less likely than the default, and an interrupted run resumes."""

import json

import pytest

from benchmarks import agreement, ruler

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The --quick run: its report and the cache holding its cases."""
    tmp = tmp_path_factory.mktemp("ruler")
    out, cache = tmp / "ruler.json", tmp / "cache"
    assert ruler.main(["--quick", "--out", str(out), "--cache", str(cache)]) == 0
    return out, cache


def test_quick_ruler(quick):
    out, _ = quick
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert len(report["records"]) == 2 * 2 * 3  # tasks x samples x (full, icecache, streaming)
    single = {(r["method"], r["case"]): r["score"] for r in report["records"] if r["task"] == "niah_single_1"}
    assert all(single[(m, c)] == 1.0 for m in ("full", "icecache") for c in (0, 1)), single
    average = report["by_length"]["2048"]
    assert average["icecache@256"] > average["streaming@256"]
    diffs = {r["method"]: r for r in report["paired_vs_full"]}
    assert diffs["streaming"]["diff"] < 0 and diffs["streaming"]["ci95"][0] <= diffs["streaming"]["diff"]
    ahead = {r["against"]: r for r in report["icecache_vs_others"]}
    assert set(ahead) == {"streaming"} and ahead["streaming"]["cases"] == 4
    assert ahead["streaming"]["diff"] == pytest.approx(diffs["icecache"]["diff"] - diffs["streaming"]["diff"])


def test_agreement_with_full_attention(quick, tmp_path):
    cache, out = quick[1], tmp_path / "agreement.json"
    cases = ["--tasks", "niah_single_1", "--lengths", "2048", "--seeds", "0", "--samples", "2"]  # --quick's
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
        assert whole["first_flip_margin"] is None and whole["clear_flips"] == 0
        streaming = records[("streaming", case)]
        assert streaming["nll_gap"] > records[("icecache", case)]["nll_gap"] + 0.5
        assert streaming["clear_flips"] > 0  # the needle's digits, which full attention is sure of
        assert records[("icecache", case)]["full_score"] == 1.0  # full attention finds the needle
    methods = report["methods"]
    assert methods["streaming"]["nll_gap_vs_default"]["ci95"][0] > 0
    assert "nll_gap_vs_default" not in methods["icecache"]
    assert methods["streaming"]["flips"]["clear_flip_cases_full_right"] == 2 and "flips" not in methods["whole"]
    # a second run over the same cases finds them done and writes the same report
    log = out.with_suffix(".records.jsonl").read_text()
    assert agreement.main([*run, "--resume"]) == 0
    assert out.with_suffix(".records.jsonl").read_text() == log
    assert json.loads(out.read_text())["methods"] == methods


def test_flips_are_told_from_near_ties_by_full_attentions_margin():
    # (token, log p, top token[, full attention's margin]) per step
    full = [(5, -0.7, 5, 0.1), (6, -0.05, 6, 3.0), (7, -0.01, 7, 4.0)]
    tipped = agreement.compare(full, [(5, -0.8, 9), (6, -0.1, 6), (7, -0.02, 7)])
    assert tipped["first_flip_margin"] == 0.1 and tipped["clear_flips"] == 0 and not tipped["same_answer"]
    lost = agreement.compare(full, [(5, -0.7, 5), (6, -3.0, 8), (7, -2.0, 2)])
    assert lost["first_flip_margin"] == 3.0 and lost["clear_flips"] == 2
    assert agreement.compare(full, [(5, -0.7, 5), (6, -0.05, 6), (7, -0.01, 7)])["first_flip_margin"] is None
    assert agreement.margin([(5, -0.2), (9, -1.9)]) == pytest.approx(1.7)


def test_variants_are_checked_by_field():
    with pytest.raises(SystemExit):
        agreement.main(["--cache", "x", "--variant", "bad:rerank=0"])
    with pytest.raises(SystemExit):
        agreement.main(["--cache", "x", "--variant", "bad:no_such_field=1"])


def test_prompts_split_where_the_context_ends():
    """Every task's template, singular rewording included: the question is what follows
    the context, the document keeps the preamble and the haystack."""
    specs = ruler.task_specs()
    assert len(specs) == 13
    spec = specs["niah_single_1"]
    prompt = ("A special magic number is hidden within the following text.\nfiller one.\nfiller two.\n"
              "What is the special magic number for x-y mentioned in the provided text? The special magic number "
              "for x-y mentioned in the provided text is")
    document, question = ruler.split(prompt, spec)
    assert document.endswith("filler two.") and question.startswith("\nWhat is the special magic number")
    qa = ruler.split("Answer the question.\n\nThe following are given documents.\n\nDocument 1: text\n\n"
                     "Answer the question based on the given documents. Only give me the answer and do not output "
                     "any other words.\n\nQuestion: who? Answer:", specs["qa_1"])
    assert qa[0].endswith("Document 1: text") and qa[1].startswith("\n\nAnswer the question based")
    with pytest.raises(ValueError, match="context ends"):
        ruler.split("no line breaks at all", spec)
