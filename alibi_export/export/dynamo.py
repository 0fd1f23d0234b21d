"""torch.onnx's dynamo export with each attention block swapped for its export form.

Both export forms (the plain LM in :mod:`.onnx`, the KV-cache decoder in :mod:`.kv_cache`) trace
through :func:`dynamo_export`, so neither imports the other.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings

import onnx
import torch

from ..attention_contract import DOMAIN, MASKED_OP_TYPE, OP_TYPE, OP_VERSION
from ..model import AlibiLM, T5Bias, attend_eager
from ._weights import detach_weights
from ._positions import shared_token_positions
from .attention_op import attention_op
from .kv_buffer import BUFFER_FORM, FOLDED_BUFFER_FORM, buffer_attention, folded_buffer_attention

__all__ = ["dynamo_export", "node_slopes"]


def node_slopes(model: AlibiLM) -> list[float]:
    """The slopes an attention node carries: effective ALiBi slopes, raw ones for the bf16 form, else zeros."""
    cfg = model.config
    if cfg.position != "alibi":
        return [0.0] * cfg.n_head
    slopes = model.pos.slopes if getattr(model.pos, "bf16", False) else model.pos.head_slopes()
    return [float(s) for s in slopes]


def _attention_node(model: AlibiLM):
    """An attend() that emits one AlibiAttention node (plain causal attention when slopes are 0), or
    with a key mask (KV-cache export) one AlibiAttentionMasked node.

    ``slopes`` are the effective ones (a scaled bias folded in). Falcon's bf16 bias is no function of
    effective slopes: its node carries the raw slopes and ``bias_bf16`` = 1, ``bias_scale``, and its
    function body computes that bias (see attention_function); a plugin must refuse such a node."""
    cfg = model.config
    attrs = dict(num_heads=cfg.n_head, head_dim=cfg.head_dim, slopes=node_slopes(model),
                 scale=1.0 / math.sqrt(cfg.head_dim), causal=1)
    if getattr(model.pos, "bf16", False):
        attrs.update(bias_bf16=1, bias_scale=float(model.pos.bias_scale))

    positions = shared_token_positions()

    def attend(q, k, v, pos, past_len, key_mask=None):
        if key_mask is not None:
            return torch.onnx.ops.symbolic(f"{DOMAIN}::{MASKED_OP_TYPE}", (q, k, v, key_mask, positions(key_mask)),
                                           attrs, dtype=q.dtype, shape=q.shape, version=OP_VERSION)
        return torch.onnx.ops.symbolic(f"{DOMAIN}::{OP_TYPE}", (q, k, v), attrs, dtype=q.dtype, shape=q.shape,
                                       version=OP_VERSION)

    return attend


@contextlib.contextmanager
def _export_attention(model: AlibiLM, form: str = "plugin"):
    """Swap every block's attention for the ONNX node during export; restore on exit."""
    saved = [b.attn.attend for b in model.blocks]
    # T5's learned bias is not a function of the slopes: it keeps the decomposed math.
    if isinstance(model.pos, T5Bias):
        attend = attend_eager
    else:
        attend = {"onnx": attention_op, BUFFER_FORM: buffer_attention,
                  FOLDED_BUFFER_FORM: folded_buffer_attention}.get(form, _attention_node)(model)
    try:
        for b in model.blocks:
            b.attn.attend = attend
        yield
    finally:
        for b, fn in zip(model.blocks, saved):
            b.attn.attend = fn


def dynamo_export(model: AlibiLM, module: torch.nn.Module, args: tuple, *, dynamic, opset: int, form: str,
                  input_names: list[str], output_names: list[str]) -> tuple[onnx.ModelProto, dict]:
    """torch.onnx's dynamo export of ``module`` with ``model``'s attention swapped for the ONNX node: the
    graph with its weights pending, and the weights (see :mod:`alibi_export.export._weights`)."""
    with _export_attention(model, form), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic, opset_version=opset,
                                    input_names=input_names, output_names=output_names, optimize=True,
                                    verbose=False)
    return detach_weights(program)
