"""Facts planted in real documents (a licence, Python's language reference, argparse's
source), asked on the indexed context with the real model: the default IceCache keeps
the facts full attention finds, and the report (JSON, PNG) is whole."""

import json

import pytest

from benchmarks import real_text

pytestmark = pytest.mark.slow


def test_the_default_keeps_the_facts_full_attention_finds(tmp_path):
    """The issue's bar: the default loses none of the facts full attention finds (measured:
    none, benchmarks/results/real_text.json, seed 0; with pages ranked by boxes it lost a
    reviewer's name in the licence at both lengths), and pages chosen by the index alone,
    without the question's pages and re-ranking, lose more. Each lost fact is named in the
    failure."""
    out = tmp_path / "real_text.json"
    assert real_text.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    found = {(r["method"], r["task"], r["length"], r["case"]): r["score"] for r in report["records"]}
    cases = sorted({key[1:] for key in found})
    assert len(cases) == 3 * 2 * 4  # documents x lengths x facts
    by_full = [c for c in cases if found[("full", *c)] == 1.0]
    assert len(by_full) >= len(cases) // 2, by_full  # the model reads these documents: the comparison means something
    lost = {m: [c for c in by_full if found[(m, *c)] < 1.0] for m in ("icecache", "icecache_bounds")}
    assert not lost["icecache"], f"full attention found these facts and IceCache @256 did not: {lost['icecache']}"
    assert len(lost["icecache"]) < len(lost["icecache_bounds"]), lost


def test_facts_are_planted_as_lines_of_their_own_at_the_length_asked():
    from icecache import Engine
    tokenizer = Engine.from_pretrained().tokenizer
    make = real_text.fact_cases(tokenizer)
    for name in real_text.DOCUMENTS:
        cases = make(name, 3000, 1)
        assert len(cases) == 4 and len({c.document for c in cases}) == 1
        lines = cases[0].document.split("\n")
        for case in cases:
            planted = [line for line in lines if case.answers[0] in line and "this document" in line.lower()]
            assert len(planted) == 1 and planted[0].endswith("."), (name, case.answers)
            assert case.question.startswith("\n\nQuestion: ")
        assert 2700 < len(tokenizer(cases[0].document).input_ids) <= 3000
