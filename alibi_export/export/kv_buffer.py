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
import torch.nn.functional as F

from ..model import AlibiLM

__all__ = ["buffer_attention", "folded_buffer_attention", "GQA_OP", "BUFFER_FORM", "FOLDED_BUFFER_FORM"]

GQA_OP = "com.microsoft::GroupQueryAttention"
BUFFER_FORM = "kv_buffer"  # dynamo_export's name for this form's attention
FOLDED_BUFFER_FORM = "kv_buffer_folded"  # the same with the onnx form's ALiBi columns (--attention onnx)


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


def folded_buffer_attention(model: AlibiLM):
    """The static-cache form for ONNX Runtime CUDA (``--static-cache --attention onnx``, float16 allowed):
    GroupQueryAttention with NO attention_bias, the ALiBi term and the padding mask folded into extra head
    dimensions as in the onnx attention form (export.attention_op: each query carries m_h [POS_BASE, 1], each
    cached key its position j // POS_BASE, j % POS_BASE and a padding column; the kernel sums those products in
    float32, so fp16 is as precise as that form's).

    Why: ONNX Runtime's CUDA GroupQueryAttention refuses an attention_bias ("attention_bias is not supported in
    GroupQueryAttention cuda kernel", 1.27 to 1.32), and the bias form's fp16 bias is too coarse anyway. The
    cache is head_dim + extra_dims wide. ``seqlens_k`` is computed from the mask's values (on the device) and
    ``total_sequence_length``, which the op reads on the host, from its shape alone: no host-device copy sits
    inside the graph, which ONNX Runtime's CUDA graphs require."""
    from ._positions import shared_token_positions
    from .attention_op import _folded_block_weights, _position_features

    cfg = model.config
    H, KV = cfg.n_head, cfg.kv_heads
    raw = model.pos.slopes.detach().float().cpu() if cfg.alibi_bf16 else None
    slopes = model.pos.head_slopes()
    slopes = (slopes if slopes is not None else torch.zeros(H)).detach().float().cpu()
    dtype = next(model.parameters()).dtype
    weights = {id(b.attn): _folded_block_weights(b.attn, cfg, slopes, dtype) for b in model.blocks}
    positions = shared_token_positions()
    shared: dict = {}

    def lengths(key_mask: torch.Tensor):
        """(seqlens_k (B,) int32 on the device, total () int32 from the shape), traced once per graph."""
        if shared.get("mask") is not key_mask:
            row = key_mask[:, 0, 0, :]
            seqlens = torch.ones_like(row, dtype=torch.int32).sum(-1, dtype=torch.int32) - 1
            total = torch.full((), row.shape[-1], dtype=torch.int32)
            shared.update(mask=key_mask, seqlens=seqlens, total=total)
        return shared["seqlens"], shared["total"]

    def attend_block(attn, x, pos, past, key_mask=None):
        assert past is not None and key_mask is not None, "the static-cache form always has a buffer and a mask"
        w_q, w_k, w_v, w_o, b_o, clip = weights[id(attn)]
        B, S, _ = x.shape
        x = torch.cat([x, _position_features(x, key_mask.shape[-1] - S, key_mask, cfg, raw, positions)], -1)
        q, k, v = x @ w_q, x @ w_k, x @ w_v  # (B, S, heads * (D + E))
        if clip is not None:  # MPT's clip_qkv, not on the ALiBi columns
            q, k, v = (torch.minimum(torch.maximum(t, -c), c) for t, c in zip((q, k, v), clip))
        seqlens, total = lengths(key_mask)
        y, present_k, present_v = torch.onnx.ops.symbolic_multi_out(
            GQA_OP, (q, k, v, past[0], past[1], seqlens, total),
            dict(num_heads=H, kv_num_heads=KV, scale=1.0),  # the query scale is in w_q
            dtypes=(q.dtype, q.dtype, q.dtype), shapes=(q.shape, past[0].shape, past[1].shape), version=1)
        return F.linear(y, w_o, b_o), (present_k, present_v)

    attend_block.owns_block = True
    return attend_block
