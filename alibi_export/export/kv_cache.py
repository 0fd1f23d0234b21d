"""The KV-cache decoder form: one graph for the prefill (past length 0) and every decoding step.

Inputs: ``input_ids`` (batch, sequence), ``attention_mask`` (batch, past_sequence + sequence; int64 1/0,
left padding for prompts of different lengths) and ``past_key_values.{layer}.key|value`` (batch,
kv heads (n_head, or 1 for multi-query), past_sequence, head_dim; head_dim + 8 (see attention_op.extra_dims) in the onnx attention form, whose cache carries the ALiBi
columns). Outputs: ``logits`` and ``present.{layer}.key|value`` (the past for the next step). Each attention block is one ``AlibiAttentionMasked`` node whose function places query i at the
absolute position past + i from the runtime shapes, and adds the key padding mask in float32.

With ``logits_to_keep`` (:func:`keep_last_logits`) the graph also takes an int64 scalar of that name, as
``transformers``' ``forward`` does: 0 computes the logits of every position, N those of the last N only.
A prefill that samples one token needs one position's: the LM head is a quarter of the shipped model's work
per token and nearly half of a BLOOM's (a 250,880-word vocabulary), and a 2,048-token BLOOM prompt's logits
alone are 2 GB in float32.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch

from ..model import AlibiLM
from .dynamo import dynamo_export

__all__ = ["kv_input_names", "kv_output_names", "trace_kv_cache", "keep_last_logits", "LOGITS_TO_KEEP"]

LOGITS_TO_KEEP = "logits_to_keep"
_KEPT_DIM = "kept_sequence"  # the logits' positions: the last logits_to_keep of the input's, or all of them
# Between the LM head's product and the logits output: a cast (float16 files) or a scale by a constant
# (MPT's logit_scale).
_PASS_THROUGH = {"Cast", "Identity", "Mul", "Div"}

# Neither 0 nor 1 (torch.export specializes both) and different from the traced sequence length.
_TRACE_PAST, _TRACE_LEN, _TRACE_BATCH = 5, 3, 2


def kv_input_names(n_layer: int) -> list[str]:
    return ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{kv}" for i in range(n_layer)
                                              for kv in ("key", "value")]


def kv_output_names(n_layer: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


class _Decoder(torch.nn.Module):
    """The LM with a flat signature: ids, mask and the cache in, logits and the new cache out."""

    def __init__(self, model: AlibiLM, buffer: bool = False):
        super().__init__()
        self.model, self.buffer = model, buffer

    def forward(self, input_ids, attention_mask, past_key_values):
        past = [(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(len(past_key_values) // 2)]
        # A buffer is longer than the past: the mask says how long the past is.
        past_len = attention_mask.shape[1] - input_ids.shape[1] if self.buffer else None
        logits, presents = self.model(input_ids, past_key_values=past, attention_mask=attention_mask, past_len=past_len)
        return (logits, *(t for kv in presents for t in kv))


def trace_kv_cache(model: AlibiLM, *, opset: int, form: str = "plugin",
                   buffer: bool = False) -> tuple[onnx.ModelProto, dict]:
    """The dynamo export of ``model`` as a KV-cache decoder; batch, sequence and past are dynamic.

    Traced with a past of a few tokens; the past dim is declared with min=0 so that the prefill
    (zero-size past tensors) runs the same graph. With ``buffer`` the static-cache form instead
    (:mod:`.kv_buffer`): the cache tensors are buffers of a dynamic length ``max_sequence`` that the
    runtime allocates, the mask's length (past + sequence) is its own dim; ``form`` "onnx" picks the folded
    buffer form (kv_buffer.folded_buffer_attention), any other the bias form."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past_sequence", min=0)
    total = torch.export.Dim("total_sequence")  # past + sequence: torch.export has no sum of two dims
    ids = torch.randint(0, cfg.vocab_size, (_TRACE_BATCH, _TRACE_LEN))
    mask = torch.ones(_TRACE_BATCH, _TRACE_PAST + _TRACE_LEN, dtype=torch.int64)
    from .attention_op import extra_dims

    # The onnx form's cache holds the ALiBi columns beside each head (see attention_op).
    width = cfg.head_dim + (extra_dims(cfg) if form == "onnx" else 0)
    length = _TRACE_PAST + _TRACE_LEN + 4 if buffer else _TRACE_PAST  # a buffer has room beyond past + sequence
    cache = [torch.randn(_TRACE_BATCH, cfg.kv_heads, length, width, dtype=dtype) for _ in range(2 * cfg.n_layer)]
    if buffer:
        from .kv_buffer import BUFFER_FORM, FOLDED_BUFFER_FORM

        # the onnx form's buffer carries its ALiBi columns (GroupQueryAttention without a bias: ONNX Runtime CUDA)
        form, past = FOLDED_BUFFER_FORM if form == "onnx" else BUFFER_FORM, torch.export.Dim("max_sequence")
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, [{0: batch, 2: past} for _ in cache])
    proto, weights = dynamo_export(model, _Decoder(model, buffer), (ids, mask, cache), dynamic=dynamic, opset=opset,
                                   form=form, input_names=kv_input_names(cfg.n_layer),
                                   output_names=kv_output_names(cfg.n_layer))
    if not buffer:
        mask_len = proto.graph.input[1].type.tensor_type.shape.dim[1]
        mask_len.dim_param = "past_sequence + sequence"  # what torch.export could not declare
    return proto, weights


def keep_last_logits(proto: onnx.ModelProto) -> None:
    """Add the ``logits_to_keep`` input (in place): the LM head's input is sliced to its last N positions before
    the product, so the positions not kept cost nothing. 0 keeps all (``Slice`` from -0 = 0), as does N past
    the sequence's length. The input is required: ONNX Runtime treats an input with a default (an initializer)
    as an overridable constant and warns about it at every load."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    made = {o: n for n in graph.node for o in n.output}
    consts = {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    node = made.get("logits")
    while node is not None and node.op_type in _PASS_THROUGH and (
            node.op_type in ("Cast", "Identity") or node.input[1] in consts):
        node = made.get(node.input[0])
    if node is None or node.op_type != "MatMul":
        raise ValueError("no LM head product found before the logits output")  # an exporter change: internal
    hidden = node.input[0]
    start, axes, end = (f"{LOGITS_TO_KEEP}_{n}" for n in ("start", "axes", "end"))
    graph.initializer.extend([numpy_helper.from_array(np.array([1], dtype=np.int64), axes),
                              numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), end),
                              numpy_helper.from_array(np.array([1], dtype=np.int64), f"{LOGITS_TO_KEEP}_shape")])
    at = list(graph.node).index(node)
    new = [helper.make_node("Neg", [LOGITS_TO_KEEP], [f"{LOGITS_TO_KEEP}_neg"], name=f"{LOGITS_TO_KEEP}_neg"),
           helper.make_node("Reshape", [f"{LOGITS_TO_KEEP}_neg", f"{LOGITS_TO_KEEP}_shape"], [start],
                            name=f"{LOGITS_TO_KEEP}_start"),
           helper.make_node("Slice", [hidden, start, end, axes], [f"{LOGITS_TO_KEEP}_hidden"],
                            name=f"{LOGITS_TO_KEEP}_slice")]
    for i, n in enumerate(new):
        graph.node.insert(at + i, n)
    node.input[0] = f"{LOGITS_TO_KEEP}_hidden"
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, []))  # last: positions kept
    logits = next(o for o in graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = _KEPT_DIM
