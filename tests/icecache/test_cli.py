import subprocess
import sys

from tests.icecache.haystack import QUESTION, passkey_document


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "icecache.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_streams_the_answer_and_a_summary(tmp_path, engine):
    doc = tmp_path / "doc.txt"
    doc.write_text(passkey_document(engine.tokenizer, 2000, 0.3, 71942))
    r = run_cli("generate", "--file", str(doc), "--prompt", QUESTION, "--max-tokens", "8", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "71942" in r.stdout
    summary = r.stderr.strip().splitlines()[-1]
    for field in ("TPOT", "prefill+index", "pages loaded/token", "host", "MiB"):
        assert field in summary
    assert "prefill" in r.stderr and "tok" in r.stderr  # the progress bar


def test_errors_exit_2_with_a_message(tmp_path):
    r = run_cli("generate", "--file", str(tmp_path / "missing.txt"), "--prompt", "hi")
    assert r.returncode == 2 and "no such file" in r.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    r = run_cli("index", "--file", str(empty))
    assert r.returncode == 2 and "is empty" in r.stderr
    r = run_cli("generate", "--prompt", "hi", "--max-tokens", "0")
    assert r.returncode == 2 and "max_tokens" in r.stderr
