"""The onnx attention form: the standard ONNX Attention op (opset 23), causal with no mask, the ALiBi
bias folded into extra head dimensions, each block emitted as one unit in the op's layout."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..model import AlibiLM

__all__ = ["attention_op", "EXTRA_DIMS", "POS_BASE", "PAD_SCORE"]

EXTRA_DIMS = 8  # ALiBi columns per head in the onnx form; a multiple of 8 keeps flash kernels eligible
POS_BASE = 256  # positions split as j // 256 and j % 256: both exact in fp16 up to 2048 * 256 tokens
PAD_SCORE = 2048.0 * POS_BASE  # subtracted from a padded key's score (q column -2048, k column 256)

# The EXTRA_DIMS position features appended to each block's input in the onnx form: j // POS_BASE,
# j % POS_BASE, POS_BASE for a padded key, and a constant 1 that applies the projections' biases.
_HI, _LO, _PAD, _ONE = range(4)


def _folded_block_weights(attn, slopes: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """One attention block's projections widened to the onnx form's padded heads (head_dim + EXTRA_DIMS),
    reading the block input with the position features appended (see ``_position_features``).

    The query scale 1/sqrt(d) goes into W_q; the biases become the rows of the constant-1 feature, so
    the GEMM adds them in its float32 accumulation; each query head's extra columns are constants
    (m_h [POS_BASE, 1] and -PAD_SCORE / POS_BASE for the mask column), each key head's copy the
    position features; value heads are zero there and W_o ignores them. So the projections write the
    padded heads directly, in the (batch, sequence, heads * width) layout the Attention op reads, and no
    bias add, concat, split, transpose or slice runs per head."""
    H, D = attn.n_head, attn.head_dim
    C, E = H * D, EXTRA_DIMS
    w, b = attn.qkv.weight.detach().float(), attn.qkv.bias.detach().float()
    scale = 1.0 / math.sqrt(D)

    def widen(weight, bias):  # (C, C), (C,) -> (H * (D + E), C + E)
        wide = torch.zeros(H, D + E, C + E)
        wide[:, :D, :C], wide[:, :D, C + _ONE] = weight.view(H, D, C), bias.view(H, D)
        return wide

    w_q = widen(w[:C] * scale, b[:C] * scale)
    w_q[:, D + _HI, C + _ONE], w_q[:, D + _LO, C + _ONE] = slopes * POS_BASE, slopes
    w_q[:, D + _PAD, C + _ONE] = -PAD_SCORE / POS_BASE
    w_k = widen(w[C:2 * C], b[C:2 * C])
    for c in (_HI, _LO, _PAD):  # key column D + c = position feature c
        w_k[:, D + c, C + c] = 1.0
    w_v = widen(w[2 * C:], b[2 * C:])
    w_o = torch.zeros(C, H, D + E)
    w_o[:, :, :D] = attn.proj.weight.detach().float().view(C, H, D)
    qkv = [t.flatten(0, 1).T.contiguous() for t in (w_q, w_k, w_v)]  # (C + E, H * (D + E)): x @ w
    return tuple(t.to(dtype) for t in (*qkv, w_o.flatten(1), attn.proj.bias.detach().float()))


def _position_features(x: torch.Tensor, past_len, key_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, L, EXTRA_DIMS) features of the new keys j = past_len + t, from the runtime shapes (see _HI...)."""
    B, L, _ = x.shape
    j = torch.arange(L, device=x.device) + past_len
    hi, lo = torch.div(j, POS_BASE, rounding_mode="floor"), torch.remainder(j, POS_BASE)
    if key_mask is None:
        padded = torch.zeros(B, L, dtype=x.dtype, device=x.device)
    else:
        padded = (key_mask[:, 0, 0, past_len:] < 0).to(x.dtype)  # (B, L): 1 for padding
    columns = [hi.to(x.dtype).expand(B, L), lo.to(x.dtype).expand(B, L), padded * POS_BASE, torch.ones_like(padded)]
    columns += [torch.zeros_like(padded)] * (EXTRA_DIMS - len(columns))
    return torch.stack(columns, -1)


def attention_op(model: AlibiLM):
    """A block-level attend that emits the standard ONNX Attention op (opset 23) with the ALiBi bias
    folded into extra head dimensions, so the op runs causal with no mask and fused kernels stay
    eligible.

    Softmax ignores a per-query constant, so m_h (j - i) may be replaced by m_h j, which is a dot
    product: each query gets the columns m_h [POS_BASE, 1] and each key [j // POS_BASE, j % POS_BASE].
    Both factors are exact in fp16 (the slope itself is rounded once, the same for every key, so the
    bias stays m'_h (j - i) for a slope within 2^-11 of m_h) and their products are summed in float32
    by the kernel. A third column carries the key padding mask (PAD_SCORE for padded keys). The
    op's own past_key/past_value append the cache, which keeps the causal mask bottom-right aligned;
    the cache therefore holds the padded head (head_dim + EXTRA_DIMS) and the positions. The op reads
    and writes (batch, sequence, heads * width), the layout of the projections around it (see
    ``_folded_block_weights``)."""
    cfg = model.config
    H, D = cfg.n_head, cfg.head_dim
    slopes = model.pos.head_slopes()
    slopes = (slopes if slopes is not None else torch.zeros(H)).detach().float().cpu()
    dtype = next(model.parameters()).dtype
    weights = {id(b.attn): _folded_block_weights(b.attn, slopes, dtype) for b in model.blocks}
    rotary = cfg.position == "rotary"

    def attend_block(attn, x, pos, past, key_mask=None):
        w_q, w_k, w_v, w_o, b_o = weights[id(attn)]
        B, L, _ = x.shape
        past_len = 0 if past is None else past[0].shape[2]
        x = torch.cat([x, _position_features(x, past_len, key_mask)], -1)
        q, k, v = x @ w_q, x @ w_k, x @ w_v  # (B, L, H * (D + EXTRA_DIMS))
        if rotary:  # rotary without a cache only (export_onnx refuses the other case)
            q, k = (t.view(B, L, H, D + EXTRA_DIMS).transpose(1, 2) for t in (q, k))
            rq, rk = pos.rotate(q[..., :D], k[..., :D], 0)
            q, k = (torch.cat([r, t[..., D:]], -1).transpose(1, 2).reshape(B, L, -1) for r, t in ((rq, q), (rk, k)))
        heads = dict(is_causal=True, scale=1.0, q_num_heads=H, kv_num_heads=H)
        if past is None:
            y = torch.onnx.ops.attention(q, k, v, **heads)[0]
            present = tuple(t.view(B, L, H, D + EXTRA_DIMS).transpose(1, 2) for t in (k, v))
        else:
            y, pk, pv, _ = torch.onnx.ops.attention(q, k, v, past_key=past[0], past_value=past[1], **heads)
            present = (pk, pv)
        return F.linear(y, w_o, b_o), present

    attend_block.owns_block = True
    return attend_block
