"""A GPU benchmark's JSON names the software its figures ran on (Triton's compiler decides a
kernel's registers: the H200 machine's 3.6 spilled where CI's 3.9 did not)."""

import json

import torch

from benchmarks.decode_speed import save


def test_a_report_records_the_versions_it_ran_on(tmp_path):
    out = tmp_path / "deep" / "report.json"
    save({"runs": [1]}, out)
    written = json.loads(out.read_text())
    assert written["runs"] == [1]
    assert written["software"]["torch"] == torch.__version__
    assert written["software"]["triton"]  # a test dependency, so installed here


def test_a_report_keeps_the_software_it_already_names(tmp_path):
    out = tmp_path / "report.json"
    save({"software": {"torch": "from the replica"}}, out)
    assert json.loads(out.read_text())["software"] == {"torch": "from the replica"}
