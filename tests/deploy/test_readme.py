"""The README's main job as a new user runs it: `serve run deploy/app.yaml`, then
`icecache-client` from another shell."""

from __future__ import annotations

import ctypes
import os
import pathlib
import re
import signal
import subprocess
import time

import pytest

from tests.deploy.conftest import wait_for_no_segments

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _interruptible_and_dies_with_pytest() -> None:
    """In the child before exec: Ctrl-C works (a pytest started in the background, `cmd &`,
    passes SIGINT on ignored, and then the SIGINT below was ignored too and the test waited
    90 s for its SIGKILL), and the child gets it when pytest goes, even killed, so no orphaned
    `serve run` and Ray head outlive the run holding a shm segment the next run trips on."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal(signal.SIGINT, signal.SIG_DFL)
    libc.prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


def client(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["icecache-client", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_serve_run_app_yaml_then_the_client(tmp_path):
    first_block = (ROOT / "README.md").read_text().split("```bash")[1].split("```")[0]
    assert "serve run deploy/app.yaml" in first_block

    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(["serve", "run", "deploy/app.yaml"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True, preexec_fn=_interruptible_and_dies_with_pytest)
    try:
        deadline = time.monotonic() + 300
        while client("stats", timeout=30).returncode != 0:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the app did not come up"
            time.sleep(3)

        indexed = client("index", "deploy/app.yaml")  # the document the README indexes
        assert indexed.returncode == 0, indexed.stderr
        context_id = indexed.stdout.strip()
        assert re.fullmatch(r"[0-9a-f]{32}", context_id) and "prefilled" in indexed.stderr

        answer = client("ask", context_id, "\nQuestion: which port does gRPC use? Answer:", "--max-tokens", "8")
        assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
        assert "reused" in answer.stderr

        stats = client("stats")
        assert "1 contexts" in stats.stdout and "prefills 1" in stats.stdout
        assert client("release", context_id).stdout.strip() == "released"
        gone = client("ask", context_id, "x")
        assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C, as a user stops `serve run`
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    assert wait_for_no_segments(30) == []
