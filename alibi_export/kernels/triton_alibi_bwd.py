"""Backward of the fused ALiBi attention (dq, dk, dv) in Triton, FlashAttention-2 style.

With scores ``s = q.k * scale + b(i, j)`` (b the ALiBi term of :mod:`.triton_alibi`), the
forward's per-row log-sum-exp ``lse`` and ``delta_i = sum_d dO_id * O_id``:

    P = exp(s - lse)        dV = P^T dO        dP = dO V^T        dS = P * (dP - delta)
    dQ = scale * dS K       dK = scale * dS^T Q

P is recomputed tile by tile, the bias regenerated from the slopes and the positions: nothing of
size L x L is ever stored. Two kernels, so that no accumulator needs atomics:

* ``_bwd_dkdv_kernel``: one program per (key block, batch * kv head). K, V of the block stay in
  registers; the program walks the query blocks that see it (causal: from the diagonal on) of
  every query head of the KV group, so under GQA/MQA dK and dV are summed over the group in
  registers and written once.
* ``_bwd_dq_kernel``: one program per (query block, batch * head), walking the key blocks it sees.
* ``_bwd_delta_kernel`` (run first): delta from the 16-bit dO and O in one pass, and the bounds
  of the window below.

**The ALiBi window.** The bias decays linearly with distance, so far from its query a key's P
is negligible: by Cauchy-Schwarz, ``s_ij - lse_i <= |scale| * |q_i| * |k_j| - lse_i - m_h * |i - j|``
(log2 units). Each program bounds the first two terms with the largest |q| and |k| of its block or
(batch, head) and the smallest lse (``a``), and walks only the tiles within the distance beyond
which every P is below ``2^-(gap + E)``. A small P alone is not enough: the gradients' terms are
P times data, and a value or upstream gradient 1e12 larger at some positions would carry a P of
2^-40 into them. So ``E`` prices the data in, per (batch, head). Write Q, K, V, G for the largest
|q_i|, |k_j|, |v_j|, |dO_i| of the (batch, head) and q_, k_, v_, g_ for their floors, the smallest
nonzero maximum over its 64-row blocks (the scale of the ordinary rows; blocks of zeros carry no
terms). With ``E = 1 + log2(Q/q_) + log2(K/k_) + log2(V/v_) + log2(G/g_)`` (>= 1) and P_ij <
2^-(gap + E) on every skipped (i, j), each skipped term of each gradient is bounded, using
|delta_i| = |dO_i . O_i| <= G V (O_i is a convex combination of the v_j):

    dV_j: P_ij dO_i                               |.| <= P_ij G                 < 2^-gap g_
    dK_j: scale P_ij (dO_i . v_j - delta_i) q_i   |.| <= |scale| P_ij 2 G V Q   < 2^-gap |scale| g_ v_ q_
    dQ_i: scale P_ij (dO_i . v_j - delta_i) k_j   |.| <= |scale| P_ij 2 G V K   < 2^-gap |scale| g_ v_ k_

(each ratio X/x_ >= 1, so every one of them fits in E). An element of dV or dK sums at most
GROUP * Lq terms, one of dQ at most Lk; ``skip_gap`` takes gap = 32 + log2 of that count, so the
skipped part of every gradient element is below 2^-32 of one term at the floor scale, P = 1: the
size of an ordinary element, whose fp32 rounding is 2^-24 of it. Whatever the data, large rows
widen the window (by E / m_h positions) instead of hiding in it. Any NaN or inf in q, k, v, dO
of a (batch, head) (or a zero slope) makes its bound infinite: its window is off, every tile computed. Steep
heads skip most of a long sequence; shallow heads, or data of large norm or range, skip little
or nothing. The gradients are those of the full computation (tested equal to 1e-6 of the largest,
and row by row with spiked v and dO; tests/test_kernels_bwd.py).

``AlibiAttention`` (a ``torch.autograd.Function``) runs the forward kernel, which also stores
``lse``, and this backward; ``alibi_attention_train`` is its entry point.

Scores are in log2 units (log2(e) folded into the scale and the slopes, ``lse`` stored in log2
units by the forward), as in the forward. Causal tiles add the bias in rank-1 form (a per-key
term plus a per-query term folded into lse), as the forward's column form does. In both kernels
the only masked tiles are the diagonal ones (causal) and the ragged last block: lengths need not
be multiples of the block sizes.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import triton_alibi as fwd
# the window's bound helpers, shared with the forward's window
from .triton_alibi import _block_norm, _floor_row, _range_bits, _reduce_row, _trips, _window  # noqa: F401

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _load_rows(src, start, offs0, stride, offs_d, n_rows, USE_TMA: tl.constexpr,
               MASKED: tl.constexpr):
    """Rows [start, start + len(offs0)) of a (n_rows, HEAD_DIM) matrix; rows past n_rows read as
    zeros. ``src``: a TMA descriptor (zero fill in hardware) or the matrix's base pointer."""
    if USE_TMA:
        x = src.load([start, 0])
    else:
        ptrs = src + (start + offs0)[:, None] * stride + offs_d[None, :]
        if MASKED:
            x = tl.load(ptrs, mask=((start + offs0) < n_rows)[:, None], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _row_source(base, n_rows, stride, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """What _load_rows reads a (n_rows, HEAD_DIM) matrix from, BLOCK rows at a time: a TMA descriptor
    (rows past n_rows read as zeros, in hardware) or the matrix's base pointer."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride, 1],
                                         block_shape=[BLOCK, HEAD_DIM])
    else:
        return base


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_src, do_src, lse_blk, delta_blk, start_m, offs_m0, cols, col_b,
               Lq, past_len, pos0, slope, qk_scale, sqm, sdom, offs_d,
               CAUSAL: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """Add one query block's contribution to the key block's dK, dV (transposed tiles).

    Causal: the bias -m(i - j) = -m(i - j0) + m(j - j0) (j0 = cols[0]) is rank 1: ``col_b`` =
    m(j - j0) per key, computed once per program, and m(i - j0) (``pos0`` = past_len - j0) is
    folded into the row's lse, so a score costs one FMA and one subtraction (no per-element
    int->float conversion). Where P is not negligible, m|i - j0| is bounded by the scores' range
    plus m * BLOCK_N, so the fold loses no fp32 precision that matters."""
    offs_m = start_m + offs_m0
    q = _load_rows(q_src, start_m, offs_m0, sqm, offs_d, Lq, USE_TMA, MASKED)
    do = _load_rows(do_src, start_m, offs_m0, sdom, offs_d, Lq, USE_TMA, MASKED)
    if MASKED:
        r_ok = offs_m < Lq
        lse = tl.load(lse_blk + offs_m, mask=r_ok, other=float("inf"))  # rows past Lq: P = 0
        delta = tl.load(delta_blk + offs_m, mask=r_ok, other=0.0)
    else:
        lse = tl.load(lse_blk + offs_m)
        delta = tl.load(delta_blk + offs_m)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
    if CAUSAL:
        row = lse + slope * (pos0 + offs_m).to(tl.float32)  # rows past Lq: inf
        s_t = s_t + col_b[:, None] - row[None, :]
        if MASKED:
            s_t = tl.where((past_len + offs_m)[None, :] >= cols[:, None], s_t, float("-inf"))
    else:
        dist = (past_len + offs_m)[None, :] - cols[:, None]  # (BLOCK_N, BLOCK_M): i - j, exact
        s_t = s_t - slope * tl.abs(dist).to(tl.float32) - lse[None, :]
    p_t = tl.math.exp2(s_t)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=["H", "H_KV", "GROUP", "Lq", "Lk", "past_len", "NB"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, Slopes, QN, LM, KN, VN, GN, CNT,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    H, H_KV, GROUP, Lq, Lk, past_len, qk_scale, scale, NB, gap,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr,
    BND_ROWS: tl.constexpr, COUNT: tl.constexpr, DATA_BOUND: tl.constexpr,
):
    """Rows of every tensor are contiguous in the head dim (stride 1, ensured by the host)."""
    pid_n = tl.program_id(0)  # causal: key block 0 sees every query block, launched first
    pid_bk = tl.program_id(1)
    b = pid_bk // H_KV
    hk = pid_bk % H_KV
    b64 = b.to(tl.int64)
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    c_ok = cols < Lk
    k = tl.load(K + b64 * skb + hk.to(tl.int64) * skh + cols[:, None] * skn + offs_d[None, :],
                mask=c_ok[:, None], other=0.0)
    v = tl.load(V + b64 * svb + hk.to(tl.int64) * svh + cols[:, None] * svn + offs_d[None, :],
                mask=c_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    pos0 = past_len - start_n  # query i sits at i + pos0 from the block's first key

    m_full = Lq // BLOCK_M * BLOCK_M
    if CAUSAL:
        # first query block with a row that sees key start_n; from diag_end on every row of a
        # block sees every key of this block (no causal mask)
        lo = tl.maximum(start_n - past_len, 0) // BLOCK_M * BLOCK_M
        diag_end = tl.maximum(start_n + BLOCK_N - 1 - past_len, 0)
        diag_end = tl.maximum((diag_end + BLOCK_M - 1) // BLOCK_M * BLOCK_M, lo)
    else:
        lo = 0
        diag_end = 0
    # largest |k_j| of this key block, from the delta kernel's per-BND_ROWS maxima
    kblk = start_n // BND_ROWS
    kn = _reduce_row(KN + (b64 * H + hk * GROUP) * NB + kblk,
                     tl.minimum(tl.maximum(BLOCK_N // BND_ROWS, 1), NB - kblk), True)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b64 * H + h
        slope = tl.load(Slopes + h).to(tl.float32) * 1.4426950408889634
        # the query rows that can give this key block a P >= 2^-gap: within w of its keys
        a = tl.abs(qk_scale) * _reduce_row(QN + bh * NB, NB, True) * kn \
            - _reduce_row(LM + bh * NB, NB, False)
        if DATA_BOUND:  # the data's range (see the module docstring)
            a = a + _data_bits(QN + bh * NB, GN + bh * NB, KN + (b64 * H + hk * GROUP) * NB,
                               VN + (b64 * H + hk * GROUP) * NB, NB)
        w = _window(a, slope, gap, Lq + Lk + past_len)
        m_hi = tl.maximum(start_n + BLOCK_N + w - past_len, 0)
        m_hi = tl.minimum((m_hi + BLOCK_M - 1) // BLOCK_M * BLOCK_M, Lq)
        if CAUSAL:
            m_lo = lo
        else:
            m_lo = tl.maximum(start_n - w - past_len, 0) // BLOCK_M * BLOCK_M
        col_b = slope * tl.arange(0, BLOCK_N).to(tl.float32)
        q_src = _row_source(Q + b64 * sqb + h.to(tl.int64) * sqh, Lq, sqm, BLOCK_M, HEAD_DIM, USE_TMA)
        do_src = _row_source(DO + b64 * sdob + h.to(tl.int64) * sdoh, Lq, sdom, BLOCK_M, HEAD_DIM, USE_TMA)
        lse_blk = LSE + bh * Lq
        delta_blk = DELTA + bh * Lq
        for start_m in range(m_lo, tl.minimum(diag_end, m_hi), BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_src, do_src, lse_blk, delta_blk, start_m, offs_m0,
                                cols, col_b, Lq, past_len, pos0, slope, qk_scale, sqm, sdom, offs_d,
                                CAUSAL, True, USE_TMA, DOT_PREC)
        for start_m in range(tl.maximum(diag_end, m_lo), tl.minimum(m_full, m_hi), BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_src, do_src, lse_blk, delta_blk, start_m, offs_m0,
                                cols, col_b, Lq, past_len, pos0, slope, qk_scale, sqm, sdom, offs_d,
                                CAUSAL, False, USE_TMA, DOT_PREC)
        for start_m in range(tl.maximum(tl.maximum(diag_end, m_full), m_lo), m_hi, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_src, do_src, lse_blk, delta_blk, start_m, offs_m0,
                                cols, col_b, Lq, past_len, pos0, slope, qk_scale, sqm, sdom, offs_d,
                                CAUSAL, True, USE_TMA, DOT_PREC)
        if COUNT:  # test / benchmark hook: tiles computed
            tl.atomic_add(CNT, _trips(m_lo, tl.minimum(diag_end, m_hi), BLOCK_M)
                          + _trips(tl.maximum(diag_end, m_lo), tl.minimum(m_full, m_hi), BLOCK_M)
                          + _trips(tl.maximum(tl.maximum(diag_end, m_full), m_lo), m_hi, BLOCK_M))
    dk = dk * scale
    tl.store(DK + b64 * sdkb + hk.to(tl.int64) * sdkh + cols[:, None] * sdkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=c_ok[:, None])
    tl.store(DV + b64 * sdvb + hk.to(tl.int64) * sdvh + cols[:, None] * sdvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=c_ok[:, None])


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_src, v_src, start_n, offs_n, rowpos, q_pos0, Lk, slope,
             qk_scale, skn, svn, offs_d, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
             USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr):
    cols = start_n + offs_n
    k = _load_rows(k_src, start_n, offs_n, skn, offs_d, Lk, USE_TMA, MASKED)
    v = _load_rows(v_src, start_n, offs_n, svn, offs_d, Lk, USE_TMA, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if CAUSAL:  # rank-1 bias: lse holds lse_i + m(i - i0), i0 = q_pos0
        s = s + (slope * (cols - q_pos0).to(tl.float32))[None, :] - lse[:, None]
        if MASKED:
            s = tl.where((cols[None, :] <= rowpos[:, None]) & (cols < Lk)[None, :], s,
                         float("-inf"))
    else:
        dist = cols[None, :] - rowpos[:, None]  # (BLOCK_M, BLOCK_N): j - i, exact
        s = s - slope * tl.abs(dist).to(tl.float32) - lse[:, None]
        if MASKED:
            s = tl.where((cols < Lk)[None, :], s, float("-inf"))
    p = tl.math.exp2(s)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)


@triton.jit(do_not_specialize=["H", "GROUP", "Lq", "Lk", "past_len", "NB"])
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, Slopes, QN, LM, KN, VN, GN, CNT,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
    H, GROUP, Lq, Lk, past_len, qk_scale, scale, NB, gap,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr,
    BND_ROWS: tl.constexpr, COUNT: tl.constexpr, DATA_BOUND: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the longest query blocks (most key tiles) first, for load balance
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    b64 = b.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    r_ok = offs_m < Lq
    rowpos = past_len + offs_m
    slope = tl.load(Slopes + h).to(tl.float32) * 1.4426950408889634
    q = tl.load(Q + b64 * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=r_ok[:, None], other=0.0)
    do = tl.load(DO + b64 * sdob + h.to(tl.int64) * sdoh + offs_m[:, None] * sdom
                 + offs_d[None, :], mask=r_ok[:, None], other=0.0)
    row = pid_bh.to(tl.int64) * Lq + offs_m
    lse = tl.load(LSE + row, mask=r_ok, other=float("inf"))  # rows past Lq: P = 0
    if CAUSAL:  # the row half of the rank-1 bias (see _dq_tile)
        lse = lse + slope * tl.arange(0, BLOCK_M).to(tl.float32)
    delta = tl.load(DELTA + row, mask=r_ok, other=0.0)
    k_src = _row_source(K + b64 * skb + hk.to(tl.int64) * skh, Lk, skn, BLOCK_N, HEAD_DIM, USE_TMA)
    v_src = _row_source(V + b64 * svb + hk.to(tl.int64) * svh, Lk, svn, BLOCK_N, HEAD_DIM, USE_TMA)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    q_pos0 = past_len + start_m
    # the keys this block's rows can give a P >= 2^-gap: within w of [q_pos0, q_pos0 + BLOCK_M)
    nbnd = tl.minimum(tl.maximum(BLOCK_M // BND_ROWS, 1), NB - start_m // BND_ROWS)
    blk = pid_bh.to(tl.int64) * NB + start_m // BND_ROWS
    a = tl.abs(qk_scale) * _reduce_row(QN + blk, nbnd, True) \
        * _reduce_row(KN + (b64 * H + hk * GROUP) * NB, NB, True) - _reduce_row(LM + blk, nbnd, False)
    if DATA_BOUND:  # the data's range (see the module docstring)
        a = a + _data_bits(QN + pid_bh.to(tl.int64) * NB, GN + pid_bh.to(tl.int64) * NB,
                           KN + (b64 * H + hk * GROUP) * NB, VN + (b64 * H + hk * GROUP) * NB, NB)
    w = _window(a, slope, gap, Lq + Lk + past_len)
    lo = tl.maximum(q_pos0 - w, 0) // BLOCK_N * BLOCK_N
    if CAUSAL:  # keys [0, n_full) are visible to every row of the block and in bounds
        n_full = tl.minimum((q_pos0 + 1) // BLOCK_N * BLOCK_N, Lk // BLOCK_N * BLOCK_N)
        hi = tl.minimum(q_pos0 + BLOCK_M, Lk)
    else:
        n_full = Lk // BLOCK_N * BLOCK_N
        hi = tl.minimum(q_pos0 + BLOCK_M + w, Lk)
    for start_n in range(lo, tl.minimum(n_full, hi), BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_src, v_src, start_n, offs_n, rowpos, q_pos0, Lk,
                      slope, qk_scale, skn, svn, offs_d, CAUSAL, False, USE_TMA, DOT_PREC)
    for start_n in range(tl.maximum(n_full, lo), hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_src, v_src, start_n, offs_n, rowpos, q_pos0, Lk,
                      slope, qk_scale, skn, svn, offs_d, CAUSAL, True, USE_TMA, DOT_PREC)
    if COUNT:
        tl.atomic_add(CNT + 1, _trips(lo, tl.minimum(n_full, hi), BLOCK_N)
                      + _trips(tl.maximum(n_full, lo), hi, BLOCK_N))
    dq = dq * scale
    tl.store(DQ + b64 * sdqb + h.to(tl.int64) * sdqh + offs_m[:, None] * sdqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=r_ok[:, None])


@triton.jit(do_not_specialize=["H", "GROUP", "Lq", "Lk", "NB"])
def _bwd_delta_kernel(O, DO, DELTA, Q, K, V, LSE, QN, LM, KN, VN, GN, sob, soh, som, sdob, sdoh, sdom,
                      sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, H, GROUP, Lq, Lk, NB,
                      BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta_i = sum_d dO_id * O_id in fp32, read once from the 16-bit tensors (in torch it took
    fp32 copies of both, several passes over memory); and, per block of BLOCK rows, what the
    backward kernels bound their windows with (see ``_window`` and the module docstring): the
    largest |q_i|, |dO_i| and the smallest lse_i of the block's query rows (``QN``, ``GN``, ``LM``),
    and the largest |k_j|, |v_j| of its key rows (``KN``, ``VN``, in the slot of the group's first
    query head), each (B*H, NB), NB = cdiv(max(Lq, Lk), BLOCK) (rows past Lq or Lk count as |x| = 0,
    lse = inf; a NaN or inf as |x| = inf)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    r_ok = offs_m < Lq
    ok = r_ok[:, None]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=ok,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, delta, mask=r_ok)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=ok,
                other=0.0).to(tl.float32)
    # |k|, |v| once per KV head: the first query head of each group reads them (the only slot read back)
    kv_ok = ((offs_m < Lk) & (h % GROUP == 0))[:, None]
    k = tl.load(K + b * skb + hk * skh + offs_m[:, None] * skn + offs_d[None, :], mask=kv_ok,
                other=0.0).to(tl.float32)
    v = tl.load(V + b * svb + hk * svh + offs_m[:, None] * svn + offs_d[None, :], mask=kv_ok,
                other=0.0).to(tl.float32)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Lq + offs_m, mask=r_ok, other=float("inf"))
    slot = pid_bh.to(tl.int64) * NB + pid_m
    tl.store(QN + slot, _block_norm(q))
    tl.store(GN + slot, _block_norm(do.to(tl.float32)))
    tl.store(LM + slot, tl.min(tl.where(lse != lse, float("-inf"), lse), 0))  # NaN: -inf, window off
    tl.store(KN + slot, _block_norm(k))
    tl.store(VN + slot, _block_norm(v))


@triton.jit
def _data_bits(qn, gn, kn, vn, n):
    """E of the module docstring: 1 + the log2 ranges of |q|, |dO|, |k|, |v| in one (batch, head)."""
    return 1.0 + _range_bits(qn, n) + _range_bits(gn, n) + _range_bits(kn, n) + _range_bits(vn, n)


# Test / benchmark hook: force (BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV kernel then of
# the dQ kernel, 8 ints.
_BWD_CONFIG_OVERRIDE: tuple | None = None
# The dQ kernel runs on a second CUDA stream, concurrently with the dK/dV kernel: +3% fwd+bwd at
# D=64, L 2048-8192, +-1% at D=128 (H200, tools/kernel_notes.md). False: one stream (test hook).
_BWD_CONCURRENT = True


def _bwd_config(head_dim: int, dtype: torch.dtype) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, warps, stages) of the dK/dV kernel, then of the dQ kernel.

    D = 64 and 128: dK/dV on 64x64 tiles, 4 warps, 2 stages (2 stages keep it under 255
    registers: 3 spill; ptxas -v for sm_90), dQ on 128x64 tiles, 8 warps, 3 stages: the fastest
    dK/dV and the fastest dQ choice of the H200 sweep in tools/kernel_notes.md (issue 13 runs 1-2),
    1.13-1.26x the previous defaults' fwd+bwd at L 2048-8192. D < 64 keeps the configs the GPU
    tests covered first (32-query, 128-key dK/dV blocks; dQ 128x64)."""
    if dtype == torch.float32:
        return (32, 64, 4, 2, 64, 32, 4, 2)
    if head_dim >= 64:
        return (64, 64, 4, 2, 128, 64, 8, 3)
    return (32, 128, 8, 3, 128, 64, 8, 3)


# Rows per block of the window bounds the delta kernel stores (max |q|, min lse, max |k|).
_BND_ROWS = 64
# Test / benchmark hook: the window's gap in log2 units (None: skip_gap's rule; inf: skip nothing).
_SKIP_GAP: float | None = None
# Test / benchmark hook: an int32 CUDA tensor of 2 to which the kernels add the tiles they compute
# (dK/dV, dQ).
_TILE_COUNTS: torch.Tensor | None = None
# Test hook: False bounds the window by P alone (|q|, |k| and lse, without the data's range E): the window
# of before, whose skipped terms large values or upstream gradients can make matter (the negative control).
_WINDOW_DATA_BOUND = True


def skip_gap(n_terms: int) -> float:
    """The backward skips the (query, key) tiles where every P is below 2^-(gap + E) (E: the data's
    range, see the module docstring). ``n_terms``: the most terms one gradient element sums
    (max(Lk, GROUP * Lq)); with gap = 32 + log2(n_terms) the skipped terms of an element sum to less
    than 2^-32 of one term at the data's floor scale: below the fp32 rounding of the accumulators
    they would have been added to (2^-24 relative)."""
    if _SKIP_GAP is not None:
        return float(_SKIP_GAP)
    return 32.0 + math.ceil(math.log2(max(n_terms, 2)))


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def alibi_attention_backward(do, q, k, v, out, lse, slopes, *, causal: bool, scale: float,
                             past_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (shapes and dtypes of q, k, v) from the upstream gradient ``do`` and what the
    forward kept: its output ``out`` and ``lse`` ((B*H*Lq,) fp32, log2 units)."""
    B, H, Lq, D = q.shape
    H_kv, Lk = k.shape[1], k.shape[2]
    q, k, v, do, out = (_unit_last(t) for t in (q, k, v, do, out))
    group = H // H_kv
    delta = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)  # rowsum(dO * O)
    nb = triton.cdiv(max(Lq, Lk), _BND_ROWS)
    qn, lm, kn, vn, gn = torch.empty((5, B * H, nb), device=q.device, dtype=torch.float32)  # window bounds
    s3 = lambda t: (t.stride(0), t.stride(1), t.stride(2))  # noqa: E731
    _bwd_delta_kernel[(nb, B * H)](out, do, delta, q, k, v, lse, qn, lm, kn, vn, gn, *s3(out), *s3(do),
                                   *s3(q), *s3(k), *s3(v), H, group, Lq, Lk, nb,
                                   BLOCK=_BND_ROWS, HEAD_DIM=D, num_warps=4)
    gap = skip_gap(max(Lk, group * Lq))
    count = _TILE_COUNTS is not None
    cnt = _TILE_COUNTS if count else lse
    # each gradient in its input's memory order (see triton_alibi.empty_in_layout_of)
    dq = fwd.empty_in_layout_of(q, (B, H, Lq, D))
    dk = fwd.empty_in_layout_of(k, (B, H_kv, Lk, D))
    dv = fwd.empty_in_layout_of(v, (B, H_kv, Lk, D))
    bm1, bn1, w1, st1, bm2, bn2, w2, st2 = _BWD_CONFIG_OVERRIDE or _bwd_config(D, q.dtype)
    prec = "tf32x3" if q.dtype == torch.float32 else "tf32"
    qk_scale = float(scale) * LOG2E
    use_tma = all(fwd._tma_ok(t, t.stride(), q.device) for t in (q, k, v, do))
    if use_tma and not _INTERPRET:
        fwd._ensure_allocator()
    side = None
    if _BWD_CONCURRENT and q.is_cuda:
        main, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
        side.wait_stream(main)  # delta and the inputs are ready; dK/dV (main) and dQ (side) overlap
    _bwd_dkdv_kernel[(triton.cdiv(Lk, bn1), B * H_kv)](
        q, k, v, do, dk, dv, lse, delta, slopes, qn, lm, kn, vn, gn, cnt,
        *s3(q), *s3(k), *s3(v), *s3(do), *s3(dk), *s3(dv),
        H, H_kv, group, Lq, Lk, past_len, qk_scale, float(scale), nb, gap,
        CAUSAL=causal, BLOCK_M=bm1, BLOCK_N=bn1, HEAD_DIM=D, USE_TMA=use_tma, DOT_PREC=prec,
        BND_ROWS=_BND_ROWS, COUNT=count, DATA_BOUND=_WINDOW_DATA_BOUND, num_warps=w1, num_stages=st1,
    )
    if side is not None:
        torch.cuda.set_stream(side)  # cheaper on the host than `with torch.cuda.stream(...)`
    try:
        _bwd_dq_kernel[(triton.cdiv(Lq, bm2), B * H)](
            q, k, v, do, dq, lse, delta, slopes, qn, lm, kn, vn, gn, cnt,
            *s3(q), *s3(k), *s3(v), *s3(do), *s3(dq),
            H, group, Lq, Lk, past_len, qk_scale, float(scale), nb, gap,
            CAUSAL=causal, BLOCK_M=bm2, BLOCK_N=bn2, HEAD_DIM=D, USE_TMA=use_tma, DOT_PREC=prec,
            BND_ROWS=_BND_ROWS, COUNT=count, DATA_BOUND=_WINDOW_DATA_BOUND, num_warps=w2, num_stages=st2,
        )
    finally:
        if side is not None:
            torch.cuda.set_stream(main)
            # Joined before anything else on the main stream: memory the side stream used (all of it
            # allocated on the main stream) is reused only after it is done, so no record_stream.
            main.wait_stream(side)
    return dq, dk, dv


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU, made once: creating a stream per backward costs host time that
    short sequences feel."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return _SIDE_STREAMS[index]


class AlibiAttention(torch.autograd.Function):
    """The fused forward (which also keeps each row's log-sum-exp) and the backward above."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, causal: bool, scale: float, past_len: int, window: bool = False):
        B, H, Lq, D = q.shape
        H_kv, Lk = k.shape[1], k.shape[2]
        out = fwd.empty_in_layout_of(q, (B, H, Lq, D))
        lse = torch.empty((B * H * Lq,), device=q.device, dtype=torch.float32)
        use_tma = fwd._tma_ok(k, k.stride(), q.device) and fwd._tma_ok(v, v.stride(), q.device)
        if use_tma and not _INTERPRET:
            fwd._ensure_allocator()
        fwd._launch_prefill(q, k, v, out, slopes, B, H, H_kv, Lq, Lk, D, past_len, causal, scale,
                            q.stride(), k.stride(), v.stride(), out.stride(), q.device,
                            use_tma=use_tma, lse=lse, window=window)
        ctx.save_for_backward(q, k, v, out, lse, slopes)
        ctx.causal, ctx.scale, ctx.past_len = causal, scale, past_len
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, slopes = ctx.saved_tensors
        dq, dk, dv = alibi_attention_backward(do, q, k, v, out, lse, slopes, causal=ctx.causal,
                                              scale=ctx.scale, past_len=ctx.past_len)
        return dq, dk, dv, None, None, None, None, None


def alibi_attention_train(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes, *,
                          causal: bool = True, scale: float | None = None,
                          past_len: int | None = None, window: bool = False) -> torch.Tensor:
    """Differentiable fused ALiBi attention: the arguments and result of
    :func:`.triton_alibi.alibi_attention`; gradients flow to q, k and v (not to the slopes).
    ``window``: the forward's ALiBi window (opt-in; the backward's own window is always on)."""
    slopes, past_len, scale = fwd._check_inputs(q, k, v, slopes, past_len, scale)
    if q.numel() == 0 or k.numel() == 0:
        return fwd.alibi_attention(q, k, v, slopes, causal=causal, scale=scale, past_len=past_len)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else fwd._nullctx():
        return AlibiAttention.apply(q, k, v, slopes, bool(causal), scale, past_len, bool(window))
