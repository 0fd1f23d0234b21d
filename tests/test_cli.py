"""The command line as a user meets it: the main job, and one-line errors for every bad input."""
import json
import os
import subprocess
import sys

import pytest
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
    proc = run_cli("onnx", tiny_dir, "-o", tmp_path / "f.onnx", "--no-validate")
    assert proc.returncode == 0, proc.stderr
    assert "FIXED-LENGTH" in proc.stdout


def test_validate_command(tmp_path, shipped_onnx, seed):
    result = CliRunner().invoke(main, ["validate", str(shipped_onnx), "--model", str(SHIPPED), "--lengths",
                                       "16,300", "--seed", str(seed)])
    assert result.exit_code == 0, result.output
    assert "parity PASS" in result.output


def test_validate_fails_beyond_tolerance(tmp_path, shipped_onnx, seed):
    """Against a different model the logits disagree: exit code 1, FAIL in the table."""
    result = CliRunner().invoke(main, ["validate", str(shipped_onnx), "--model", str(SHIPPED_SINUSOIDAL),
                                       "--lengths", "32", "--seed", str(seed)])
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


@pytest.mark.parametrize("args,match", [
    (["onnx", "{tmp}/missing-ckpt", "--dynamic-len"], "not found"),
    (["onnx", "{corrupt}", "--dynamic-len", "-o", "{tmp}/x.onnx"], "corrupt weights"),
    (["onnx", "{unknown}", "--dynamic-len", "-o", "{tmp}/x.onnx"], "unknown config field"),
    (["onnx", "{tiny}", "--dynamic-len", "--opset", "12", "-o", "{tmp}/x.onnx"], "unsupported opset 12"),
    (["onnx", "{tiny}", "--dynamic-len", "--lengths", "0,64", "-o", "{tmp}/x.onnx"], "positive integers"),
    (["onnx", "{tiny}", "--dynamic-len", "--lengths", "abc", "-o", "{tmp}/x.onnx"], "positive integers"),
    (["onnx", "{tiny}", "--dynamic-len", "-o", "{tmp}/no/such/dir/x.onnx"], "does not exist"),
    (["ppl", "{tiny}", "--text", "{short}", "--lengths", "64", "--json", "{tmp}/p.json", "--plot", "{tmp}/p.png"],
     "text too short"),
    (["ppl", "{tiny}", "--text", "{tmp}/nope.txt", "--lengths", "64", "--json", "{tmp}/p.json"], "not found"),
    (["ppl", "{tiny}", "--text", "{short}", "--lengths", "-3", "--json", "{tmp}/p.json"], "positive integers"),
    (["validate", "{tmp}/nope.onnx", "--model", "{tiny}"], "not found"),
    (["validate", "{short}", "--model", "{tiny}"], "cannot read ONNX"),
])
def test_bad_input_gives_one_line_error(tmp_path, tiny_dir, args, match):
    import shutil

    corrupt, unknown = tmp_path / "corrupt", tmp_path / "unknown"
    shutil.copytree(tiny_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    shutil.copytree(tiny_dir, unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "flash": True}))
    short = tmp_path / "short.txt"
    short.write_text("Too short to evaluate.")
    fmt = dict(tmp=tmp_path, corrupt=corrupt, unknown=unknown, tiny=tiny_dir, short=short)
    before = set(os.listdir(tmp_path))
    proc = run_cli(*[a.format(**fmt) for a in args], cwd=tmp_path)
    assert_one_line_error(proc, match)
    assert set(os.listdir(tmp_path)) == before, "no partial output left behind"


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
