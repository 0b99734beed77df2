"""benchmarks/ruler.py --quick on the real model, with RULER's own generators and metric:
full attention and IceCache find the needle in the repeated-text haystack, IceCache is
ahead of StreamingLLM at the same budget, and the report (JSON, PNG) is whole."""

import json

import pytest

from benchmarks import ruler

pytestmark = pytest.mark.slow


def test_quick_ruler(tmp_path):
    out = tmp_path / "ruler.json"
    assert ruler.main(["--quick", "--out", str(out), "--cache", str(tmp_path / "cache")]) == 0
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
