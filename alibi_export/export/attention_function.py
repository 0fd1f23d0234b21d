"""The ONNX body of one ALiBi attention node, written once in standard operators.

The exporter emits every attention block as one ``alibi_export::AlibiAttention`` node. This
module gives that node a model-local function, so ONNX Runtime runs the node as it is and a
TensorRT plugin can replace it; the default export inlines the function.

Why a Loop over query chunks: a plain graph materializes (B, H, L, L) float tensors, which
needs gigabytes at 16k tokens and overflows int32 element counts in ORT CUDA. Each chunk of
``q_chunk`` queries only sees keys up to its own last position (causal), so memory is
O(B·H·q_chunk·L), linear in L, and half of the L² products are never computed. The bias is
built from the runtime positions in float32 whatever the I/O dtype: the ALiBi term reaches
m·L in magnitude, which fp16 cannot hold to the precision softmax needs.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

__all__ = ["DOMAIN", "OP_TYPE", "OP_VERSION", "attention_function", "DEFAULT_Q_CHUNK"]

DOMAIN, OP_TYPE, OP_VERSION = "alibi_export", "AlibiAttention", 1
DEFAULT_Q_CHUNK = 256
ATTRIBUTES = ("num_heads", "head_dim", "slopes", "scale", "causal")


def _i64(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))


def _ref(name: str, attr: str, attr_type: int) -> onnx.NodeProto:
    """A Constant whose value is the calling node's attribute ``attr``."""
    node = helper.make_node("Constant", [], [name])
    kind = {onnx.AttributeProto.FLOATS: "value_floats", onnx.AttributeProto.FLOAT: "value_float",
            onnx.AttributeProto.INT: "value_int"}[attr_type]
    node.attribute.append(onnx.AttributeProto(name=kind, ref_attr_name=attr, type=attr_type))
    return node


def _loop_body() -> onnx.GraphProto:
    """One chunk of queries [c0, c0 + C) against keys [0, kend); outer-scope names are read directly."""
    n = helper.make_node
    nodes = [
        n("Unsqueeze", ["iter", "axis0"], ["i1"]),
        n("Mul", ["i1", "chunk"], ["c0"]),
        n("Add", ["c0", "chunk"], ["c1"]),
        n("Slice", ["q_pad", "c0", "c1", "axis2"], ["q_c"]),  # (B, H, C, D), already scaled
        n("Add", ["c1", "past"], ["q_end"]),
        n("Min", ["q_end", "k_len"], ["kend_causal"]),
        n("Where", ["causal_b", "kend_causal", "k_len"], ["kend"]),  # causal: later keys are never read
        n("Slice", ["k_t", "zero1", "kend", "axis3"], ["k_c"]),  # (B, H, D, kend)
        n("Slice", ["v_f", "zero1", "kend", "axis2"], ["v_c"]),  # (B, H, kend, D)
        n("Slice", ["k_pos_all", "zero1", "kend", "axis0"], ["k_pos"]),  # (kend,)
        n("Add", ["c0", "past"], ["q_start"]),
        n("Squeeze", ["q_start", "axis0"], ["q_start_s"]),
        n("Squeeze", ["q_end", "axis0"], ["q_end_s"]),
        n("Range", ["q_start_s", "q_end_s", "one_s"], ["q_pos_i"]),
        n("Cast", ["q_pos_i"], ["q_pos"], to=TensorProto.FLOAT),  # (C,) absolute query positions
        n("Unsqueeze", ["k_pos", "axis0"], ["k_row"]),
        n("Unsqueeze", ["q_pos", "axis1"], ["q_col"]),
        n("Sub", ["k_row", "q_col"], ["rel"]),  # (C, kend): j - i
        n("Abs", ["rel"], ["rel_abs"]),
        n("Neg", ["rel_abs"], ["rel_sym"]),
        n("Where", ["causal_b", "rel", "rel_sym"], ["rel_used"]),
        n("Mul", ["slopes3", "rel_used"], ["bias"]),  # (H, C, kend): m_h (j - i), not scaled by 1/sqrt(d)
        n("Greater", ["rel", "zero_f"], ["future"]),
        n("And", ["causal_b", "future"], ["masked"]),
        n("Where", ["masked", "neg_inf", "bias"], ["bias_masked"]),
        n("MatMul", ["q_c", "k_c"], ["scores"]),  # (B, H, C, kend)
        n("Add", ["scores", "bias_masked"], ["logits"]),
        n("Softmax", ["logits"], ["probs"], axis=-1),
        n("MatMul", ["probs", "v_c"], ["out_c"]),  # (B, H, C, D)
        n("Identity", ["cond_in"], ["cond_out"]),
    ]
    return helper.make_graph(
        nodes, "alibi_attention_chunk",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("out_c", TensorProto.FLOAT, None)])


def attention_function(opset: int, *, q_chunk: int = DEFAULT_Q_CHUNK) -> onnx.FunctionProto:
    """FunctionProto for ``AlibiAttention(q, k, v) -> out``; q (B, H, Lq, D), k and v (B, H, Lk, D).

    Query i sits at absolute position ``Lk - Lq + i`` (so a KV cache of past keys works unchanged).
    Attributes: num_heads, head_dim, slopes (H floats), scale, causal (1, or 0 for -m|j - i|).
    """
    if q_chunk < 1:
        raise ValueError(f"q_chunk must be positive, got {q_chunk}")
    n = helper.make_node
    nodes = [
        _ref("slopes", "slopes", onnx.AttributeProto.FLOATS),
        _ref("scale", "scale", onnx.AttributeProto.FLOAT),
        _ref("causal_i", "causal", onnx.AttributeProto.INT),
        n("Cast", ["causal_i"], ["causal_b"], to=TensorProto.BOOL),
        _i64("axis0", [0]), _i64("axis1", [1]), _i64("axis2", [2]), _i64("axis3", [3]),
        _i64("zero1", [0]), _i64("chunk_max", [q_chunk]), _i64("shape_h11", [-1, 1, 1]),
        _i64("zeros6", [0] * 6), _i64("three1", [3]), _i64("four1", [4]),
        n("Constant", [], ["one_s"], value=helper.make_tensor("one_s", TensorProto.INT64, [], [1])),
        n("Constant", [], ["zero_s"], value=helper.make_tensor("zero_s", TensorProto.INT64, [], [0])),
        n("Constant", [], ["zero_f"], value=helper.make_tensor("zero_f", TensorProto.FLOAT, [], [0.0])),
        n("Constant", [], ["neg_inf"], value=helper.make_tensor("neg_inf", TensorProto.FLOAT, [], [float("-inf")])),
        n("Constant", [], ["true"], value=helper.make_tensor("true", TensorProto.BOOL, [], [True])),
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
        n("Min", ["chunk_max", "q_len"], ["chunk_raw"]),
        n("Max", ["chunk_raw", "one1"], ["chunk"]),
        n("Add", ["q_len", "chunk"], ["q_len_c"]),
        n("Sub", ["q_len_c", "one1"], ["q_len_c1"]),
        n("Div", ["q_len_c1", "chunk"], ["n_chunks"]),  # ceil(Lq / C)
        n("Squeeze", ["n_chunks", "axis0"], ["trip"]),
        n("Mul", ["n_chunks", "chunk"], ["q_padded"]),
        n("Sub", ["q_padded", "q_len"], ["pad_len"]),
        n("Concat", ["zeros6", "pad_len", "zero1"], ["pads"], axis=0),
        n("Mul", ["q_f", "scale"], ["q_scaled"]),  # scale the (B, H, L, D) queries, not the L x L scores
        n("Pad", ["q_scaled", "pads"], ["q_pad"]),  # (B, H, n*C, D); padded rows are dropped below
        n("Transpose", ["k_f"], ["k_t"], perm=[0, 1, 3, 2]),  # (B, H, D, Lk)
        n("Squeeze", ["k_len", "axis0"], ["k_len_s"]),
        n("Range", ["zero_s", "k_len_s", "one_s"], ["k_pos_i"]),
        n("Cast", ["k_pos_i"], ["k_pos_all"], to=TensorProto.FLOAT),
        n("Loop", ["trip", "true"], ["chunks"], body=_loop_body()),  # (n, B, H, C, D)
        n("Transpose", ["chunks"], ["chunks_t"], perm=[1, 2, 0, 3, 4]),  # (B, H, n, C, D)
        n("Concat", ["reshape_tail", "head_dim"], ["out_shape"], axis=0),
        n("Reshape", ["chunks_t", "out_shape"], ["out_padded"]),  # (B, H, n*C, D)
        n("Slice", ["out_padded", "zero1", "q_len", "axis2"], ["out_f"]),
        n("CastLike", ["out_f", "q"], ["out"]),
    ]
    nodes.insert(5, _i64("one1", [1]))
    return helper.make_function(
        DOMAIN, OP_TYPE, ["q", "k", "v"], ["out"], nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES))
