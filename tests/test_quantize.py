"""Quantized exports: ONNX Runtime's operators in the file, the perplexity gate, --target, bad input."""
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from alibi_export.cli import main
from alibi_export.data import encode_text, read_text
from alibi_export.errors import AlibiExportError, EngineBuildError, ExportError
from alibi_export.export.onnx import export_onnx
from alibi_export.export.targets import resolve_target
from alibi_export.artifacts import read_metadata
from alibi_export.validate import GateResult, perplexity_gate, tolerance_of
from tests.conftest import EXCERPT

GATE_LENGTHS = [256, 1024]  # 1x and 4x; the CLI's gate adds 16x (BENCHMARKS.md has the full run)


@pytest.fixture(scope="module")
def excerpt_tokens(shipped):
    return encode_text(shipped.tokenizer, read_text(EXCERPT))[: max(GATE_LENGTHS) + 1]


@pytest.fixture(scope="module")
def shipped_int8(tmp_path_factory, shipped):
    return export_onnx(shipped, tmp_path_factory.mktemp("q8") / "int8.onnx", quantize="int8").path


@pytest.fixture(scope="module")
def shipped_int4_kv(tmp_path_factory, shipped):
    return export_onnx(shipped, tmp_path_factory.mktemp("q4") / "int4-kv.onnx", quantize="int4", kv_cache=True).path


def _ops(path):
    model = onnx.load(str(path))
    ops = [n for n in model.graph.node]
    for n in model.graph.node:  # the KV-cache form's attention sits in If branches
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                ops += list(a.g.node)
    return ops, {i.name for i in model.graph.initializer}


def test_int8_and_int4_pass_the_gate_on_real_weights(shipped, shipped_int8, shipped_int4_kv, excerpt_tokens):
    """Perplexity needs real weights: the shipped model on the shipped excerpt. Measured ratios (full CLI gate,
    16k tokens): int8 1.0003-1.0007, int4 1.029-1.031 (BENCHMARKS.md)."""
    for path, quantization in ((shipped_int8, "int8"), (shipped_int4_kv, "int4")):
        gate = perplexity_gate(path, shipped.model, excerpt_tokens, GATE_LENGTHS)
        assert gate.quantization == quantization and gate, [(r.length, r.ratio) for r in gate.rows]
        assert all(r.argmax_agreement > 0.8 for r in gate.rows), [r.argmax_agreement for r in gate.rows]
    # Negative control: int4's loss is real (ratio > 1.005), so a gate tighter than it fails.
    assert not GateResult(gate.rows, 1.005, "int4"), [r.ratio for r in gate.rows]


def test_files_hold_onnxruntime_quantized_operators(shipped_int8, shipped_int4_kv, tmp_path, tiny_dir):
    from alibi_export import load

    ops8, inits8 = _ops(shipped_int8)
    assert sum(n.op_type == "MatMulInteger" for n in ops8) == 17  # 16 projections + the untied LM head
    # Only weight products: the q.k and p.v products (no constant input) stay float32 MatMuls.
    assert all(n.input[1] not in inits8 for n in ops8 if n.op_type == "MatMul")
    ops4, _ = _ops(shipped_int4_kv)
    nbits = [n for n in ops4 if n.op_type == "MatMulNBits"]
    assert len(nbits) == 17 and {a.i for n in nbits for a in n.attribute if a.name == "block_size"} == {32}
    assert any(n.op_type == "GatherBlockQuantized" for n in ops4)
    meta = read_metadata(shipped_int4_kv)
    assert (meta.quantization, meta.quantization_block_size) == ("int4", 32)
    with pytest.raises(AlibiExportError, match="not logit-identical"):  # validate's tolerance logic knows
        tolerance_of(meta)
    path = export_onnx(load(tiny_dir), tmp_path / "b64.onnx", quantize="int4", block_size=64).path
    ops, _ = _ops(path)
    assert {a.i for n in ops if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"} == {64}


def test_cli_gate_fails_beyond_ppl_tolerance(tmp_path, tiny_dir):
    """The export command exits non-zero beyond --ppl-tolerance and prints each ratio (a random tiny model: the
    ratio means nothing, the exit code does). Control: the same export within a loose tolerance passes."""
    text = tmp_path / "t.txt"
    text.write_text(EXCERPT.read_text()[:6000])
    args = ["onnx", str(tiny_dir), "--dynamic-len", "--quantize", "int4", "--lengths", "32,64", "--text", str(text)]
    bad = CliRunner().invoke(main, args + ["-o", str(tmp_path / "a.onnx"), "--ppl-tolerance", "0.5"])
    assert bad.exit_code == 1 and "accuracy gate failed" in bad.output and "ratio" in bad.output, bad.output
    good = CliRunner().invoke(main, args + ["-o", str(tmp_path / "b.onnx"), "--ppl-tolerance", "2"])
    assert good.exit_code == 0 and "accuracy gate PASS" in good.output, good.output


def test_target_picks_prints_and_yields_to_explicit_flags():
    base = dict(dynamic_len=False, attention="decomposed", dtype="float32", kv_cache=False, ort_fusions=False,
                quantize=None, block_size=32, genai=False)
    cuda, line = resolve_target("cuda", base, set())
    assert (cuda["attention"], cuda["dtype"], cuda["ort_fusions"], cuda["quantize"]) == ("onnx", "float16", True, None)
    assert line.startswith("target cuda:") and "--attention onnx" in line
    cpu, _ = resolve_target("cpu", {**base, "dtype": "float16"}, {"dtype"})
    assert cpu["dtype"] == "float16" and cpu["quantize"] is None  # explicit fp16 overrides; int8 then dropped
    genai, _ = resolve_target("genai", base, set())
    assert genai["kv_cache"] and genai["genai"] and genai["quantize"] == "int4" and genai["dynamic_len"]
    with pytest.raises(ExportError, match="contradicts --quantize int4"):
        resolve_target("cuda", {**base, "quantize": "int4"}, {"quantize"})
    with pytest.raises(ExportError, match="contradicts --ort-fusions"):
        resolve_target("tensorrt-rtx", {**base, "ort_fusions": True}, {"ort_fusions"})


def _one_line_error(result, match):
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error") and match in lines[0], result.stderr


@pytest.mark.parametrize("flags, match", [
    (["--dynamic-len", "--quantize", "int3"], "'int3' is not one of 'int8', 'int4'"),
    (["--dynamic-len", "--quantize", "int8", "--attention", "onnx"], "not --attention onnx"),
    (["--dynamic-len", "--quantize", "int4", "--dtype", "float16"], "expected --dtype float32"),
    (["--dynamic-len", "--quantize", "int4", "--block-size", "24"], "bad block size 24"),
    (["--dynamic-len", "--quantize", "int4", "--block-size", "8"], "bad block size 8"),
    (["--dynamic-len", "--genai"], "add --kv-cache"),
    (["--target", "cuda", "--quantize", "int4"], "--target cuda contradicts --quantize int4"),
    (["--dynamic-len", "--ppl-tolerance", "1.1"], "applies to quantized exports"),
], ids=["unknown", "onnx-form", "fp16", "block-24", "block-8", "genai-no-kv", "cuda-int4", "tolerance-alone"])
def test_bad_input_one_line_and_nothing_written(tmp_path, tiny_dir, flags, match):
    result = CliRunner().invoke(main, ["onnx", str(tiny_dir), "-o", str(tmp_path / "out"), *flags])
    _one_line_error(result, match)
    assert list(tmp_path.iterdir()) == []  # no partial output


def test_engines_refuse_quantized_files(shipped_int8, tmp_path):
    from alibi_export.runtime.tensorrt import build_engine

    with pytest.raises(EngineBuildError, match="quantized"):
        build_engine(shipped_int8, tmp_path / "e.engine", min_len=1, opt_len=16, max_len=64)
    assert not (tmp_path / "e.engine").exists()


def test_cli_target_prints_its_choice_and_exports_it(tmp_path, tiny_dir):
    out = tmp_path / "rtx.onnx"
    result = CliRunner().invoke(main, ["onnx", str(tiny_dir), "--target", "tensorrt-rtx", "--no-validate", "-o",
                                       str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("target tensorrt-rtx: --dynamic-len --attention onnx"), result.output
    meta = read_metadata(out)
    assert (meta.attention, meta.dynamic_len) == ("onnx", True)
