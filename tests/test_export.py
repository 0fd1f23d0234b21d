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


def test_fp32_parity_far_beyond_training_length(shipped, shipped_onnx, seed):
    # 1 token, the training length (whole-score path), then 4x+3 and 10x (query-chunk Loop path).
    lengths = [1, 77, TRAIN_LEN, 4 * TRAIN_LEN + 3, 10 * TRAIN_LEN]
    result = compare(shipped_onnx, TorchRunner(shipped.model), lengths, batch=1, seed=seed)
    worst = max(r.max_abs for r in result.lengths)
    assert result, f"max abs error {worst}"
    assert worst < 1e-3  # float32 through 4 layers: observed ~2e-5
    assert all(r.argmax_agreement == 1.0 for r in result.lengths)


def test_fp32_parity_batched(shipped, shipped_onnx, seed):
    result = compare(shipped_onnx, TorchRunner(shipped.model), [300], batch=3, seed=seed)
    assert result and result.lengths[0].argmax_agreement == 1.0


# fp16 counts integers exactly only up to 2048: the long length goes past it (9x the training length), where
# a bias built from fp16 positions is off by whole units and a float32 one is not.
FP16_LENGTHS = [16, TRAIN_LEN, 9 * TRAIN_LEN]


def _fp16_long_length_check(onnx_path, model, seed):
    """fp16 I/O and weights against the float32 PyTorch model at 1/16x, 1x and 9x the training length.

    Tolerance: |logits| reach ~20, where one fp16 ulp is 0.0156; TOLERANCES allows ~5 ulps absolute
    (observed 0.016). Returns the result and whether it passes, argmax agreement included."""
    result = compare(onnx_path, TorchRunner(model), FP16_LENGTHS, seed=seed)
    return result, bool(result) and all(r.argmax_agreement > 0.99 for r in result.lengths)


def test_fp16_parity_past_fp16_exact_positions(shipped, shipped_onnx_fp16, seed):
    """The ALiBi term (up to m*L = 1152 at 9x) and softmax stay in float32 inside attention."""
    result, passed = _fp16_long_length_check(shipped_onnx_fp16, shipped.model, seed)
    assert passed, result
    assert TOLERANCES["float16"]["atol"] <= 0.08
    session = create_session(shipped_onnx_fp16)
    assert session.get_outputs()[0].type == "tensor(float16)"


def _fp16_bias_block(real_block):
    """_attend_block with the bias computed in fp16 arithmetic, as a bias built in the I/O dtype would be:
    the positions, j - i and m*(j - i) each rounded to fp16 (each rounding of an exact float32 result
    is what the fp16 operation gives)."""
    from onnx import TensorProto, helper

    def block(p, *args, **kwargs):
        nodes = []
        for node in real_block(p, *args, **kwargs):
            name = node.output[0]
            if name in {p + "q_pos", p + "k_row", p + "rel", p + "bias"}:
                node.output[0] = name + "_f32"
                nodes += [node, helper.make_node("Cast", [name + "_f32"], [name + "_f16"], to=TensorProto.FLOAT16),
                          helper.make_node("Cast", [name + "_f16"], [name], to=TensorProto.FLOAT)]
            else:
                nodes.append(node)
        return nodes

    return block


def test_fp16_check_rejects_a_bias_computed_in_fp16(shipped, tmp_path, monkeypatch, seed):
    """Negative control for the check above: the same export with its bias in fp16 must fail it.

    (A bias computed in float32 and only stored in fp16 would pass: with 8 heads the slopes are powers of
    two, so m*(j - i) is exact in fp16 for |j - i| <= 2048. The positions are what fp16 loses.)"""
    import alibi_export.export.attention_function as attention_function

    monkeypatch.setattr(attention_function, "_attend_block", _fp16_bias_block(attention_function._attend_block))
    broken = export_onnx(shipped, tmp_path / "bias16.onnx", dtype="float16").path
    result, passed = _fp16_long_length_check(broken, shipped.model, seed)
    assert not passed, result
    assert result.lengths[-1].max_abs > 1.0  # off by far, not at the tolerance's edge (observed ~12)
    assert all(r.passed for r in result.lengths[:-1]), result  # only a length past 2048 can tell them apart


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


def _weights_by_shape(model: torch.nn.Module) -> dict[tuple, list[np.ndarray]]:
    """The model's weights and their transposes (the exporter folds a Transpose into a new initializer)."""
    by_shape: dict[tuple, list[np.ndarray]] = {}
    for tensor in model.state_dict().values():
        value = tensor.detach().float().numpy()
        for candidate in (value, value.T) if value.ndim == 2 else (value,):
            by_shape.setdefault(candidate.shape, []).append(candidate)
    return by_shape


def _length_sized_constants(proto: onnx.ModelProto, model: torch.nn.Module) -> list[str]:
    """Every constant in ``proto`` (Loop bodies included) that is neither one of ``model``'s weights nor tiny.

    A weight is recognized by what it holds, not by its shape: the shipped config has max_positions ==
    d_model == 256, so a baked (256, 256) mask has the shape of a projection and a shape test lets it
    through. A constant is exempt only when it equals a state-dict tensor (or its transpose) at the
    export's dtype."""
    weights = _weights_by_shape(model)
    offenders = []
    for name, value in _constants(proto.graph):
        if value.size <= 8:  # scalars, axes, shapes, the H slopes
            continue
        if any(np.array_equal(value, w.astype(value.dtype)) for w in weights.get(value.shape, [])):
            continue
        offenders.append(f"{name} {value.dtype} {value.shape}")
    return offenders


def assert_no_length_constants(model: onnx.ModelProto, torch_model: torch.nn.Module, slopes: np.ndarray) -> None:
    """No constant in ``model`` but the weights of ``torch_model``, the H ``slopes`` and a few small
    ints: nothing sized by, or filled from, a maximum length. Inputs are dynamic (batch, sequence)."""
    assert _length_sized_constants(model, torch_model) == []
    slopes = np.asarray(slopes, dtype=np.float32).ravel()
    n_slopes = sum(value.dtype == np.float32 and value.size == slopes.size and np.allclose(value.ravel(), slopes)
                   for _, value in _constants(model.graph))
    assert n_slopes >= 1, "the H slopes must be in the graph"
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs == {"input_ids": ["batch", "sequence"]}


def _bake_initializer(proto, value):
    proto.graph.initializer.append(onnx.numpy_helper.from_array(value, "baked_max_len"))


def _bake_in_loop_body(proto, value):
    loop = next(n for n in _all_nodes(proto.graph) if n.op_type == "Loop")
    body = next(a.g for a in loop.attribute if a.type == onnx.AttributeProto.GRAPH)
    body.node.insert(0, onnx.helper.make_node("Constant", [], ["baked_max_len"],
                                              value=onnx.numpy_helper.from_array(value, "baked_max_len")))


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)


@pytest.mark.parametrize("where", [_bake_initializer, _bake_in_loop_body], ids=["initializer", "loop-body"])
@pytest.mark.parametrize("kind", ["causal-mask-LxL", "bias-Hx1xL"])
def test_constants_check_catches_a_baked_maximum_length(shipped, shipped_onnx, where, kind):
    """Negative control: the shipped graph with a (L, L) mask or an (H, 1, L) bias baked in at L = max_positions."""
    cfg, length = shipped.config, shipped.config.max_positions
    if kind == "causal-mask-LxL":
        assert (length, length) in _weights_by_shape(shipped.model)  # the shape alone would pass for a weight
        value = np.triu(np.full((length, length), -np.inf, np.float32), 1)
    else:
        slopes = np.array(alibi_slopes(cfg.n_head), np.float32)
        value = (slopes[:, None, None] * -np.arange(length, dtype=np.float32)[::-1]).astype(np.float32)
    proto = onnx.load(shipped_onnx)
    where(proto, value)
    assert _length_sized_constants(proto, shipped.model) == [f"baked_max_len float32 {value.shape}"]


def _expected_metadata(ckpt, *, dtype: str, attention: str = "decomposed", dynamic_len: bool = True) -> dict:
    """Every field an export of ``ckpt`` must record, decoded from its string form.

    The one place the tests spell the metadata keys: when the format's owner (artifacts.py) renames
    them or adds fields, this function changes and the tests below stay."""
    from alibi_export import __version__

    return {
        "alibi_export.version": __version__,
        "alibi_export.position": ckpt.config.position,
        "alibi_export.slopes": pytest.approx(alibi_slopes(ckpt.config.n_head), rel=1e-7),
        "alibi_export.train_len": ckpt.config.train_len,
        "alibi_export.source_sha256": ckpt.sha256,
        "alibi_export.source_name": ckpt.path.resolve().name,  # the folder's name: no local path in the file
        "alibi_export.dynamic_len": dynamic_len,
        "alibi_export.dtype": dtype,
        "alibi_export.attention": attention,
        "alibi_export.kv_cache": False,
        "alibi_export.ort_fusions": False,
        "alibi_export.config": ckpt.config.to_dict(),
        "alibi_export.tokenizer": json.loads(ckpt.tokenizer.to_str()),
    }


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_model_metadata_field_by_field(request, shipped, dtype):
    proto = onnx.load(request.getfixturevalue("shipped_onnx" if dtype == "float32" else "shipped_onnx_fp16"))
    got, want = {p.key: p.value for p in proto.metadata_props}, _expected_metadata(shipped, dtype=dtype)
    assert sorted(got) == sorted(want)
    for key, value in want.items():  # a string field as written; numbers, flags, lists and objects as JSON
        assert (got[key] if isinstance(value, str) else json.loads(got[key])) == value, key


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_no_tensor_depends_on_a_maximum_length(request, shipped, dtype):
    model = onnx.load(request.getfixturevalue("shipped_onnx" if dtype == "float32" else "shipped_onnx_fp16"))
    assert_no_length_constants(model, shipped.model, np.array(alibi_slopes(shipped.config.n_head), np.float32))


def test_model_versions(shipped_onnx):
    model = onnx.load(shipped_onnx)
    assert model.ir_version <= 13
    assert {o.domain for o in model.opset_import} == {""}
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("opset", [17, 21])
def test_opsets(tiny_dir, tmp_path, opset, seed):
    ck = load(tiny_dir)
    res = export_onnx(ck, tmp_path / "m.onnx", opset=opset)
    model = onnx.load(res.path)
    assert [o.version for o in model.opset_import if o.domain == ""] == [opset]
    assert compare(res.path, TorchRunner(ck.model), [5, 100], seed=seed)


@pytest.mark.parametrize("opset", [11, 16, 99])
def test_unsupported_opset(tiny_dir, tmp_path, opset):
    with pytest.raises(ExportError, match="unsupported opset"):
        export_onnx(load(tiny_dir), tmp_path / "m.onnx", opset=opset)
    assert not list(tmp_path.iterdir())


def test_fixed_length_export(tiny_dir, tmp_path, rng):
    ck = load(tiny_dir)
    res = export_onnx(ck, tmp_path / "fixed.onnx", dynamic_len=False, batch=2, seq_len=48)
    session = create_session(res.path)
    assert session.get_inputs()[0].shape == [2, 48]
    ids = rng.integers(0, 300, (2, 48))
    got = session.run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        want = ck.model(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_plugin_form_matches_default_export(shipped, shipped_onnx, tmp_path, rng):
    """One AlibiAttention node per block with a local function body: ONNX Runtime runs the same file."""
    res = export_onnx(shipped, tmp_path / "plugin.onnx", attention="plugin")
    model = onnx.load(res.path)
    nodes = [n for n in model.graph.node if n.op_type == OP_TYPE]
    assert len(nodes) == shipped.config.n_layer and all(n.domain == DOMAIN for n in nodes)
    attrs = {a.name for a in nodes[0].attribute}
    assert {"num_heads", "head_dim", "slopes", "scale", "causal"} <= attrs
    assert [f.name for f in model.functions] == [OP_TYPE]
    ids = rng.integers(0, shipped.config.vocab_size, (1, 700))
    plugin = create_session(res.path).run(None, {"input_ids": ids})[0]
    default = create_session(shipped_onnx).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(plugin, default, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["sinusoidal", "rotary", "t5"])
def test_other_position_methods_export(tiny_tokenizer, tmp_path, position, seed):
    from tests.conftest import make_tiny

    ck = load(make_tiny(tmp_path / "ck", tiny_tokenizer, position=position))
    res = export_onnx(ck, tmp_path / "m.onnx")
    assert compare(res.path, TorchRunner(ck.model), [7, 64], seed=seed)


@pytest.mark.parametrize("kv_cache", [False, True])
def test_export_scales_the_token_embeddings(tiny_tokenizer, tmp_path, kv_cache, seed):
    """A sinusoidal model trained with the paper's recipe (token embeddings x sqrt(d), ModelConfig.embed_scale):
    the plain and the KV-cache graphs compute the model's logits (the KV form decoding past its prefill, where the
    positions start at the past's length). Control: the same weights without the scale are told apart."""
    import dataclasses
    import math

    from alibi_export.model import AlibiLM
    from alibi_export.runtime.generate import GenerationSession
    from tests.conftest import make_tiny

    ck = load(make_tiny(tmp_path / "ck", tiny_tokenizer, position="sinusoidal", embed_scale=math.sqrt(48)))
    unscaled = AlibiLM(dataclasses.replace(ck.model.config, embed_scale=1.0)).eval()
    unscaled.load_state_dict(ck.model.state_dict())
    res = export_onnx(ck, tmp_path / "m.onnx", kv_cache=kv_cache)
    if not kv_cache:
        assert compare(res.path, TorchRunner(ck.model), [7, 64], seed=seed)
        assert not compare(res.path, TorchRunner(unscaled), [7, 64], seed=seed)
        return
    ids = np.random.default_rng(seed).integers(0, ck.model.config.vocab_size, (1, 24))
    logits, _ = GenerationSession(res.path).step_pieces(ids, [16, 1, 7])
    with torch.no_grad():
        want, other = (m(torch.from_numpy(ids)).numpy() for m in (ck.model, unscaled))
    np.testing.assert_allclose(logits, want, **TOLERANCES["float32"])
    assert np.abs(logits - other).max() > 100 * TOLERANCES["float32"]["atol"]


def test_large_models_use_external_data(tiny_dir, tmp_path, monkeypatch, seed):
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
    assert compare(res.path, TorchRunner(ck.model), [9], seed=seed)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("alibi", ["all", "none", "some-zero"])
@pytest.mark.parametrize("lq,lk", [(5, 9), (40, 40), (33, 70)])  # whole and chunked paths, with past keys
def test_attention_function_bodies(tmp_path, causal, alibi, lq, lk, rng):
    """Every specialization of the function body, in ONNX Runtime, against softmax(qk/sqrt(d) + alibi_bias)v.
    "some-zero": one head's slope is 0 and one 2^-32; the others keep their ALiBi (a zero slope is a per-head
    fact; the causal body multiplies before masking there, as 0 * -inf would be NaN)."""
    from onnx import TensorProto, helper

    from alibi_export import alibi_bias
    from alibi_export.export.attention_function import attention_function

    H, D = 4, 8
    slopes = {"all": alibi_slopes(H), "none": [0.0] * H, "some-zero": [0.5, 0.0, 0.25, 2.0 ** -32]}[alibi]
    node = helper.make_node(OP_TYPE, ["q", "k", "v"], ["out"], domain=DOMAIN, num_heads=H, head_dim=D,
                            slopes=slopes, scale=D ** -0.5, causal=int(causal))
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("q", "k", "v", "out")]
    graph = helper.make_graph([node], "g", io[:3], io[3:])
    # whole_len 6: 5x9 runs whole, the others take the chunked Loop with 16-query chunks
    fn = attention_function(18, q_chunk=16, whole_len=6, causal=causal, alibi=alibi != "none",
                            zero_slope=0.0 in slopes)
    proto = helper.make_model(graph, functions=[fn], ir_version=8,
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    path = tmp_path / "attn.onnx"
    onnx.save(proto, path)
    sess = create_session(path)
    q, k, v = (rng.standard_normal((2, H, n, D), dtype=np.float32) for n in (lq, lk, lk))
    got = sess.run(None, {"q": q, "k": k, "v": v})[0]
    bias = alibi_bias(torch.tensor(slopes), lq, lk, past_len=lk - lq, causal=causal).numpy()
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D) + bias
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = (probs / probs.sum(-1, keepdims=True)) @ v
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)  # fp32 on both sides
    if alibi == "some-zero" and causal:  # control: the mask-first body, built here, gives that head NaN
        proto.functions[0].CopyFrom(attention_function(18, q_chunk=16, whole_len=6, causal=True, alibi=True))
        onnx.save(proto, path)
        broken = create_session(path).run(None, {"q": q, "k": k, "v": v})[0]
        assert np.isnan(broken[:, 1]).any() and np.isfinite(broken[:, [0, 2, 3]]).all()


def test_tolerance_follows_dtype_and_attention_form():
    from types import SimpleNamespace as Meta

    from alibi_export.validate import tolerance_of

    assert tolerance_of(Meta(dtype="float32", attention="decomposed", quantization="")) == TOLERANCES["float32"]
    assert tolerance_of(Meta(dtype="float16", attention="onnx", quantization="")) == TOLERANCES["float16"]
    assert tolerance_of(Meta(dtype="float32", attention="onnx", quantization="")) == TOLERANCES["float32-folded"]
