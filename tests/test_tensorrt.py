"""TensorRT: engines built on CPU with TensorRT-RTX, the AlibiAttention plugin called directly, builder errors.

CPU (CI): TensorRT-RTX builds engines without a GPU, so real engines are built here from the shipped model.
No engine is executed (TensorRT-RTX engines need an RTX-class GPU; Python plugins need the full TensorRT).
The plugin's methods are called directly with TensorRT-RTX's classes; on a CUDA machine with triton, its
``enqueue`` runs the fused kernel on PyTorch tensors and is compared with a float64 reference.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from alibi_export import alibi_slopes, load
from alibi_export.alibi import alibi_bias
from alibi_export.errors import EngineBuildError
from alibi_export.export.onnx import export_onnx

TRAIN_LEN = 256
PROFILE = dict(min_len=1, opt_len=TRAIN_LEN, max_len=16 * TRAIN_LEN)  # up to 16x the training length
H, D = 8, 32  # the shipped model's heads and head dim


@pytest.fixture(scope="module")
def trt():
    pytest.importorskip("tensorrt_rtx_libs", reason="needs TensorRT-RTX: pip install 'alibi-export[trt-rtx]'")
    return pytest.importorskip("tensorrt_rtx_bindings")


@pytest.fixture(scope="module")
def onnx_attention_exports(tmp_path_factory, shipped):
    """The shipped model with attention as the standard ONNX Attention op, fp32 and fp16."""
    d = tmp_path_factory.mktemp("onnx-attention")
    return {dt: export_onnx(shipped, d / f"alibi-small-{dt}.onnx", attention="onnx", dtype=dt).path
            for dt in ("float32", "float16")}


# ---------------------------------------------------------------- the onnx attention form (ONNX Runtime)
def test_onnx_attention_form_matches_pytorch_in_onnxruntime(shipped, onnx_attention_exports, seed):
    from alibi_export.runtime.pytorch import TorchRunner
    from alibi_export.validate import compare

    path = onnx_attention_exports["float32"]
    proto = onnx.load(path)
    assert sum(n.op_type == "Attention" for n in proto.graph.node) == 4  # one per block
    assert {o.version for o in proto.opset_import if o.domain == ""} == {23}
    for node in (n for n in proto.graph.node if n.op_type == "Attention"):  # causal, no (L, L) mask input
        assert len(node.input) == 3 and {a.name: a.i for a in node.attribute}["is_causal"] == 1
    result = compare(path, TorchRunner(shipped.model), [1, 77, TRAIN_LEN, 16 * TRAIN_LEN], seed=seed)
    assert result, [(r.length, r.max_abs) for r in result.lengths]
    # The folded m*j puts an ulp of 5e-4 into the fp32 scores at 4096 (max |dlogit| 5e-4..1.2e-3): a near-tie
    # among the 4096 positions flips its argmax in about 1 of 25 random draws (measured on CPU, before and
    # after the one-unit block), as in the CUDA test of this form.
    assert all(r.argmax_agreement > 0.999 for r in result.lengths), result.lengths
    assert all(r.max_abs < 2e-3 for r in result.lengths), result.lengths


def test_onnx_attention_form_needs_opset_23(shipped, tmp_path):
    with pytest.raises(Exception, match="opset 23"):
        export_onnx(shipped, tmp_path / "x.onnx", attention="onnx", opset=18)


# ---------------------------------------------------------------- engines built on CPU (TensorRT-RTX)
@pytest.mark.parametrize("dtype,precision", [("float32", "fp32"), ("float16", "fp16")])
def test_tensorrt_rtx_engine_builds_with_native_attention(trt, onnx_attention_exports, tmp_path, capsys, caplog,
                                                         dtype, precision):
    from alibi_export._io import sha256_file
    from alibi_export.artifacts import read_sidecar
    from alibi_export.runtime.tensorrt import build_engine

    side_of = read_sidecar
    src = onnx_attention_exports[dtype]
    if precision == "fp16":  # built beside its ONNX file (fp32: built in another folder)
        src = Path(shutil.copyfile(src, tmp_path / src.name))
    engine = tmp_path / f"alibi-small-{precision}.engine"
    cache = tmp_path / "timing.cache"
    r = build_engine(src, engine, **PROFILE, batch=(1, 1, 2), timing_cache=cache, backend="tensorrt-rtx")
    with capsys.disabled():  # shown in CI's output whatever pytest's capture mode
        print(f"\n[TensorRT-RTX {r.backend_version}] {precision} engine ({engine.stat().st_size / 1e6:.1f} MB) "
              f"built in {r.build_seconds:.2f}s; parsed network layer types: "
              + ", ".join(f"{k} {v}" for k, v in r.layer_types.items()))
    assert engine.stat().st_size > 1_000_000
    assert not cache.exists() and side_of(engine).timing_cache is None  # a no-op in TensorRT-RTX
    assert r.layer_types["ATTENTION_OUTPUT"] == 4 and r.layer_types["MATRIX_MULTIPLY"] > 0
    side = read_sidecar(engine)
    assert side == r.sidecar and r.sidecar_path.name == engine.name + ".json"
    assert json.loads(r.sidecar_path.read_text())["engine_sha256"] == sha256_file(engine) == side.engine_sha256
    assert side.backend == "tensorrt-rtx" and side.backend_version == trt.__version__
    assert side.precision == precision and side.strongly_typed is True
    assert side.attention == "native attention" and side.plugin is None
    assert side.profile == {"input": "input_ids", "min": [1, 1], "opt": [1, TRAIN_LEN], "max": [2, 4096]}
    assert side.onnx_sha256 == sha256_file(src) and side.train_len == TRAIN_LEN
    assert side.onnx == src.name  # a plain name, looked for beside the engine (the README's promise)
    assert ("copy it there" in caplog.text) == (src.parent != engine.parent)  # built elsewhere: the build says so


def test_cli_trt_prints_layer_types_and_sidecar(trt, onnx_attention_exports, tmp_path):
    from click.testing import CliRunner

    from alibi_export.cli import main

    out = tmp_path / "m.engine"
    result = CliRunner().invoke(main, ["trt", str(onnx_attention_exports["float16"]), "-o", str(out),
                                       "--min-len", "1", "--opt-len", "256", "--max-len", "4096",
                                       "--backend", "tensorrt-rtx"])
    assert result.exit_code == 0, result.output
    assert "ATTENTION_OUTPUT 4" in result.output and f"sidecar: {out}.json" in result.output


def test_default_export_is_refused_by_tensorrt_rtx_with_a_hint(trt, shipped_onnx, tmp_path):
    """TensorRT-RTX 1.7 parses the decomposed export but its builder fails an internal assertion on the
    attention Loop; the error is one line that names the form that builds."""
    from alibi_export.runtime.tensorrt import build_engine

    with pytest.raises(EngineBuildError, match="--attention onnx") as e:
        build_engine(shipped_onnx, tmp_path / "x.engine", **PROFILE, backend="tensorrt-rtx")
    assert "\n" not in str(e.value) and not (tmp_path / "x.engine").exists()


def test_tensorrt_rtx_builds_no_onnx_loop_at_all(trt):
    """Why the default export cannot become a TensorRT-RTX 1.7 engine: its builder fails on any ONNX
    Loop, here a 7-node one that doubles the rows of its input. When this starts to pass, TensorRT-RTX
    has fixed it and the default (memory-linear) export should be tried again."""
    from onnx import TensorProto as T
    from onnx import helper as h

    body = h.make_graph(
        [h.make_node("Unsqueeze", ["i", "ax0"], ["i1"]), h.make_node("Add", ["i1", "one"], ["i2"]),
         h.make_node("Slice", ["x", "i1", "i2", "ax0"], ["row"]), h.make_node("Mul", ["row", "two"], ["y"]),
         h.make_node("Identity", ["c"], ["c_out"])], "body",
        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("c", T.BOOL, [])],
        [h.make_tensor_value_info("c_out", T.BOOL, []), h.make_tensor_value_info("y", T.FLOAT, None)])
    graph = h.make_graph(
        [h.make_node("Shape", ["x"], ["s"]), h.make_node("Gather", ["s", "zero"], ["n"], axis=0),
         h.make_node("Loop", ["n", "true"], ["ys"], body=body)], "loop",
        [h.make_tensor_value_info("x", T.FLOAT, ["L", 4])], [h.make_tensor_value_info("ys", T.FLOAT, None)],
        initializer=[h.make_tensor("zero", T.INT64, [], [0]), h.make_tensor("ax0", T.INT64, [1], [0]),
                     h.make_tensor("one", T.INT64, [1], [1]), h.make_tensor("two", T.FLOAT, [], [2.0]),
                     h.make_tensor("true", T.BOOL, [], [True])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=8)
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString())  # parsing works; building does not
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 4), (8, 4), (64, 4))
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is None


def test_engine_runner_is_polygraphys_trt_runner(trt, onnx_attention_exports, tmp_path):
    """make_runner gives Polygraphy's TrtRunner for an engine (executing it needs a supported GPU)."""
    from alibi_export.runtime import make_runner
    from alibi_export.runtime.tensorrt import build_engine

    engine = tmp_path / "r.engine"
    build_engine(onnx_attention_exports["float16"], engine, min_len=1, opt_len=16, max_len=64)
    runner = make_runner(engine)  # selects Polygraphy's TensorRT-RTX backend before it is first imported
    from polygraphy.backend.trt import TrtRunner

    assert isinstance(runner, TrtRunner)


def test_build_phases_reach_the_progress_monitor_on_a_terminal(trt, onnx_attention_exports, tmp_path, monkeypatch):
    """On a terminal TensorRT's build phases become bars (one per phase, stepped, then closed); in a pipe
    (here: pytest's capture) no monitor is set at all."""
    import alibi_export.runtime.tensorrt.builder as builder

    class Bar:  # records what a tqdm bar would show
        def __init__(self, *, desc, total, unit, position):
            self.desc, self.total, self.n, self.closed = desc, total, 0, False
            opened.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True

    opened = []
    monkeypatch.setattr(builder, "progress", Bar)
    monkeypatch.setattr(builder, "on_terminal", lambda: True)
    builder.build_engine(onnx_attention_exports["float16"], tmp_path / "p.engine", min_len=1, opt_len=16,
                         max_len=64, backend="tensorrt-rtx")
    shown = [(bar.desc, bar.n, bar.total, bar.closed) for bar in opened]
    assert shown, "TensorRT reported no build phase"
    assert all(closed and 0 < n <= total for _, n, total, closed in shown if total), shown
    monkeypatch.setattr(builder, "on_terminal", lambda: False)
    opened.clear()
    builder.build_engine(onnx_attention_exports["float16"], tmp_path / "q.engine", min_len=1, opt_len=16,
                         max_len=64, backend="tensorrt-rtx")
    assert opened == []


# ---------------------------------------------------------------- builder errors
def test_profile_errors_are_one_line(tmp_path):
    from alibi_export.runtime.tensorrt import build_engine

    with pytest.raises(EngineBuildError, match="min > opt"):
        build_engine(tmp_path / "any.onnx", tmp_path / "x.engine", min_len=8, opt_len=4, max_len=16)
    with pytest.raises(EngineBuildError, match="opt > max"):
        build_engine(tmp_path / "any.onnx", tmp_path / "x.engine", min_len=1, opt_len=32, max_len=16)
    with pytest.raises(EngineBuildError, match="batch profile"):
        build_engine(tmp_path / "any.onnx", tmp_path / "x.engine", min_len=1, opt_len=2, max_len=4,
                     batch=(2, 1, 4))


def test_onnx_without_alibi_is_refused(tmp_path):
    from alibi_export.runtime.tensorrt import build_engine

    x = onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", "s"])
    y = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.INT64, ["b", "s"])
    model = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Identity", ["input_ids"],
                                                                                 ["logits"])], "g", [x], [y]))
    from alibi_export.artifacts import NotOurArtifact, OnnxMetadata

    onnx.save(model, tmp_path / "plain.onnx")
    with pytest.raises(NotOurArtifact, match="not written by alibi-export"):
        build_engine(tmp_path / "plain.onnx", tmp_path / "x.engine", min_len=1, opt_len=2, max_len=4)
    meta = OnnxMetadata(version="0", position="sinusoidal", slopes=(), train_len=2, source_name="m", source_sha256="0",
                        dynamic_len=True, dtype="float32", attention="decomposed", kv_cache=False, ort_fusions=False,
                        config={}, tokenizer="{}")
    onnx.helper.set_model_props(model, meta.to_props())
    onnx.save(model, tmp_path / "plain.onnx")
    with pytest.raises(EngineBuildError, match="no ALiBi attention"):
        build_engine(tmp_path / "plain.onnx", tmp_path / "x.engine", min_len=1, opt_len=2, max_len=4)


def test_plugin_export_with_tensorrt_rtx_is_refused(trt, tiny_dir, tmp_path):
    from alibi_export.runtime.tensorrt import build_engine

    path = export_onnx(load(tiny_dir), tmp_path / "plugin.onnx", attention="plugin").path
    with pytest.raises(EngineBuildError, match="cannot run the AlibiAttention Python plugin.*--attention onnx"):
        build_engine(path, tmp_path / "x.engine", min_len=1, opt_len=8, max_len=64, backend="tensorrt-rtx")


def test_ort_fused_export_is_refused_by_tensorrt(trt, tiny_dir, tmp_path):
    from alibi_export.runtime.tensorrt import build_engine

    path = export_onnx(load(tiny_dir), tmp_path / "fused.onnx", attention="onnx", ort_fusions=True).path
    with pytest.raises(EngineBuildError, match="ONNX Runtime's fused operators.*without --ort-fusions") as e:
        build_engine(path, tmp_path / "x.engine", min_len=1, opt_len=8, max_len=64, backend="tensorrt-rtx")
    assert "\n" not in str(e.value) and not (tmp_path / "x.engine").exists()


def test_precision_the_onnx_file_does_not_have_is_refused_by_tensorrt_rtx(trt, onnx_attention_exports, tmp_path):
    from alibi_export.runtime.tensorrt import build_engine

    for precision in ("fp16", "bf16"):
        with pytest.raises(EngineBuildError, match="strongly typed"):
            build_engine(onnx_attention_exports["float32"], tmp_path / "x.engine", min_len=1, opt_len=2,
                         max_len=4, precision=precision, backend="tensorrt-rtx")


def test_missing_full_tensorrt_names_the_pip_package(onnx_attention_exports, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings")  # any engine-side import failure would otherwise mask this
    from alibi_export.errors import MissingDependencyError
    from alibi_export.runtime.tensorrt import build_engine
    from alibi_export.runtime.tensorrt._trt import trt_available

    if trt_available("tensorrt"):
        pytest.skip("the full TensorRT is installed")
    with pytest.raises(MissingDependencyError, match=r"alibi-export\[trt\]"):
        build_engine(onnx_attention_exports["float32"], tmp_path / "x.engine", min_len=1, opt_len=2, max_len=4,
                     backend="tensorrt")


# ---------------------------------------------------------------- the plugin, called directly
_KEEP: list = []


def _fields(trt, **over):
    attrs = dict(num_heads=np.array([H], np.int32), head_dim=np.array([D], np.int32),
                 slopes=np.array(alibi_slopes(H), np.float32), scale=np.array([1 / math.sqrt(D)], np.float32),
                 causal=np.array([1], np.int32))
    attrs.update(over)
    types = {np.int32: trt.PluginFieldType.INT32, np.float32: trt.PluginFieldType.FLOAT32}
    _KEEP.append(attrs)  # a PluginField holds a raw pointer: its array must outlive it
    return trt.PluginFieldCollection([trt.PluginField(k, v, types[v.dtype.type]) for k, v in attrs.items()
                                      if v is not None])


def _desc(trt, dtype, dims=(1, H, -1, D), fmt=None):
    d = trt.DynamicPluginTensorDesc()
    d.desc.type, d.desc.format, d.desc.dims = dtype, fmt or trt.TensorFormat.LINEAR, trt.Dims(dims)
    return d


@pytest.fixture(scope="module")
def plugin(trt):
    from alibi_export.runtime.tensorrt.plugin import plugin_creator

    return plugin_creator(trt).create_plugin("attn0", _fields(trt), trt.TensorRTPhase.BUILD)


def test_creator_describes_the_onnx_node(trt):
    from alibi_export.attention_contract import ATTRIBUTES, DOMAIN, OP_TYPE
    from alibi_export.runtime.tensorrt.plugin import plugin_creator

    creator = plugin_creator(trt)
    assert (creator.name, creator.plugin_namespace, creator.plugin_version) == (OP_TYPE, DOMAIN, "1")
    assert tuple(f.name for f in creator.field_names) == ATTRIBUTES


def test_plugin_parses_attributes(trt, plugin):
    assert plugin.attrs == dict(num_heads=H, head_dim=D, slopes=pytest.approx(alibi_slopes(H)),
                                scale=pytest.approx(1 / math.sqrt(D)), causal=1)
    assert (plugin.plugin_name, plugin.plugin_namespace, plugin.plugin_version) == \
        ("AlibiAttention", "alibi_export", "1")
    assert plugin.num_outputs == 1


def test_plugin_rejects_bad_attributes(trt):
    from alibi_export.runtime.tensorrt.plugin import plugin_creator

    creator = plugin_creator(trt)
    with pytest.raises(ValueError, match="slopes"):
        creator.create_plugin("x", _fields(trt, slopes=np.ones(3, np.float32)), trt.TensorRTPhase.BUILD)
    with pytest.raises(ValueError, match="head_dim"):
        creator.create_plugin("x", _fields(trt, head_dim=np.array([48], np.int32)), trt.TensorRTPhase.BUILD)
    with pytest.raises(ValueError, match="missing"):
        creator.create_plugin("x", _fields(trt, slopes=None), trt.TensorRTPhase.BUILD)


def test_plugin_serialization_round_trip(trt, plugin):
    from alibi_export.runtime.tensorrt.plugin import plugin_creator

    fields = plugin.get_fields_to_serialize()
    assert [f.name for f in fields] == ["num_heads", "head_dim", "slopes", "scale", "causal"]
    import gc

    gc.collect()  # the fields' arrays must live in the plugin, not in a temporary
    again = plugin_creator(trt).create_plugin("attn0", fields, trt.TensorRTPhase.RUNTIME)
    assert again.attrs == plugin.attrs and again is not plugin


def test_plugin_format_support(trt, plugin):
    dt = trt.DataType
    for t in (dt.FLOAT, dt.HALF, dt.BF16):
        io = [_desc(trt, t) for _ in range(4)]
        assert all(plugin.supports_format_combination(pos, io, 3) for pos in range(4)), t
    for t in (dt.INT8, dt.INT32, dt.BOOL):
        assert not plugin.supports_format_combination(0, [_desc(trt, t)] * 4, 3), t
    mixed = [_desc(trt, dt.HALF), _desc(trt, dt.FLOAT), _desc(trt, dt.HALF), _desc(trt, dt.HALF)]
    assert plugin.supports_format_combination(0, mixed, 3) and not plugin.supports_format_combination(1, mixed, 3)
    vectorized = [_desc(trt, dt.HALF, fmt=trt.TensorFormat.HWC8)] * 4
    assert not plugin.supports_format_combination(0, vectorized, 3)


def test_plugin_output_types_clone_and_shapes(trt, plugin):
    dt = trt.DataType
    for t in (dt.FLOAT, dt.HALF, dt.BF16):
        assert plugin.get_output_data_types([t, t, t]) == [t]
    twin = plugin.clone()
    assert twin is not plugin and twin.attrs == plugin.attrs
    assert plugin.attach_to_context(None).attrs == plugin.attrs
    assert plugin.get_workspace_size([], []) == 0
    io = [_desc(trt, dt.HALF, (2, H, -1, D)) for _ in range(4)]
    plugin.configure_plugin(io[:3], io[3:])
    with pytest.raises(ValueError, match="expected q"):
        plugin.configure_plugin([_desc(trt, dt.HALF, (2, H, -1, 64))] * 3, io[3:])
    with pytest.raises(ValueError, match="multiple"):
        plugin.on_shape_change([_desc(trt, dt.HALF, (1, H, 5, D)).desc, _desc(trt, dt.HALF, (1, 3, 5, D)).desc],
                               [])


def test_register_plugin_puts_it_in_the_registry(trt):
    from alibi_export.runtime.tensorrt import register_plugin

    creator = register_plugin(trt)
    assert register_plugin(trt) is creator  # once per process
    assert trt.get_plugin_registry().get_creator("AlibiAttention", "1", "alibi_export") is not None


# ---------------------------------------------------------------- the plugin's enqueue on a GPU
@pytest.fixture(scope="module")
def cuda_plugin(trt, plugin):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (NVIDIA) for the Triton kernel")
    return plugin


def _reference(q, k, v, past_len):
    """float64 softmax(q k^T / sqrt(D) + alibi_bias) v."""
    slopes = torch.tensor(alibi_slopes(H), dtype=torch.float64, device=q.device)
    bias = alibi_bias(slopes, q.shape[2], k.shape[2], past_len=past_len, dtype=torch.float64)
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(D) + bias[None]
    return torch.softmax(s, -1) @ v.double()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (100, 100), (1000, 1000), (4096, 4096), (1, 4096),
                                          (100, 1000)])
def test_plugin_enqueue_matches_reference(trt, cuda_plugin, dtype, q_len, kv_len):
    """enqueue() with TensorRT-style descriptors and raw pointers on a non-default CUDA stream."""
    torch.manual_seed(q_len + kv_len)
    B = 2
    q = torch.randn(B, H, q_len, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(B, H, kv_len, D, device="cuda", dtype=dtype) for _ in range(2))
    out = torch.full_like(q, float("nan"))
    trt_dtype = {torch.float16: trt.DataType.HALF, torch.bfloat16: trt.DataType.BF16}[dtype]

    def desc(t):
        d = trt.PluginTensorDesc()
        d.type, d.format, d.dims = trt_dtype, trt.TensorFormat.LINEAR, trt.Dims(tuple(t.shape))
        return d

    runtime = cuda_plugin.attach_to_context(None)
    runtime.on_shape_change([desc(q), desc(k), desc(v)], [desc(out)])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    runtime.enqueue([desc(q), desc(k), desc(v)], [desc(out)], [q.data_ptr(), k.data_ptr(), v.data_ptr()],
                    [out.data_ptr()], 0, stream.cuda_stream)
    stream.synchronize()
    assert torch.isfinite(out).all(), "output not fully written (NaN poison left)"
    ref = _reference(q, k, v, past_len=kv_len - q_len)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    print(f"ENQUEUE rel err {err:.2e} {str(dtype)[6:]} Lq={q_len} Lk={kv_len} past={kv_len - q_len}")
    assert err <= tol, f"rel err {err:.2e} > {tol:.0e}"
