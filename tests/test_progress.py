"""Progress bars: shown on a terminal, absent from pipes and logs (stdout is never touched)."""
import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import pytest

from tests.conftest import EXCERPT


def _run(args, *, terminal: bool, cwd):
    """Run the CLI with stdout piped and stderr on a pseudo-terminal (``terminal``) or a pipe.

    Returns (exit code, stdout, stderr)."""
    cmd = [sys.executable, "-m", "alibi_export", *map(str, args)]
    env = dict(os.environ)
    if not terminal:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
        return proc.returncode, proc.stdout, proc.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 x 0: no bar fits
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, cwd=cwd, env=env)
    os.close(slave)
    err = bytearray()
    while True:  # drain the terminal while the command runs, or it blocks once the buffer is full
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                chunk = b""
            err += chunk
            if not chunk and proc.poll() is not None:
                break
        elif proc.poll() is not None:
            break
    out = proc.stdout.read().decode()
    proc.wait(timeout=60)
    os.close(master)
    return proc.returncode, out, err.decode(errors="replace")


def test_main_job_shows_bars_on_a_terminal(tiny_dir, tmp_path, seed):
    """Export, the parity lengths and both perplexity sweeps each draw a bar on a terminal, and stdout (the
    table) gets none of it. In a pipe stderr stays empty: test_cli's main-job test checks that."""
    code, out, err = _run(["onnx", tiny_dir, "--dynamic-len", "-o", tmp_path / "t.onnx", "--lengths", "8,16,32",
                           "--seed", seed], terminal=True, cwd=tmp_path)
    assert code == 0, err
    assert "parity PASS" in out and "\r" not in out
    for bar in ["export t.onnx", "parity onnxruntime-cpu", "perplexity onnxruntime-cpu", "perplexity pytorch"]:
        assert bar in err, (bar, err)


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_training_bar_and_evaluation_lines(tmp_path, terminal):
    """Training shows one bar on a terminal; its evaluation lines are printed in both cases."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = EXCERPT.read_text()
    (corpus / "train.txt").write_text(text[:30000])
    (corpus / "valid.txt").write_text(text[30000:36000])
    code, out, err = _run(["train", "--corpus", corpus, "-o", tmp_path / "m", "--steps", "4", "--eval-every", "2",
                           "--vocab-size", "300", "--layers", "1", "--heads", "2", "--d-model", "32", "--d-ff", "64",
                           "--train-len", "32", "--batch-size", "2", "--device", "cpu"], terminal=terminal,
                          cwd=tmp_path)
    assert code == 0, err
    assert out.strip() == f"wrote {tmp_path / 'm'}"
    assert [line.split(":")[0] for line in err.replace("\r", "\n").splitlines() if line.startswith("step ")] == \
        ["step 2", "step 4"]
    assert ("training alibi" in err) == terminal


def test_library_is_silent_when_stderr_is_not_a_terminal(shipped, shipped_onnx, capsys, seed):
    """compare() and perplexity() called from Python (stderr captured: not a terminal) print nothing."""
    from alibi_export.data import encode_text, read_text
    from alibi_export.perplexity import perplexity
    from alibi_export.runtime import make_runner
    from alibi_export.runtime.pytorch import TorchRunner
    from alibi_export.validate import compare

    assert compare(shipped_onnx, TorchRunner(shipped.model), [8, 16], seed=seed)
    tokens = encode_text(shipped.tokenizer, read_text(EXCERPT))[:200]
    perplexity(make_runner(shipped_onnx), tokens, [16, 32])
    assert capsys.readouterr() == ("", "")
