"""The command line as a user meets it: the main job and its outputs (bad inputs: test_bad_input.py)."""
import json
import os
import shutil
import subprocess
import sys

import click
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


# ----------------------------------------------------------------------------- a failed export replaces nothing
def _previous(tmp_path, tiny_dir):
    """A previous good export at out.onnx (fixed length: other bytes than any dynamic export), and its bytes."""
    out = tmp_path / "out.onnx"
    proc = run_cli("onnx", tiny_dir, "--fixed-len", "--no-validate", "-o", out)
    assert proc.returncode == 0, proc.stderr
    return out, out.read_bytes()


@pytest.mark.slow
def test_a_failed_export_leaves_the_previous_file_byte_identical(tmp_path, tiny_dir):
    """Issue 20 §1: a bad --text, lengths a fixed-length export cannot run, a bad --seed and a failing accuracy
    gate each fail in one line and leave out.onnx as it was, with nothing else left in the folder. Control: a
    good export does replace it (so the comparison can fail)."""
    out, before = _previous(tmp_path, tiny_dir)
    text = tmp_path / "t.txt"
    text.write_text(EXCERPT.read_text()[:3000])
    cases = [
        (["--fixed-len", "--text", tmp_path / "typo.txt"], "text file"),
        (["--fixed-len", "--lengths", "16,32"], "runs at its own length"),
        (["--fixed-len", "--seed", "-5"], "-5 is not in the range"),
        (["--quantize", "int4", "--lengths", "32", "--text", text, "--ppl-tolerance", "0.5"],
         "accuracy gate failed"),
    ]
    for args, match in cases:
        proc = run_cli("onnx", tiny_dir, "-o", out, *args)
        assert proc.returncode != 0, (args, proc.stdout)
        assert match in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert out.read_bytes() == before, args
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "t.txt"], args  # no staging left
    assert f"{out} is unchanged; the failed export was deleted" in proc.stderr
    proc = run_cli("onnx", tiny_dir, "-o", out, "--lengths", "32", "--text", text)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() != before  # control: a passing export takes the name


@pytest.mark.slow
def test_a_failed_parity_check_never_takes_the_name(tmp_path, tiny_dir, monkeypatch):
    """A file whose parity check fails (here: a tolerance of zero) is checked under a staging name and deleted;
    the -o name keeps the previous export, and a new name is never created. Control: the same export with the
    real tolerance takes the name."""
    import alibi_export.validate as validate

    out, before = _previous(tmp_path, tiny_dir)
    monkeypatch.setitem(validate.TOLERANCES, "float32", dict(atol=0.0, rtol=0.0))
    for target, said in ((out, "is unchanged"), (tmp_path / "new.onnx", "was not written")):
        result = CliRunner().invoke(main, ["onnx", str(tiny_dir), "-o", str(target), "--lengths", "32", "--seed", "1"])
        assert result.exit_code == 1 and "parity check failed" in result.output, result.output
        assert f"{target} {said}; the failed export was deleted" in result.output
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    monkeypatch.undo()
    result = CliRunner().invoke(main, ["onnx", str(tiny_dir), "-o", str(out), "--lengths", "32", "--seed", "1"])
    assert result.exit_code == 0 and out.read_bytes() != before, result.output


def test_a_failed_genai_check_leaves_the_previous_folder(tmp_path, tiny_dir, monkeypatch):
    import alibi_export.validate as validate

    folder = tmp_path / "g"
    result = CliRunner().invoke(main, ["onnx", str(tiny_dir), "--kv-cache", "--genai", "--no-validate", "-o",
                                       str(folder)])
    assert result.exit_code == 0, result.output
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setitem(validate.TOLERANCES, "float32", dict(atol=0.0, rtol=0.0))
    result = CliRunner().invoke(main, ["onnx", str(tiny_dir), "--kv-cache", "--genai", "--quantize", "int8",
                                       "--ppl-tolerance", "0.5", "--lengths", "32", "-o", str(folder)])
    assert result.exit_code == 1 and "accuracy gate failed" in result.output, result.output
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no staging folder left


# ----------------------------------------------------------------------------- one vocabulary
def test_every_option_has_help():
    missing = [f"{name} {opt.opts[0]}" for name, command in main.commands.items() for opt in command.params
               if isinstance(opt, click.Option) and not opt.hidden and not (opt.help or "").strip()]
    assert missing == []
    # control: the check sees an option without help
    bare = click.Command("x", params=[click.Option(["--bare"])])
    assert [o for o in bare.params if not o.help]


def test_lengths_mean_the_same_in_every_command():
    from alibi_export.errors import AlibiExportError
    from alibi_export.sizes import parse_lengths, resolve_lengths

    assert resolve_lengths(parse_lengths("256, 4x,16x"), 256) == [256, 1024, 4096]
    assert resolve_lengths(None, 32) == [32, 64, 128, 256, 512]
    for bad in ("0", "-3", "4y", "", "1.5x", "x"):
        with pytest.raises(AlibiExportError, match="positive integers"):
            parse_lengths(bad)
    for name in ("onnx", "validate", "ppl"):  # one parser and one default behind each --lengths
        option = next(p for p in main.commands[name].params if p.name == "lengths")
        assert option.callback.__name__ == "_lengths" and "default: 1x,2x,4x,8x,16x" in option.help


def test_onnx_is_dynamic_by_default(tmp_path, tiny_dir):
    from alibi_export.artifacts import read_metadata

    result = CliRunner().invoke(main, ["onnx", str(tiny_dir), "--no-validate", "-o", str(tmp_path / "d.onnx")])
    assert result.exit_code == 0 and read_metadata(tmp_path / "d.onnx").dynamic_len, result.output
    result = CliRunner().invoke(main, ["onnx", str(tiny_dir), "--fixed-len", "--no-validate", "-o",
                                       str(tmp_path / "f.onnx")])
    assert result.exit_code == 0 and not read_metadata(tmp_path / "f.onnx").dynamic_len  # control


def test_ppl_keeps_two_models_of_one_name_apart(tmp_path, tiny_kv_export, tiny_dir, monkeypatch):
    """Issue 20 §6: two files named x.onnx give two columns and two JSON entries; with no --json/--plot nothing is
    written into the working directory."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(tiny_kv_export.path, tmp_path / sub / "x.onnx")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = ["ppl", str(tmp_path / "a" / "x.onnx"), str(tmp_path / "b" / "x.onnx"), str(tiny_dir), "--lengths", "1x",
            "--max-tokens", "100"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert list(work.iterdir()) == []
    result = CliRunner().invoke(main, args + ["--json", "p.json"])
    keys = list(json.loads((work / "p.json").read_text())["results"])
    assert keys == [str(tmp_path / "a" / "x.onnx"), str(tmp_path / "b" / "x.onnx"), tiny_dir.name]
    from alibi_export.perplexity import labels_for

    assert labels_for(["a/x.onnx", "b/y.onnx"]) == ["x.onnx", "y.onnx"]  # control: distinct names stay short
    assert labels_for(["x.onnx", "x.onnx"]) == ["x.onnx", "x.onnx (2)"]


@pytest.mark.slow
def test_resume_below_the_checkpoint_step_has_nothing_to_do(tmp_path, corpus):
    args = ["train", "--corpus", corpus, "-o", tmp_path / "m", "--layers", "1", "--heads", "2", "--d-model", "16",
            "--d-ff", "32", "--vocab-size", "300", "--train-len", "16", "--batch-size", "2", "--device", "cpu"]
    proc = run_cli(*args, "--steps", "2")
    assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr
    state = (tmp_path / "m" / "trainer_state.json").read_bytes()
    for steps in ("1", "2"):
        proc = run_cli(*args, "--resume", "--steps", steps)
        assert proc.returncode == 0, proc.stderr
        assert "nothing to do" in proc.stdout and "at step 2" in proc.stdout and "wrote" not in proc.stdout
        assert (tmp_path / "m" / "trainer_state.json").read_bytes() == state
    proc = run_cli(*args, "--resume", "--steps", "3")  # control: past the checkpoint's step it trains
    assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr
    assert json.loads((tmp_path / "m" / "trainer_state.json").read_text())["step"] == 3


# ----------------------------------------------------------------------------- user mistakes, not bugs
def test_engine_validation_without_a_gpu_is_one_line(tmp_path, tiny_kv_export, tiny_dir, monkeypatch):
    """An engine (its sidecar matching) validated on a machine without an NVIDIA GPU: one line saying so, before
    any TensorRT library loads. Control: with a GPU reported, that check lets it through."""
    import dataclasses

    import alibi_export.runtime as runtime
    from alibi_export._io import sha256_file
    from alibi_export.artifacts import EngineSidecar, sidecar_path
    from alibi_export.runtime import require_gpu

    if runtime._cuda_device_count() > 0:
        pytest.skip("this machine has a GPU")
    shutil.copy(tiny_kv_export.path, tmp_path / "m.onnx")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine bytes")
    side = EngineSidecar(engine="m.engine", engine_sha256=sha256_file(engine), created_by="alibi-export",
                         backend="tensorrt-rtx", backend_version="1.7", precision="fp32", strongly_typed=True,
                         onnx_dtype="float32", attention="native attention", plugin=None, profile={}, train_len=32,
                         onnx="m.onnx", onnx_sha256=sha256_file(tmp_path / "m.onnx"), timing_cache=None,
                         layer_types={}, build_seconds=1.0)
    sidecar_path(engine).write_text(side.to_json())
    proc = run_cli("validate", engine, tiny_dir, "--lengths", "1x")
    assert_one_line_error(proc, "needs an NVIDIA GPU, and this machine has none")
    monkeypatch.setattr(runtime, "_cuda_device_count", lambda: 1)
    require_gpu("x")  # control: the same check passes where a GPU is seen


def test_a_prompt_that_is_not_utf8_is_one_line(tiny_kv_export):
    proc = subprocess.run([sys.executable, "-m", "alibi_export", "generate", str(tiny_kv_export.path), "-p",
                           b"caf\xe9 au lait"], capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "prompt 0 is not valid UTF-8")
    proc = subprocess.run([sys.executable, "-m", "alibi_export", "generate", str(tiny_kv_export.path), "-p",
                           "caf\u00e9".encode(), "-n", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr  # control: the same prompt in UTF-8 runs
