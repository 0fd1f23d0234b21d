"""Quantized exports: ONNX Runtime's operators in the file, the perplexity gate, --target, bad input."""
import shutil
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from alibi_export.cli import main
from alibi_export.data import encode_text, read_text
from alibi_export.errors import AlibiExportError, EngineBuildError, ExportError
from alibi_export.export.onnx import export_onnx
from alibi_export.export.targets import resolve_target
from alibi_export.artifacts import read_metadata
from alibi_export.export import quantize
from alibi_export.export.onnx_file import rewrite_metadata
from alibi_export.runtime.onnxruntime import U8S8_SATURATES, cpu_kernel_path
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
    (["--dynamic-len", "--quantize", "int3"], "unknown quantization 'int3'"),
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


# ------------------------------------------------------------------ int8 arithmetic on every x86 kernel path
INT16 = (-2 ** 15, 2 ** 15 - 1)  # VPMADDUBSW (u8 x s8, AVX2 and AVX-512BW without VNNI) sums pairs into int16
INT32 = (-2 ** 31, 2 ** 31 - 1)  # VPMADDWD on operands widened to int16 (the U8U8 kernels), VNNI, AMX: int32


def _kernel_sum(a: np.ndarray, b: np.ndarray, pair_range) -> np.ndarray:
    """sum_k a[m, k] * b[k, n] as ONNX Runtime's x86 int8 kernels (MLAS) form it: products of adjacent k
    (2j, 2j+1) summed in pairs into an intermediate that saturates to ``pair_range``, then added up in int32.
    With INT16 this is the AVX2 u8s8 path (checked against ONNX Runtime itself where this CPU takes it)."""
    a, b = a.astype(np.int64), b.astype(np.int64)
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.int64)
    for i in range(0, a.shape[0], 8):  # 8 rows at a time: the pairs of the LM head are (8, K/2, vocab)
        rows = a[i:i + 8]
        pairs = rows[:, 0::2, None] * b[None, 0::2] + rows[:, 1::2, None] * b[None, 1::2]
        out[i:i + 8] = np.clip(pairs, *pair_range).sum(1)
    assert (out >= INT32[0]).all() and (out <= INT32[1]).all()
    return out


def _weight_products(path, tokens) -> dict:
    """Each weight product of a dynamic-int8 file as ONNX Runtime's kernels receive it: the u8 activations and
    zero point that ONNX Runtime's own DynamicQuantizeLinear computes on ``tokens`` (graph optimizations off,
    so that it is not fused away), and the quantized weight with its zero points; keyed by the weight's name."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    products = [n for n in model.graph.node if n.op_type == "MatMulInteger"]
    wanted = list(dict.fromkeys(x for n in products for x in (n.input[0], n.input[2])))
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in wanted)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = dict(zip(wanted, session.run(wanted, {"input_ids": np.asarray(tokens, np.int64)[None]})))
    return {n.input[1].removesuffix("_quantized"): (values[n.input[0]].reshape(-1, inits[n.input[1]].shape[0]),
                                                     values[n.input[2]], inits[n.input[1]], inits[n.input[3]])
            for n in products}


def _ort_matmul_integer(a, za, b, zb) -> np.ndarray:
    """ONNX Runtime's own MatMulInteger on this machine's kernel path."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMulInteger", ["a", "b", "za", "zb"], ["y"])], "product",
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.UINT8, list(a.shape)),
         onnx.helper.make_tensor_value_info("za", onnx.TensorProto.UINT8, [])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT32, None)],
        [numpy_helper.from_array(b, "b"), numpy_helper.from_array(zb, "zb")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"a": a, "za": np.asarray(za, np.uint8)})[0].astype(np.int64)


def test_int8_products_cannot_saturate_on_any_x86_kernel_path(shipped, shipped_int8, excerpt_tokens, tmp_path,
                                                              monkeypatch):
    """--quantize int8 writes uint8 weights (U8U8): ONNX Runtime's x86 U8U8 kernels widen both operands to int16
    and sum pairs of products into int32 (SSE, AVX2, AVX-512BW), or accumulate int32 (AVX-VNNI-INT8, AMX), so
    every product is exact on the real activations of the shipped model on the excerpt, whatever this CPU is.
    Negative control: the int8-weight (u8s8) recipe it replaced, built here with the same tool, on the same
    activations, through the AVX2 / AVX-512BW arithmetic (pairs summed into int16, saturating): its products
    are not exact, and where this CPU takes that path ONNX Runtime itself computes the saturated numbers."""
    ours = _weight_products(shipped_int8, excerpt_tokens[:64])
    assert len(ours) == 17
    for name, (a, za, b, zb) in ours.items():
        assert b.dtype == np.uint8 and a.dtype == np.uint8, name
        exact = a.astype(np.int64) @ b.astype(np.int64)
        assert np.array_equal(_kernel_sum(a, b, INT32), exact), name
        centred = (a.astype(np.int64) - int(za)) @ (b.astype(np.int64) - zb.astype(np.int64))
        assert np.array_equal(_ort_matmul_integer(a, za, b, zb), centred), name  # this CPU's kernel agrees

    monkeypatch.setattr(quantize, "INT8_WEIGHT_TYPE", "QInt8")
    control = _weight_products(export_onnx(shipped, tmp_path / "u8s8.onnx", quantize="int8").path,
                               excerpt_tokens[:8])
    saturated, here = 0, cpu_kernel_path()
    for name, (_, _, b, zb) in control.items():
        a, za = ours[name][:2]  # the same real activations
        assert b.dtype == np.int8 and not zb.any(), name
        exact = a.astype(np.int64) @ b.astype(np.int64)
        emulated = _kernel_sum(a, b, INT16)
        saturated += int((emulated != exact).sum())
        expected = emulated if here in U8S8_SATURATES else exact
        assert np.array_equal(_ort_matmul_integer(a, za, b, zb), expected - int(za) * b.astype(np.int64).sum(0)), \
            f"{name}: ONNX Runtime on {here} is not what the emulation says"
    assert saturated > 1000, saturated  # measured: 20,000+ of 64 x 17 products' outputs differ


def test_export_records_its_gate_and_validate_reports_another_kernel_path(tmp_path, tiny_dir):
    """The export command writes its gate (this machine's int8 kernel path, ratios, tolerance) into the file;
    re-exporting gives the same bytes. `validate` prints the recorded path beside its own and says when they
    differ (here: a copy whose record says avx512-vnni, rewritten through the module that owns the format),
    and its exit code is the gate run here: a tolerance tightened below the ratio fails it (the control)."""
    text = tmp_path / "t.txt"
    text.write_text(EXCERPT.read_text()[:6000])
    gate_args = ["--lengths", "32,64", "--text", str(text)]
    args = ["onnx", str(tiny_dir), "--dynamic-len", "--quantize", "int8", "--ppl-tolerance", "2", *gate_args]
    first = CliRunner().invoke(main, args + ["-o", str(tmp_path / "a.onnx")])
    assert first.exit_code == 0 and "accuracy gate PASS" in first.output, first.output
    record = read_metadata(tmp_path / "a.onnx").quantization_gate
    assert record["cpu_kernel_path"] == cpu_kernel_path() and record["tolerance"] == 2 and record["passed"]
    assert [row[0] for row in record["rows"]] == [32, 64] and all(row[1] > 0.5 for row in record["rows"])
    again = CliRunner().invoke(main, args + ["-o", str(tmp_path / "b.onnx")])
    assert again.exit_code == 0 and (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()

    validate = ["validate", "--model", str(tiny_dir), *gate_args]
    same = CliRunner().invoke(main, validate[:1] + [str(tmp_path / "a.onnx")] + validate[1:])
    assert f"the file's own gate ran on: {cpu_kernel_path()}; this machine: {cpu_kernel_path()}" in same.output
    assert "DIFFERS" not in same.output, same.output
    other = tmp_path / "other.onnx"
    shutil.copy(tmp_path / "a.onnx", other)
    meta = read_metadata(other)
    rewrite_metadata(other, replace(meta, quantization_gate={**record, "cpu_kernel_path": "avx512-vnni"}).to_props())
    moved = CliRunner().invoke(main, validate[:1] + [str(other)] + validate[1:])
    assert "KERNEL PATH DIFFERS: the file was gated on avx512-vnni, this machine runs " + cpu_kernel_path() \
        in moved.output, moved.output
    assert moved.exit_code == same.exit_code and ("accuracy gate PASS" in moved.output) == (moved.exit_code == 0)
    assert read_metadata(other).quantization_gate["cpu_kernel_path"] == "avx512-vnni"  # validate wrote nothing
    tight = min(row[1] for row in record["rows"]) * (1 - 1e-6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(quantize.PPL_TOLERANCE, "int8", tight)
        failed = CliRunner().invoke(main, validate[:1] + [str(other)] + validate[1:])
    assert failed.exit_code == 1 and "accuracy gate failed" in failed.output, failed.output
