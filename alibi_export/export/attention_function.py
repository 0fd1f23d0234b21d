"""The ONNX body of one ALiBi attention node, written once in standard operators.

The exporter emits every attention block as one ``alibi_export::AlibiAttention`` node. This
module gives that node a model-local function, so ONNX Runtime runs the node as it is and a
TensorRT plugin can replace it; the default export inlines the function.

Short sequences (up to 1024² query-key pairs) compute the scores whole, where a Loop's cost
per iteration would dominate. Longer ones take a Loop over query chunks: a plain graph
materializes (B, H, L, L) float tensors, which needs gigabytes at 16k tokens and overflows
int32 element counts in ORT CUDA. Each chunk of
``q_chunk`` queries only sees keys up to its own last position (causal), so memory is
O(B·H·q_chunk·L), linear in L, and half of the L² products are never computed. The bias is
built from the runtime positions in float32 whatever the I/O dtype: the ALiBi term reaches
m·L in magnitude, which fp16 cannot hold to the precision softmax needs.

The KV-cache export uses a second op, ``AlibiAttentionMasked(q, k, v, key_mask, key_pos)``, with
the same body plus an additive float key mask (B, 1, 1, Lk) for padded batches and each key's position
among its row's real tokens (B, 1, 1, Lk, computed once per graph): padded keys are masked and the
ALiBi distance is p_j - p_i, so padding anywhere (left, or a hole between a prompt and its generated
tokens) changes no logit. Both ops share :func:`_attend_block`,
and the 3-input op is unchanged by the masked one.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ..attention_contract import ATTRIBUTES, BF16_ATTRIBUTES, DOMAIN, MASKED_OP_TYPE, OP_TYPE

__all__ = ["attention_function", "DEFAULT_Q_CHUNK", "DEFAULT_WHOLE_LEN"]

DEFAULT_Q_CHUNK = 256
DEFAULT_WHOLE_LEN = 1024


def _i64(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))


def _ref(name: str, attr: str, attr_type: int) -> onnx.NodeProto:
    """A Constant whose value is the calling node's attribute ``attr``."""
    node = helper.make_node("Constant", [], [name])
    kind = {onnx.AttributeProto.FLOATS: "value_floats", onnx.AttributeProto.FLOAT: "value_float",
            onnx.AttributeProto.INT: "value_int"}[attr_type]
    node.attribute.append(onnx.AttributeProto(name=kind, ref_attr_name=attr, type=attr_type))
    return node


def _attend_block(p: str, q: str, q_start: str, q_end: str, kend: str | None, out: str, *, masked: bool,
                  causal: bool, alibi: bool, zero_slope: bool = False, bf16: bool = False,
                  q_tok: str = "k_tok") -> list[onnx.NodeProto]:
    """Queries ``q`` at absolute positions [q_start, q_end) attend to keys [0, kend) (None: all keys).

    The one place the graph builds the ALiBi bias; the whole-sequence path and each Loop chunk use
    it. Names are prefixed with ``p``: a subgraph may not redefine a name of its outer scope.
    With ``masked`` the function's float32 ``key_mask_f`` (B, 1, 1, Lk) is added to the scores.
    ``causal`` and ``alibi`` (some slope is not 0; False: all zero, plain attention) are fixed at export,
    so the graph holds only the passes it needs: with both, the causal -inf goes into (j - i) before
    the slopes multiply it, one (H, C, kend) pass in all. A zero slope is a per-head fact (``zero_slope``:
    some heads have one, e.g. a custom slope list): 0 * -inf is NaN, so those graphs multiply first and
    mask after, one more (H, C, kend) pass; the other heads keep their ALiBi.
    ``bf16`` (Falcon): the per-key bias ``kbias`` built once by the function (see _falcon_key_bias) is
    sliced to the chunk's keys and the causal -inf put over it. ``q_tok``: the tensor the queries'
    real-token positions are sliced from (k_tok, or in a Loop k_tok padded to whole chunks)."""
    n = helper.make_node
    tok = masked and alibi and not bf16  # the distance is p_j - p_i over real tokens (k_tok)
    logits = p + "logits_alibi" if masked else p + "logits"
    sources = [("k_t", "axis3"), ("v_f", "axis2"), ("k_pos_all", "axis0")]  # (B, H, D, k), (B, H, k, D), (k,)
    sources += [("key_mask_f", "axis3")] if masked else []  # (B, 1, 1, k)
    sources += [("k_tok", "axis3")] if tok else []  # (B, 1, 1, k)
    sources += [("kbias", "axis_last")] if bf16 else []  # (H, 1, k) or (B, H, 1, k)
    keys = [n("Identity", [src], [p + src]) if kend is None else n("Slice", [src, "zero1", kend, axis], [p + src])
            for src, axis in sources]
    mask = [n("Add", [logits, p + "key_mask_f"], [p + "logits"])] if masked else []  # finite: padding rows stay finite
    positions = [
        n("Squeeze", [q_start, "axis0"], [p + "q_start_s"]),
        n("Squeeze", [q_end, "axis0"], [p + "q_end_s"]),
        n("Range", [p + "q_start_s", p + "q_end_s", "one_s"], [p + "q_pos_i"]),
        n("Cast", [p + "q_pos_i"], [p + "q_pos"], to=TensorProto.FLOAT),  # (C,) absolute query positions
        n("Unsqueeze", [p + "k_pos_all", "axis0"], [p + "k_row"]),
        n("Unsqueeze", [p + "q_pos", "axis1"], [p + "q_col"]),
        n("Sub", [p + "k_row", p + "q_col"], [p + ("raw_rel" if tok else "rel")]),  # (C, kend): j - i
    ]
    if tok:  # p_j - p_i over each row's real tokens (k_tok, the key_pos input); queries are keys too
        positions += [
            n("Slice", [q_tok, q_start, q_end, "axis3"], [p + "q_tok"]),  # (B, 1, 1, C)
            n("Transpose", [p + "q_tok"], [p + "q_tok_col"], perm=[0, 1, 3, 2]),  # (B, 1, C, 1)
            n("Sub", [p + "k_tok", p + "q_tok_col"], [p + "rel"]),  # (B, 1, C, kend)
        ]
    future = [n("Greater", [p + ("raw_rel" if tok else "rel"), "zero_f"], [p + "future"])]  # on raw indices
    if bf16:  # Falcon: bias_scale * bf16(bf16(m) bf16(j)), -inf above the diagonal
        assert causal and alibi, "Falcon's bf16 bias is causal ALiBi"
        bias = [*positions, *future, n("Where", [p + "future", "neg_inf", p + "kbias"], [p + "bias"])]
    elif causal and alibi and zero_slope:  # m_h (j - i) first, then -inf above the diagonal (0 * -inf is NaN)
        bias = [*positions, *future, n("Mul", ["slopes3", p + "rel"], [p + "bias_raw"]),
                n("Where", [p + "future", "neg_inf", p + "bias_raw"], [p + "bias"])]
    elif causal and alibi:  # m_h (j - i), -inf above the diagonal; not scaled by 1/sqrt(d)
        bias = [*positions, *future, n("Where", [p + "future", "neg_inf", p + "rel"], [p + "rel_masked"]),
                n("Mul", ["slopes3", p + "rel_masked"], [p + "bias"])]
    elif causal:  # zero slopes: the causal mask alone, built once for all heads
        bias = [*positions, *future, n("Where", [p + "future", "neg_inf", "zero_f"], [p + "bias"])]
    elif alibi:  # bidirectional: -m_h |j - i|
        bias = [*positions, n("Abs", [p + "rel"], [p + "rel_abs"]), n("Neg", [p + "rel_abs"], [p + "rel_sym"]),
                n("Mul", ["slopes3", p + "rel_sym"], [p + "bias"])]
    else:
        bias = []
    scores = p + "scores" if bias else logits
    return [
        *keys,
        *bias,
        n("MatMul", [q, p + "k_t"], [scores]),  # (B, H, C, kend); q is already scaled
        *([n("Add", [scores, p + "bias"], [logits])] if bias else []),
        *mask,
        n("Softmax", [p + "logits"], [p + "probs"], axis=-1),
        n("MatMul", [p + "probs", p + "v_f"], [out]),  # (B, H, C, D)
    ]


def _graph(name: str, nodes, inputs, outputs) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [helper.make_tensor_value_info(*i) for i in inputs],
                             [helper.make_tensor_value_info(*o) for o in outputs])


def _whole_branch(**kind) -> onnx.GraphProto:
    """All queries at once: fastest while the (B, H, Lq, Lk) scores are small."""
    nodes = [helper.make_node("Add", ["q_len", "past"], ["w_q_end"])]
    nodes += _attend_block("w_", "q_scaled", "past", "w_q_end", None, "w_out", **kind)
    return _graph("alibi_attention_whole", nodes, [], [("w_out", TensorProto.FLOAT, None)])


def _chunk_body(**kind) -> onnx.GraphProto:
    """One Loop iteration: queries [c0, c0 + C) against keys [0, kend)."""
    n = helper.make_node
    nodes = [
        n("Unsqueeze", ["iter", "axis0"], ["i1"]),
        n("Mul", ["i1", "chunk"], ["c0"]),
        n("Add", ["c0", "chunk"], ["c1"]),
        n("Slice", ["q_pad", "c0", "c1", "axis2"], ["q_c"]),  # (B, H, C, D)
        n("Add", ["c0", "past"], ["q_start"]),
        n("Add", ["c1", "past"], ["q_end"]),
        # causal: a chunk never reads keys after its last query
        *([n("Min", ["q_end", "k_len"], ["kend"])] if kind["causal"] else [n("Identity", ["k_len"], ["kend"])]),
        *_attend_block("c_", "q_c", "q_start", "q_end", "kend", "out_c", q_tok="k_tok_qpad", **kind),
        n("Identity", ["cond_in"], ["cond_out"]),
    ]
    return _graph("alibi_attention_chunk", nodes, [("iter", TensorProto.INT64, []), ("cond_in", TensorProto.BOOL, [])],
                  [("cond_out", TensorProto.BOOL, []), ("out_c", TensorProto.FLOAT, None)])


def _chunked_branch(**kind) -> onnx.GraphProto:
    """A Loop over query chunks: memory O(B·H·C·Lk) instead of O(B·H·Lq·Lk)."""
    n = helper.make_node
    nodes = [
        n("Min", ["chunk_max", "q_len"], ["chunk_raw"]),
        n("Max", ["chunk_raw", "one1"], ["chunk"]),
        n("Add", ["q_len", "chunk"], ["q_len_c"]),
        n("Sub", ["q_len_c", "one1"], ["q_len_c1"]),
        n("Div", ["q_len_c1", "chunk"], ["n_chunks"]),  # ceil(Lq / C)
        n("Squeeze", ["n_chunks", "axis0"], ["trip"]),
        n("Mul", ["n_chunks", "chunk"], ["q_padded"]),
        n("Sub", ["q_padded", "q_len"], ["pad_len"]),
        n("Concat", ["zeros6", "pad_len", "zero1"], ["pads"], axis=0),
        n("Pad", ["q_scaled", "pads"], ["q_pad"]),  # (B, H, n*C, D); padded rows are dropped below
        *([n("Concat", ["zeros6", "zero1", "pad_len"], ["tok_pads"], axis=0),
           n("Pad", ["k_tok", "tok_pads"], ["k_tok_qpad"])]  # the padded queries' positions: (B, 1, 1, past + n*C)
          if kind["masked"] and kind["alibi"] and not kind["bf16"] else []),
        n("Loop", ["trip", "true"], ["chunks"], body=_chunk_body(**kind)),  # (n, B, H, C, D)
        n("Transpose", ["chunks"], ["chunks_t"], perm=[1, 2, 0, 3, 4]),  # (B, H, n, C, D)
        n("Concat", ["reshape_tail", "head_dim"], ["out_shape"], axis=0),
        n("Reshape", ["chunks_t", "out_shape"], ["out_padded"]),  # (B, H, n*C, D)
        n("Slice", ["out_padded", "zero1", "q_len", "axis2"], ["l_out"]),
    ]
    return _graph("alibi_attention_chunked", nodes, [], [("l_out", TensorProto.FLOAT, None)])


def _falcon_key_bias(masked: bool) -> list[onnx.NodeProto]:
    """``kbias`` = bias_scale * bf16(bf16(m_h) * bf16(j)) per key, as Falcon computes it (see
    alibi.alibi_bias_bf16): j counts over each row's real tokens, so with a key mask it is ``k_tok``,
    (B, H, 1, Lk); without one (H, 1, Lk). The casts round to nearest even in ONNX Runtime, as
    PyTorch's bfloat16 does."""
    n = helper.make_node
    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    return [
        n("Identity", ["k_tok" if masked else "k_pos_all"], ["k_pos_row"]),  # (B, 1, 1, Lk) or (Lk,)
        _ref("bias_scale", "bias_scale", onnx.AttributeProto.FLOAT),
        n("Cast", ["slopes3"], ["slopes_b"], to=bf16),
        n("Cast", ["slopes_b"], ["slopes_r"], to=f32),
        n("Cast", ["k_pos_row"], ["k_pos_b"], to=bf16),
        n("Cast", ["k_pos_b"], ["k_pos_r"], to=f32),
        n("Mul", ["slopes_r", "k_pos_r"], ["kbias_raw"]),  # exact in float32: 8 by at most 24 significant bits
        n("Cast", ["kbias_raw"], ["kbias_b"], to=bf16),
        n("Cast", ["kbias_b"], ["kbias_r"], to=f32),
        n("Mul", ["kbias_r", "bias_scale"], ["kbias"]),
    ]


def attention_function(opset: int, *, q_chunk: int = DEFAULT_Q_CHUNK, whole_len: int = DEFAULT_WHOLE_LEN,
                       masked: bool = False, causal: bool = True, alibi: bool = True, zero_slope: bool = False,
                       bf16: bool = False) -> onnx.FunctionProto:
    """FunctionProto for ``AlibiAttention(q, k, v) -> out``; q (B, H, Lq, D), k and v (B, H, Lk, D).

    With ``masked``, ``AlibiAttentionMasked(q, k, v, key_mask, key_pos) -> out`` instead, where ``key_mask``
    (B, 1, 1, Lk) is added to the scores (in float32) after the ALiBi bias and ``key_pos`` (B, 1, 1, Lk)
    places each key among its row's real tokens (attention_contract).

    Query i sits at absolute position ``Lk - Lq + i`` (so a KV cache of past keys works unchanged).
    Attributes: num_heads, head_dim, slopes (H floats), scale, causal (1, or 0 for -m|j - i|).
    Up to ``whole_len``² query-key pairs the scores are computed whole (a Loop has a cost per
    iteration that dominates short sequences); beyond, in chunks of ``q_chunk`` queries.
    ``causal``, ``alibi`` (some slope is not 0) and ``zero_slope`` (some slope is 0) must match the node's
    attributes: the body is specialized to them at export; see _attend_block. ``bf16`` (Falcon's bias, attributes
    ``bias_scale`` and ``bias_bf16``) likewise.
    """
    if q_chunk < 1:
        raise ValueError(f"q_chunk must be positive, got {q_chunk}")
    n = helper.make_node
    kind = dict(masked=masked, causal=causal, alibi=alibi, zero_slope=zero_slope and alibi, bf16=bf16)
    nodes = [
        _ref("slopes", "slopes", onnx.AttributeProto.FLOATS),
        _ref("scale", "scale", onnx.AttributeProto.FLOAT),
        _i64("axis0", [0]), _i64("axis1", [1]), _i64("axis2", [2]), _i64("axis3", [3]),
        _i64("zero1", [0]), _i64("chunk_max", [q_chunk]), _i64("shape_h11", [-1, 1, 1]),
        _i64("zeros6", [0] * 6), _i64("three1", [3]), _i64("four1", [4]),
        n("Constant", [], ["one_s"], value=helper.make_tensor("one_s", TensorProto.INT64, [], [1])),
        n("Constant", [], ["zero_s"], value=helper.make_tensor("zero_s", TensorProto.INT64, [], [0])),
        n("Constant", [], ["zero_f"], value=helper.make_tensor("zero_f", TensorProto.FLOAT, [], [0.0])),
        n("Constant", [], ["neg_inf"], value=helper.make_tensor("neg_inf", TensorProto.FLOAT, [], [float("-inf")])),
        n("Constant", [], ["true"], value=helper.make_tensor("true", TensorProto.BOOL, [], [True])),
        n("Constant", [], ["whole_max"],
          value=helper.make_tensor("whole_max", TensorProto.INT64, [], [whole_len * whole_len])),
        n("Constant", [], ["reshape_tail"], value=helper.make_tensor("reshape_tail", TensorProto.INT64, [3], [0, 0, -1])),
        n("Reshape", ["slopes", "shape_h11"], ["slopes3"]),  # (H, 1, 1)
        # Everything below runs in float32, whatever the I/O dtype.
        n("Cast", ["q"], ["q_f"], to=TensorProto.FLOAT),
        n("Cast", ["k"], ["k_f"], to=TensorProto.FLOAT),
        n("Cast", ["v"], ["v_f"], to=TensorProto.FLOAT),
        n("Shape", ["q"], ["q_shape"]),
        n("Shape", ["k"], ["k_shape"]),
        n("Slice", ["q_shape", "axis2", "three1"], ["q_len"]),  # (1,)
        n("Slice", ["q_shape", "three1", "four1"], ["head_dim"]),
        n("Slice", ["k_shape", "axis2", "three1"], ["k_len"]),
        n("Sub", ["k_len", "q_len"], ["past"]),  # queries sit after the cached keys
        n("Mul", ["q_f", "scale"], ["q_scaled"]),  # scale the (B, H, L, D) queries, not the L x L scores
        n("Transpose", ["k_f"], ["k_t"], perm=[0, 1, 3, 2]),  # (B, H, D, Lk)
        n("Squeeze", ["k_len", "axis0"], ["k_len_s"]),
        n("Range", ["zero_s", "k_len_s", "one_s"], ["k_pos_i"]),
        n("Cast", ["k_pos_i"], ["k_pos_all"], to=TensorProto.FLOAT),
        n("Mul", ["q_len", "k_len"], ["n_scores"]),
        n("Squeeze", ["n_scores", "axis0"], ["n_scores_s"]),
        n("LessOrEqual", ["n_scores_s", "whole_max"], ["short"]),
        n("If", ["short"], ["out_f"], then_branch=_whole_branch(**kind), else_branch=_chunked_branch(**kind)),
        n("CastLike", ["out_f", "q"], ["out"]),
    ]
    nodes.insert(5, _i64("one1", [1]))
    inputs = ["q", "k", "v"]
    if masked:
        inputs += ["key_mask", "key_pos"]
        nodes[-2:-2] = [
            n("Cast", ["key_mask"], ["key_mask_f"], to=TensorProto.FLOAT),
            n("Cast", ["key_pos"], ["k_tok"], to=TensorProto.FLOAT),  # (B, 1, 1, Lk): see the contract
        ]
    if bf16:
        nodes[-2:-2] = [_i64("axis_last", [-1]), *_falcon_key_bias(masked)]
    return helper.make_function(
        DOMAIN, MASKED_OP_TYPE if masked else OP_TYPE, inputs, ["out"], nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=list(ATTRIBUTES) + (list(BF16_ATTRIBUTES) if bf16 else []))
