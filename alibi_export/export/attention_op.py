"""The onnx attention form: the standard ONNX Attention op (opset 23), causal with no mask, the ALiBi
bias folded into extra head dimensions, each block emitted as one unit in the op's layout."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..alibi import alibi_bias_bf16
from ..model import AlibiLM
from ._positions import shared_token_positions

__all__ = ["attention_op", "extra_dims", "EXTRA_DIMS", "POS_BASE", "PAD_SCORE"]

EXTRA_DIMS = 8  # ALiBi columns per head in the onnx form; a multiple of 8 keeps flash kernels eligible
POS_BASE = 256  # positions split as j // 256 and j % 256: both exact in fp16 up to 2048 * 256 tokens
PAD_SCORE = 2048.0 * POS_BASE  # subtracted from a padded key's score (q column -2048, k column 256)

# The position features appended to each block's input in the onnx form: j // POS_BASE, j % POS_BASE,
# POS_BASE for a padded key, a constant 1 that applies the projections' biases and the queries' constant
# columns, and, for Falcon's bf16 bias, that bias per head (its values are no product of two factors).
_HI, _LO, _PAD, _ONE, _BF16 = range(5)


def _wide_bf16(cfg) -> bool:
    """Falcon's bf16 bias with multi-query keys: the one key head carries every query head's bias, one
    column each, and each query head reads its own (so its extra width grows to fit n_head + 1 columns)."""
    return cfg.alibi_bf16 and cfg.kv_heads != cfg.n_head


def extra_dims(cfg) -> int:
    """Extra columns per head in the onnx form (and so in its KV cache): EXTRA_DIMS, or for Falcon's
    bf16 bias with multi-query keys n_head + 1 rounded up to a multiple of EXTRA_DIMS."""
    return -(-(cfg.n_head + 1) // EXTRA_DIMS) * EXTRA_DIMS if _wide_bf16(cfg) else EXTRA_DIMS


def _n_features(cfg) -> int:
    """Features appended to the block input: 8, or 8 rounded up past 4 + heads for Falcon's bf16 bias."""
    return EXTRA_DIMS if not cfg.alibi_bf16 else -(-(_BF16 + cfg.n_head) // EXTRA_DIMS) * EXTRA_DIMS


def _split_qkv(attn) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """(weight, bias) of q (n_head heads), k and v (kv heads) from the fused projection; zero biases if none."""
    C, kv = attn.n_head * attn.head_dim, attn.n_kv_head * attn.head_dim
    w = attn.qkv.weight.detach().float()
    b = attn.qkv.bias.detach().float() if attn.qkv.bias is not None else torch.zeros(w.shape[0])
    return tuple((w[lo:hi], b[lo:hi]) for lo, hi in ((0, C), (C, C + kv), (C + kv, C + 2 * kv)))


def _folded_block_weights(attn, cfg, slopes: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """One attention block's projections widened to the onnx form's padded heads (head_dim + extra_dims),
    reading the block input with the position features appended (see ``_position_features``).

    The query scale (1/sqrt(d), or MPT's softmax_scale) goes into W_q; the biases become the rows of
    the constant-1 feature, so the GEMM adds them in its float32 accumulation; each query head's extra
    columns are constants (m_h [POS_BASE, 1], or Falcon's bf16 form's bias scale against its per-head
    bias feature, and -PAD_SCORE / POS_BASE for the mask column), each key head's copy the position
    features; value heads are zero there and W_o ignores them. So the projections write the padded
    heads directly, in the (batch, sequence, heads * width) layout the Attention op reads, and no bias
    add, concat, split, transpose or slice runs per head. Multi-query keys share one head: its columns
    are the positions, which every query head's slope multiplies."""
    H, KV, D, E = attn.n_head, attn.n_kv_head, attn.head_dim, extra_dims(cfg)
    C, F_ = H * D, _n_features(cfg)
    (w_q, b_q), (w_k, b_k), (w_v, b_v) = _split_qkv(attn)
    scale = cfg.attn_scale

    def widen(weight, bias, heads):  # (heads * D, C), (heads * D,) -> (heads, D + E, C + F_)
        wide = torch.zeros(heads, D + E, C + F_)
        wide[:, :D, :C], wide[:, :D, C + _ONE] = weight.view(heads, D, C), bias.view(heads, D)
        return wide

    q = widen(w_q * scale, b_q * scale, H)
    k = widen(w_k, b_k, KV)
    pad = H if _wide_bf16(cfg) else _PAD  # the padding mask's column
    if _wide_bf16(cfg):  # query head h reads column h of the one key head: the bf16 bias of head h
        heads = torch.arange(H)
        q[heads, D + heads, C + _ONE] = float(attn_bias_scale(cfg))
        k[0, D + heads, C + _BF16 + heads] = 1.0
    elif cfg.alibi_bf16:  # score term: bias_scale * bf16 bias of head h (the key's feature _BF16 + h)
        q[:, D + _HI, C + _ONE] = float(attn_bias_scale(cfg))
        k[torch.arange(KV), D + _HI, C + _BF16 + torch.arange(KV)] = 1.0
    else:  # score term: m_h (POS_BASE * (j // POS_BASE) + j % POS_BASE) = m_h j
        q[:, D + _HI, C + _ONE], q[:, D + _LO, C + _ONE] = slopes * POS_BASE, slopes
        k[:, D + _HI, C + _HI] = k[:, D + _LO, C + _LO] = 1.0
    q[:, D + pad, C + _ONE] = -PAD_SCORE / POS_BASE
    k[:, D + pad, C + _PAD] = 1.0
    v = widen(w_v, b_v, KV)
    w_o = torch.zeros(C, H, D + E)
    w_o[:, :, :D] = attn.proj.weight.detach().float().view(C, H, D)
    b_o = None if attn.proj.bias is None else attn.proj.bias.detach().to(dtype)
    qkv = [t.flatten(0, 1).T.contiguous().to(dtype) for t in (q, k, v)]  # (C + F_, heads * (D + E)): x @ w
    return (*qkv, w_o.flatten(1).to(dtype), b_o, _clip_bounds(cfg, H, KV, dtype))


def attn_bias_scale(cfg) -> float:
    """The factor on the ALiBi term: the softmax scale for Falcon's bias-before-scale, else 1."""
    return cfg.attn_scale if cfg.alibi_scaled else 1.0


def _clip_bounds(cfg, H: int, KV: int, dtype: torch.dtype):
    """MPT's clip_qkv on the widened projections: per-column bounds, the clip value on each head's
    D columns (times the folded query scale on q) and none on its ALiBi columns, which must not be clipped."""
    if cfg.clip_qkv is None:
        return None
    D, E = cfg.head_dim, extra_dims(cfg)

    def bound(heads, value):
        b = torch.full((heads, D + E), float("inf"))
        b[:, :D] = value
        return b.flatten().to(dtype)

    return bound(H, cfg.clip_qkv * cfg.attn_scale), bound(KV, cfg.clip_qkv), bound(KV, cfg.clip_qkv)


def _position_features(x: torch.Tensor, past_len, key_mask: torch.Tensor | None, cfg,
                       raw_slopes: torch.Tensor | None, positions) -> torch.Tensor:
    """(B, L, n features) of the new keys j = past_len + t, from the runtime shapes (see _HI...).

    In a padded batch (``key_mask``) a key's position is counted over its row's real tokens
    (``alibi.token_positions``, over past and new keys; ``positions``: export._positions.shared_token_positions),
    so padding anywhere in the row is invisible."""
    B, L, _ = x.shape
    if key_mask is None:
        j = (torch.arange(L, device=x.device) + past_len).expand(B, L)
        padded = torch.zeros(B, L, dtype=x.dtype, device=x.device)
    else:
        j = positions(key_mask)[:, 0, 0, past_len:].long()  # (B, L)
        padded = (key_mask[:, 0, 0, past_len:] < 0).to(x.dtype)  # (B, L): 1 for padding
    hi, lo = torch.div(j, POS_BASE, rounding_mode="floor"), torch.remainder(j, POS_BASE)
    columns = [hi.to(x.dtype), lo.to(x.dtype), padded * POS_BASE, torch.ones_like(padded)]
    features = torch.stack(columns, -1)  # (B, L, 4)
    if cfg.alibi_bf16:  # Falcon: bf16(m_h * j) with j counted over the row's real tokens
        bias = alibi_bias_bf16(raw_slopes, j)[:, :, 0, :].transpose(1, 2)  # (B, L, H)
        features = torch.cat([features, bias.to(x.dtype)], -1)
    pad = _n_features(cfg) - features.shape[-1]
    return torch.cat([features, features.new_zeros(B, L, pad)], -1) if pad else features


def attention_op(model: AlibiLM):
    """A block-level attend that emits the standard ONNX Attention op (opset 23) with the ALiBi bias
    folded into extra head dimensions, so the op runs causal with no mask and fused kernels stay
    eligible.

    Softmax ignores a per-query constant, so m_h (j - i) may be replaced by m_h j, which is a dot
    product: each query gets the columns m_h [POS_BASE, 1] and each key [j // POS_BASE, j % POS_BASE].
    Both factors are exact in fp16 (the slope itself is rounded once, the same for every key, so the
    bias stays m'_h (j - i) for a slope within 2^-11 of m_h) and their products are summed in float32
    by the kernel. A slope below fp16's normal range (MPT's reach 2^-32) is rounded to a subnormal, at
    most 2^-25 off in each column, so its head's bias is off by at most 2^-25 (j // POS_BASE + j % POS_BASE),
    under 2^-13 up to 2^19 tokens; the slopes themselves are float32 until this fold. A third column carries the key padding mask (PAD_SCORE for padded keys). The
    op's own past_key/past_value append the cache, which keeps the causal mask bottom-right aligned;
    the cache therefore holds the padded head (head_dim + extra_dims(cfg)) and the positions. The op reads
    and writes (batch, sequence, heads * width), the layout of the projections around it (see
    ``_folded_block_weights``)."""
    cfg = model.config
    H, KV, D, E = cfg.n_head, cfg.kv_heads, cfg.head_dim, extra_dims(cfg)
    raw = model.pos.slopes.detach().float().cpu() if cfg.alibi_bf16 else None
    slopes = model.pos.head_slopes()  # effective slopes (a scaled bias folded in); None: no ALiBi
    slopes = (slopes if slopes is not None else torch.zeros(H)).detach().float().cpu()
    dtype = next(model.parameters()).dtype
    weights = {id(b.attn): _folded_block_weights(b.attn, cfg, slopes, dtype) for b in model.blocks}
    rotary = cfg.position == "rotary"
    positions = shared_token_positions()

    def attend_block(attn, x, pos, past, key_mask=None):
        w_q, w_k, w_v, w_o, b_o, clip = weights[id(attn)]
        B, L, _ = x.shape
        past_len = 0 if past is None else past[0].shape[2]
        x = torch.cat([x, _position_features(x, past_len, key_mask, cfg, raw, positions)], -1)
        q, k, v = x @ w_q, x @ w_k, x @ w_v  # (B, L, heads * (D + E))
        if clip is not None:  # MPT's clip_qkv on the projections, not on the ALiBi columns
            q, k, v = (torch.minimum(torch.maximum(t, -c), c) for t, c in zip((q, k, v), clip))
        if rotary:  # rotary without a cache only (export_onnx refuses the other case)
            q, k = (t.view(B, L, n, D + E).transpose(1, 2) for t, n in ((q, H), (k, KV)))
            rq, rk = pos.rotate(q[..., :D], k[..., :D], 0)
            q, k = (torch.cat([r, t[..., D:]], -1).transpose(1, 2).reshape(B, L, -1) for r, t in ((rq, q), (rk, k)))
        heads = dict(is_causal=True, scale=1.0, q_num_heads=H, kv_num_heads=KV)
        if past is None:
            y = torch.onnx.ops.attention(q, k, v, **heads)[0]
            present = tuple(t.view(B, L, KV, D + E).transpose(1, 2) for t in (k, v))
        else:
            y, pk, pv, _ = torch.onnx.ops.attention(q, k, v, past_key=past[0], past_value=past[1], **heads)
            present = (pk, pv)
        return F.linear(y, w_o, b_o), present

    attend_block.owns_block = True
    return attend_block

