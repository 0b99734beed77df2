"""The replica rounds of benchmarks/serve_gpu.py on CPU replicas (the code path of the
two-GPU run): a real Ray cluster and the real app of deploy/app.yaml, which scales from one
replica to two under load and back when idle, and loses a replica mid-stream."""

import json
import socket

import pytest

from benchmarks import serve_gpu

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_app_scales_out_and_back_and_survives_a_killed_replica(tmp_path, engine):
    engine.tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "rounds.json"
    assert serve_gpu.main([
        "--tokenizer", str(tmp_path / "tok"), "--shape", "tiny", "--device", "cpu", "--replicas-only",
        "--autoscale-round", "--kill-round", "--downscale-delay", "5", "--autoscale-hold", "6",
        "--contexts", "2048", "--docs", "2", "--doc-tokens", "1024", "--replica-concurrency", "8",
        "--tokens", "16", "--kill-tokens", "128", "--cache", "1GiB", "--model-dir", str(tmp_path / "model"),
        "--port", str(free_port()), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0

    scaled = report["autoscale"]
    assert scaled["failed"] == 0 and scaled["requests"] > scaled["askers"], scaled["errors"]
    assert scaled["scaled_up_s"] is not None and len(scaled["by_replica"]) == 2  # the added replica answered,
    assert all(scaled["added_reused"])  # on documents the first one indexed, from the node's shared memory
    assert scaled["scaled_down_s"] is not None  # and the app went back to one replica once idle
    assert [n for _, n in scaled["timeline"]][-1] == 1 and scaled["after_downscale"]["tokens"] == 4

    kill = report["kill"]
    assert kill["replicas_before"] == 2 and kill["lease_holders"] == 2  # streams on both replicas
    assert kill["failed_unavailable"] >= 1 and kill["failed_other"] == []  # the dead one's streams: UNAVAILABLE
    assert kill["completed"] >= 1 and kill["completed_in_full"] == kill["completed"]  # the others finish
    assert kill["completed"] + kill["failed_unavailable"] == kill["streams"]
    after_kill, after = kill["node_stats_after_kill"][0], kill["node_stats_after_streams"][0]
    assert after_kill["segments"] == 1 and after_kill["prefills"] == 1  # the document stays for the survivors
    assert after["leases"] == 0 and after["segments"] == 1  # no lease outlives its stream (the dead one's too)
    assert kill["answer_after"]["tokens"] == 4 and kill["answer_after"]["reused"]
    assert kill["segments_after_shutdown"] == []
