"""The command line as a user meets it: the main job and its outputs (bad inputs: test_bad_input.py)."""
import json
import os
import subprocess
import sys

from click.testing import CliRunner

from alibi_export.cli import main
from tests.conftest import EXCERPT, SHIPPED, SHIPPED_SINUSOIDAL


def run_cli(*args, cwd=None):
    """Run the installed entry point in a subprocess: what a user sees, tracebacks included."""
    return subprocess.run([sys.executable, "-m", "alibi_export", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def assert_one_line_error(proc, match):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error"), proc.stderr
    assert match in lines[0], lines[0]


def test_main_job_dynamic_export(tmp_path, seed):
    proc = run_cli("onnx", "--dynamic-len", "--lengths", "256,1024,4096", "--seed", seed, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # progress bars are for terminals; this is a pipe
    assert (tmp_path / "alibi-small.onnx").is_file()
    assert "parity PASS" in proc.stdout and "16x" in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip().split()[0:1] == ["4096"]]
    assert rows and abs(float(rows[0][5]) - float(rows[0][6])) / float(rows[0][6]) < 1e-3  # ppl ORT == torch


def test_fixed_length_export_says_so(tmp_path, tiny_dir):
    proc = run_cli("onnx", tiny_dir, "--fixed-len", "-o", tmp_path / "f.onnx", "--no-validate")
    assert proc.returncode == 0, proc.stderr
    assert "FIXED-LENGTH" in proc.stdout


def test_validate_command(tmp_path, shipped_onnx, seed):
    result = CliRunner().invoke(main, ["validate", str(shipped_onnx), str(SHIPPED), "--lengths", "16,300", "--seed",
                                       str(seed)])
    assert result.exit_code == 0, result.output
    assert "parity PASS" in result.output


def test_validate_fails_beyond_tolerance(tmp_path, shipped_onnx, seed):
    """Against a different model the logits disagree: exit code 1, FAIL in the table."""
    result = CliRunner().invoke(main, ["validate", str(shipped_onnx), str(SHIPPED_SINUSOIDAL), "--lengths", "32",
                                       "--seed", str(seed)])
    assert result.exit_code == 1
    assert "FAIL" in result.output


def test_ppl_writes_json_and_plot(tmp_path, shipped_onnx):
    proc = run_cli("ppl", shipped_onnx, SHIPPED_SINUSOIDAL, "--text", EXCERPT, "--lengths", "256,512",
                   "--max-tokens", "2048", "--json", tmp_path / "p.json", "--plot", tmp_path / "p.png")
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "p.json").read_text())
    alibi, sinus = data["results"]["alibi-small.onnx"], data["results"]["sinusoidal-small"]
    assert [r["length"] for r in alibi] == [256, 512]
    assert sinus[1]["ppl"] > sinus[0]["ppl"] * 2  # sinusoidal blows up past its training length
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_unwritable_output_directory(tmp_path, tiny_dir, monkeypatch):
    """Root ignores permission bits, so the check itself is exercised through os.access."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    result = CliRunner().invoke(main, ["onnx", str(tiny_dir), "--dynamic-len", "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 1
    assert "not writable" in result.output
    assert not list(tmp_path.iterdir())


def test_failed_export_leaves_no_file(tmp_path, tiny_dir, monkeypatch):
    import alibi_export.export.onnx as exp

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(exp.onnx, "save", boom)
    result = CliRunner().invoke(main, ["onnx", str(tiny_dir), "--dynamic-len", "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 1 and "disk full" in result.output
    assert not list(tmp_path.iterdir())
