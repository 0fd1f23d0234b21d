"""Export -> ONNX Runtime: parity with PyTorch, the graph's contents, metadata, forms."""
import json

import numpy as np
import onnx
import pytest
import torch

from alibi_export import alibi_slopes, load
from alibi_export.errors import ExportError
from alibi_export.attention_contract import DOMAIN, OP_TYPE
from alibi_export.export.onnx import export_onnx
from alibi_export.runtime.onnxruntime import create_session
from alibi_export.runtime.pytorch import TorchRunner
from alibi_export.validate import TOLERANCES, compare

TRAIN_LEN = 256


def test_fp32_parity_far_beyond_training_length(shipped, shipped_onnx):
    # 1 token, the training length (whole-score path), then 4x+3 and 10x (query-chunk Loop path).
    lengths = [1, 77, TRAIN_LEN, 4 * TRAIN_LEN + 3, 10 * TRAIN_LEN]
    result = compare(shipped_onnx, TorchRunner(shipped.model), lengths, batch=1)
    worst = max(r.max_abs for r in result.lengths)
    assert result, f"max abs error {worst}"
    assert worst < 1e-3  # float32 through 4 layers: observed ~2e-5
    assert all(r.argmax_agreement == 1.0 for r in result.lengths)


def test_fp32_parity_batched(shipped, shipped_onnx):
    result = compare(shipped_onnx, TorchRunner(shipped.model), [300], batch=3)
    assert result and result.lengths[0].argmax_agreement == 1.0


def test_fp16_parity_at_8x_training_length(shipped, shipped_onnx_fp16):
    """fp16 I/O and weights; the ALiBi term (up to m*L = 1024 at 8x) stays in float32 inside attention.

    Tolerance: |logits| reach ~20, where one fp16 ulp is 0.0156; TOLERANCES allows ~5 ulps absolute.
    A bias computed in fp16 would be off by whole units at these positions and fail by far."""
    lengths = [16, TRAIN_LEN, 8 * TRAIN_LEN]
    result = compare(shipped_onnx_fp16, TorchRunner(shipped.model), lengths)
    assert result, result
    assert TOLERANCES["float16"]["atol"] <= 0.08
    assert all(r.argmax_agreement > 0.99 for r in result.lengths)
    session = create_session(shipped_onnx_fp16)
    assert session.get_outputs()[0].type == "tensor(float16)"


def _constants(graph: onnx.GraphProto):
    """Every initializer and Constant tensor in the graph and its subgraphs (Loop bodies)."""
    for init in graph.initializer:
        yield init.name, onnx.numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield node.output[0], onnx.numpy_helper.to_array(attr.t)
                elif attr.type == onnx.AttributeProto.FLOATS:
                    yield node.output[0], np.array(attr.floats)
                elif attr.type == onnx.AttributeProto.INTS:
                    yield node.output[0], np.array(attr.ints)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _constants(attr.g)


def assert_no_length_constants(model: onnx.ModelProto, torch_model: torch.nn.Module, slopes: np.ndarray) -> None:
    """No constant in ``model`` but the weights of ``torch_model``, the H ``slopes`` and a few small
    ints: nothing sized by, or filled from, a maximum length. Inputs are dynamic (batch, sequence)."""
    weights = {}
    for p in torch_model.state_dict().values():
        p = p.detach().float().numpy()
        for w in (p, p.T):  # the exporter may store a transposed weight
            weights.setdefault(w.shape, []).append(w)
    n_slopes = 0
    for name, value in _constants(model.graph):
        if value.size > 8 and any(np.array_equal(value.astype(np.float32), w) for w in weights.get(value.shape, [])):
            continue  # a learned weight: its shape is set by d_model, d_ff, vocab, never by a length
        assert value.size <= 8, f"{name} has {value.size} elements {value.shape}: not a weight, not small"
        if value.dtype == np.float32 and value.size == len(slopes) and np.allclose(value.ravel(), slopes):
            n_slopes += 1
    assert n_slopes >= 1, "the H slopes must be in the graph"
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs == {"input_ids": ["batch", "sequence"]}


def test_no_tensor_depends_on_a_maximum_length(shipped, shipped_onnx):
    assert_no_length_constants(onnx.load(shipped_onnx), shipped.model,
                               np.array(alibi_slopes(shipped.config.n_head), dtype=np.float32))


def test_model_metadata_and_versions(shipped, shipped_onnx):
    model = onnx.load(shipped_onnx)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["alibi_export.position"] == "alibi"
    assert json.loads(meta["alibi_export.slopes"]) == pytest.approx(alibi_slopes(8))
    assert meta["alibi_export.train_len"] == "256"
    assert meta["alibi_export.source_sha256"] == shipped.sha256
    assert meta["alibi_export.version"]
    assert model.ir_version <= 13
    assert {o.domain for o in model.opset_import} == {""}
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("opset", [17, 21])
def test_opsets(tiny_dir, tmp_path, opset):
    ck = load(tiny_dir)
    res = export_onnx(ck, tmp_path / "m.onnx", opset=opset)
    model = onnx.load(res.path)
    assert [o.version for o in model.opset_import if o.domain == ""] == [opset]
    assert compare(res.path, TorchRunner(ck.model), [5, 100])


@pytest.mark.parametrize("opset", [11, 16, 99])
def test_unsupported_opset(tiny_dir, tmp_path, opset):
    with pytest.raises(ExportError, match="unsupported opset"):
        export_onnx(load(tiny_dir), tmp_path / "m.onnx", opset=opset)
    assert not list(tmp_path.iterdir())


def test_fixed_length_export(tiny_dir, tmp_path):
    ck = load(tiny_dir)
    res = export_onnx(ck, tmp_path / "fixed.onnx", dynamic_len=False, batch=2, seq_len=48)
    session = create_session(res.path)
    assert session.get_inputs()[0].shape == [2, 48]
    ids = np.random.default_rng().integers(0, 300, (2, 48))
    got = session.run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        want = ck.model(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_plugin_form_matches_default_export(shipped, shipped_onnx, tmp_path):
    """One AlibiAttention node per block with a local function body: ONNX Runtime runs the same file."""
    res = export_onnx(shipped, tmp_path / "plugin.onnx", attention="plugin")
    model = onnx.load(res.path)
    nodes = [n for n in model.graph.node if n.op_type == OP_TYPE]
    assert len(nodes) == shipped.config.n_layer and all(n.domain == DOMAIN for n in nodes)
    attrs = {a.name for a in nodes[0].attribute}
    assert {"num_heads", "head_dim", "slopes", "scale", "causal"} <= attrs
    assert [f.name for f in model.functions] == [OP_TYPE]
    ids = np.random.default_rng().integers(0, shipped.config.vocab_size, (1, 700))
    plugin = create_session(res.path).run(None, {"input_ids": ids})[0]
    default = create_session(shipped_onnx).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(plugin, default, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["sinusoidal", "rotary", "t5"])
def test_other_position_methods_export(tiny_tokenizer, tmp_path, position):
    from tests.conftest import make_tiny

    ck = load(make_tiny(tmp_path / "ck", tiny_tokenizer, position=position))
    res = export_onnx(ck, tmp_path / "m.onnx")
    assert compare(res.path, TorchRunner(ck.model), [7, 64])


def test_large_models_use_external_data(tiny_dir, tmp_path, monkeypatch):
    """Past protobuf's 2 GB limit the weights go to a side file; exercised here by lowering the limit."""
    import alibi_export.export.onnx as exp

    monkeypatch.setattr(exp, "_TWO_GB", 64 << 20)  # every model is "large" now
    ck = load(tiny_dir)
    res = export_onnx(ck, tmp_path / "big.onnx")
    (data,) = tmp_path.glob("big.onnx.*.data")  # one data file beside it, named after its content
    assert (tmp_path / "big.onnx").stat().st_size < data.stat().st_size
    locations = {e.value for t in onnx.load(res.path, load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {data.name}  # relative to the .onnx
    assert compare(res.path, TorchRunner(ck.model), [9])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("alibi", [True, False])
@pytest.mark.parametrize("lq,lk", [(5, 9), (40, 40), (33, 70)])  # whole and chunked paths, with past keys
def test_attention_function_bodies(tmp_path, causal, alibi, lq, lk):
    """Every specialization of the function body, in ONNX Runtime, against softmax(qk/sqrt(d) + alibi_bias)v."""
    from onnx import TensorProto, helper

    from alibi_export import alibi_bias
    from alibi_export.export.attention_function import attention_function

    H, D = 4, 8
    slopes = alibi_slopes(H) if alibi else [0.0] * H
    node = helper.make_node(OP_TYPE, ["q", "k", "v"], ["out"], domain=DOMAIN, num_heads=H, head_dim=D,
                            slopes=slopes, scale=D ** -0.5, causal=int(causal))
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("q", "k", "v", "out")]
    graph = helper.make_graph([node], "g", io[:3], io[3:])
    # whole_len 6: 5x9 runs whole, the others take the chunked Loop with 16-query chunks
    fn = attention_function(18, q_chunk=16, whole_len=6, causal=causal, alibi=alibi)
    proto = helper.make_model(graph, functions=[fn], ir_version=8,
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    path = tmp_path / "attn.onnx"
    onnx.save(proto, path)
    sess = create_session(path)
    rng = np.random.default_rng()
    q, k, v = (rng.standard_normal((2, H, n, D), dtype=np.float32) for n in (lq, lk, lk))
    got = sess.run(None, {"q": q, "k": k, "v": v})[0]
    bias = alibi_bias(torch.tensor(slopes), lq, lk, past_len=lk - lq, causal=causal).numpy()
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D) + bias
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = (probs / probs.sum(-1, keepdims=True)) @ v
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)  # fp32 on both sides


def test_tolerance_follows_dtype_and_attention_form():
    from types import SimpleNamespace as Meta

    from alibi_export.validate import tolerance_of

    assert tolerance_of(Meta(dtype="float32", attention="decomposed")) == TOLERANCES["float32"]
    assert tolerance_of(Meta(dtype="float16", attention="onnx")) == TOLERANCES["float16"]
    assert tolerance_of(Meta(dtype="float32", attention="onnx")) == TOLERANCES["float32-folded"]
