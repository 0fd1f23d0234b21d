"""The static-cache form of the KV-cache decoder: the cache is a preallocated buffer the graph updates in place.

The concatenating form (:mod:`.kv_cache`) returns ``present = Concat(past, new)``: every decoding step copies
the whole cache and transposes K over it in every layer, two thirds of a CPU step's growth with context
(BENCHMARKS.md, "CPU serving"). Here each attention block is ONNX Runtime's ``GroupQueryAttention``
(com.microsoft) with ``past_key_values.*`` (batch, kv heads, buffer length, head_dim) as its past and the
``present.*`` of the same shape: bound to the same memory (IO binding), the op writes the new keys and values
at their positions and reads only the first ``total`` columns, so a step costs O(context), not O(buffer),
and copies nothing. Unbound (a plain ``session.run``) it copies the past once into a new present, and the
numbers are the same.

Why GroupQueryAttention and not the standard ops: opset 24's ``TensorScatter`` updates a buffer in place in
ONNX Runtime 1.32, but its ``Attention`` op computes over the whole buffer whatever ``nonpad_kv_seqlen`` says
(tools/probe_kv_buffer.py: 1 row at 128 context in a 2048 buffer, 3-5x the concatenating form's step).

The inputs keep the concatenating form's meaning: ``attention_mask`` is (batch, past + sequence), left padded;
the buffers hold each row's keys at the same columns as the concatenated cache would. The ALiBi bias is the
model's own (``PositionMethod.bias``: alibi.alibi_bias over each row's real-token positions) plus the key
padding mask, built once per graph as GroupQueryAttention's ``attention_bias`` (batch, heads, sequence,
past + sequence) in float32; the op masks the future itself and reads keys [0, past + sequence) of every row
(``seqlens_k`` = past + sequence - 1 for every row).
"""
from __future__ import annotations

import math

import torch

from ..model import AlibiLM

__all__ = ["buffer_attention", "GQA_OP", "BUFFER_FORM"]

GQA_OP = "com.microsoft::GroupQueryAttention"
BUFFER_FORM = "kv_buffer"  # dynamo_export's name for this form's attention


def buffer_attention(model: AlibiLM):
    """A block-level attend (``owns_block``) that emits one GroupQueryAttention node per block, its past and
    present the block's cache buffer. ``past`` is the (key, value) buffer pair; the past length is the key
    mask's length minus the new tokens'."""
    cfg = model.config
    H, KV, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    shared: dict = {}

    def bias_of(pos, key_mask: torch.Tensor, S, dtype) -> torch.Tensor:
        """(B, H, S, T) ALiBi bias + padding mask, traced once per graph: every layer gets the same mask tensor."""
        if shared.get("mask") is not key_mask:  # the reference kept here keeps the identity test sound
            B, T = key_mask.shape[0], key_mask.shape[-1]
            bias = pos.bias(S, T, T - S, key_mask)  # (B, H, S, T), (H, S, T) or None (no position bias)
            bias = key_mask.float() if bias is None else bias.float() + key_mask.float()
            # GroupQueryAttention needs each row's total-1 and the total, both int32.
            seqlens = torch.zeros_like(key_mask[:, 0, 0, 0], dtype=torch.int32) + (T - 1)
            shared.update(mask=key_mask, bias=bias.expand(B, H, S, T).to(dtype).contiguous(),
                          seqlens=seqlens, total=(seqlens[0] + 1).reshape(()))
        return shared["bias"]

    def attend_block(attn, x, pos, past, key_mask=None):
        assert past is not None and key_mask is not None, "the static-cache form always has a buffer and a mask"
        B, S, C = x.shape
        q, k, v = attn.project(x)  # (B, S, H * D), (B, S, KV * D) x 2
        bias = bias_of(pos, key_mask, S, q.dtype)
        y, present_k, present_v = torch.onnx.ops.symbolic_multi_out(
            GQA_OP, (q, k, v, past[0], past[1], shared["seqlens"], shared["total"], None, None, None, bias),
            dict(num_heads=H, kv_num_heads=KV, scale=1.0 / math.sqrt(D)),
            dtypes=(q.dtype, q.dtype, q.dtype), shapes=(q.shape, past[0].shape, past[1].shape), version=1)
        return attn.proj(y), (present_k, present_v)

    attend_block.owns_block = True
    return attend_block
