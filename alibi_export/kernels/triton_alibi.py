"""Fused causal ALiBi attention in Triton: the forward kernels (the backward is in triton_alibi_bwd).

    out = softmax(q @ k^T * scale + m_h * (j - i)) @ v          (causal: keys j <= i)
    out = softmax(q @ k^T * scale - m_h * |j - i|) @ v          (causal=False)

Query row i sits at absolute position ``past_len + i`` (``past_len = Lk - Lq`` by default: prefill
with a KV cache, decode with ``Lq == 1``). The bias is computed in the kernel from the slopes and
the positions and never materialised. fp32 accumulation, fp16 / bf16 / fp32 inputs.

Two schedules:

* ``_alibi_fwd_kernel`` (prefill): FA2-style, one program per (query block, batch*head); the
  causal key range is split into off-diagonal tiles (no mask, no bounds checks) and the few
  diagonal tiles (masked). Longest query blocks are launched first (1-D grid, one (batch, head)
  after the other). For short causal programs at head_dim 128 (L <= ~2048) the config switches
  to BLOCK_M 64 so that two CTAs share an SM (see ``_prefill_config``). exp2 with log2(e)
  folded into the scale and the slopes. In causal mode the ALiBi term is applied per *column*,
  ``m_h * (j - i0)`` with ``i0`` the block's first query position: the dropped part
  ``-m_h * (i - i0)`` is constant along a row and cancels in the softmax; ``j - i0`` is an exact
  integer before the single fp32 multiply, so no precision is lost for long sequences. With
  ``window=True`` (opt-in, causal) it runs a block's diagonal tiles first and then skips the far key
  tiles whose share of the output is provably below 2^-32 of an ordinary value (``_launch_prefill``).
* ``_alibi_split_kernel`` + ``_alibi_combine_kernel`` (decode / short queries): flash-decoding.
  The rows of one program are all (query head of the KV group) x (query) pairs, so K/V are read
  once per KV head under GQA/MQA; the key range is split over enough programs to fill the SMs;
  partial (m, l, acc) are merged by the combine kernel.

This module imports triton at import time; ``alibi_export.kernels`` imports it lazily.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter() -> None:
    """Triton 3.6's interpreter converts scalars to Python ints with int(ndarray), which NumPy 2.4
    refuses for 1-element arrays (loop bounds computed in the kernel, as the window's); .item() works
    for both. Applied on import under TRITON_INTERPRET=1 only (CPU tests and dry runs)."""
    import triton.runtime.interpreter as interp

    if getattr(interp, "_alibi_index_patch", False):
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interp._patch_lang_tensor = patched
    interp._alibi_index_patch = True


if _INTERPRET:
    _patch_interpreter()


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
# The ALiBi window's bounds (the forward's below, the backward's in triton_alibi_bwd): row norms per
# block, their reductions, the data's range in bits, and the distance beyond which a weight is negligible.
@triton.jit
def _block_norm(x):
    """The largest row norm of a (rows, HEAD_DIM) fp32 block; inf if any row holds a NaN or an inf
    (tl.max need not propagate NaN): the window bound then turns the window off."""
    n2 = tl.sum(x * x, 1)
    bad = tl.max(((n2 != n2) | (n2 == float("inf"))).to(tl.int32), 0)
    return tl.where(bad > 0, float("inf"), tl.sqrt(tl.max(n2, 0)))


@triton.jit
def _reduce_row(ptr, n, MAX: tl.constexpr):
    """max (MAX) or min of the n floats at ptr, 128 at a time."""
    offs = tl.arange(0, 128)
    if MAX:
        acc = tl.max(tl.load(ptr + offs, mask=offs < n, other=0.0), 0)
    else:
        acc = tl.min(tl.load(ptr + offs, mask=offs < n, other=float("inf")), 0)
    for c in range(128, n, 128):
        if MAX:
            acc = tl.maximum(acc, tl.max(tl.load(ptr + c + offs, mask=c + offs < n, other=0.0), 0))
        else:
            acc = tl.minimum(acc, tl.min(tl.load(ptr + c + offs, mask=c + offs < n,
                                                 other=float("inf")), 0))
    return acc


@triton.jit
def _floor_row(ptr, n):
    """The smallest positive of the n floats at ptr (inf if none), 128 at a time."""
    offs = tl.arange(0, 128)
    x = tl.load(ptr + offs, mask=offs < n, other=float("inf"))
    acc = tl.min(tl.where(x > 0, x, float("inf")), 0)
    for c in range(128, n, 128):
        x = tl.load(ptr + c + offs, mask=c + offs < n, other=float("inf"))
        acc = tl.minimum(acc, tl.min(tl.where(x > 0, x, float("inf")), 0))
    return acc


@triton.jit
def _range_bits(ptr, n):
    """log2(max / floor) of one (batch, head)'s block maxima (0 for all zeros; inf for an inf)."""
    mx = _reduce_row(ptr, n, True)
    return tl.where(mx > 0, tl.log2(mx / _floor_row(ptr, n)), 0.0)


@triton.jit
def _trips(start, end, step):
    """Iterations of range(start, end, step)."""
    return tl.maximum(end - start + step - 1, 0) // step


@triton.jit
def _window(a, slope, gap, cap):
    """How far from its query a key can sit and still get a P of 2^-gap or more: keys more than w
    positions away have ``a - slope * |i - j| < -gap``. An integer in [0, cap].

    ``a`` bounds ``s_ij - lse_i + slope * |i - j|`` (log2 units), i.e. the score without its bias
    minus the row's log-sum-exp, by Cauchy-Schwarz: |qk_scale| * max|q_i| * max|k_j| - min lse_i.
    Every row sees some key, so lse_i is finite. A slope <= 0, an infinite gap (skipping off) or
    a NaN give ``cap`` (callers pass one beyond any distance): nothing is skipped."""
    w = (a + gap) / slope
    ok = (slope > 0) & (w < cap)  # False for NaN
    return tl.where(ok, tl.ceil(tl.where(ok, w, 0.0)), cap.to(tl.float32)).to(tl.int32)


@triton.jit
def _softmax_step(acc, l_i, m_i, s, v, DOT_PREC: tl.constexpr):
    """Fold one tile of log2-unit scores ``s`` and its values ``v`` into the running softmax."""
    m_ij = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_ij


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_src, v_src, start_n, offs_n, rowpos, q_pos0, Lk, slope,
              qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """One key tile of the online softmax. Scores are in log2 units.

    ``k_src``/``v_src``: TMA descriptors of this (batch, kv head) [Lk, D] (rows past Lk read as
    zeros), or pointer tiles already offset to ``start_n``."""
    cols = start_n + offs_n
    if USE_TMA:
        k = k_src.load([start_n, 0])
        v = v_src.load([start_n, 0])
    elif MASKED:
        kv_ok = cols < Lk
        k = tl.load(k_src, mask=kv_ok[:, None], other=0.0)
        v = tl.load(v_src, mask=kv_ok[:, None], other=0.0)
    else:
        k = tl.load(k_src)
        v = tl.load(v_src)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if CAUSAL:
        # column form of the bias (see module docstring)
        cb = slope * (cols - q_pos0).to(tl.float32)
        s = qk * qk_scale + cb[None, :]
        if MASKED:
            ok = (cols[None, :] <= rowpos[:, None]) & (cols[None, :] < Lk)
            s = tl.where(ok, s, float("-inf"))
    else:
        rel = tl.abs(cols[None, :] - rowpos[:, None]).to(tl.float32)
        s = qk * qk_scale - slope * rel
        if MASKED:
            s = tl.where((cols < Lk)[None, :], s, float("-inf"))
    return _softmax_step(acc, l_i, m_i, s, v, DOT_PREC)


@triton.jit
def _fwd_tile_merged(acc, l_i, m_i, q, k_desc, v_desc, start_n, offs_n, rowpos, q_pos0, Lk,
                     n_full, slope, qk_scale, DOT_PREC: tl.constexpr):
    """Causal TMA tile for the single (merged) key loop: the loads are unconditional, so the
    pipeliner prefetches the diagonal tiles during the last off-diagonal ones; only the mask is
    under a (uniform, scalar) branch."""
    cols = start_n + offs_n
    k = k_desc.load([start_n, 0])
    v = v_desc.load([start_n, 0])
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    cb = slope * (cols - q_pos0).to(tl.float32)
    s = qk * qk_scale + cb[None, :]
    if start_n >= n_full:
        ok = (cols[None, :] <= rowpos[:, None]) & (cols[None, :] < Lk)
        s = tl.where(ok, s, float("-inf"))
    return _softmax_step(acc, l_i, m_i, s, v, DOT_PREC)


@triton.jit
def _kv_src(src, start_n, stride, USE_TMA: tl.constexpr):
    """What _fwd_tile reads key tile ``start_n`` from: the TMA descriptor itself, or the pointer tile
    moved to ``start_n``."""
    if USE_TMA:
        return src
    else:
        return src + start_n * stride


@triton.jit
def _fwd_window_lo(qn, m_i, row_ok, kn_ptr, vn_ptr, NB, slope, qk_scale, gap, q_pos0, cap,
                   BLOCK_N: tl.constexpr, DATA_BOUND: tl.constexpr):
    """The first key tile the window keeps (a multiple of BLOCK_N): every tile before it has, for
    every row i of the block, ``s_ij - m_i < -(gap + E)`` (see _launch_prefill's docstring).

    ``qn``: the rows' |q_i| (fp32; taken before the diagonal loop, where the q tile's fp32 copy costs
    no registers: 249 -> 216 per thread at 128x128 / 8 warps, ptxas sm_90a, tools/compile_sm90.py).
    ``m_i``: the rows' running max after the diagonal tiles (column form of the scores, as the
    tiles' ``s``): a lower bound of each row's final max, so of its log-sum-exp. Cauchy-Schwarz:
    s_ij - m_i <= |qk_scale| |q_i| max|k| - m_i + slope * (j - q_pos0). A NaN or inf in q, k or v, a
    row with no key yet (m_i = -inf: with a KV cache, a block whose first row sits just before a
    key tile; safe, merely no skip) or a slope <= 0 give w = cap: nothing skipped."""
    a = tl.abs(qk_scale) * qn * _reduce_row(kn_ptr, NB, True) - m_i
    a = tl.where(a != a, float("inf"), a)  # NaN (q or m_i): off; tl.max need not propagate it
    a = tl.max(tl.where(row_ok, a, float("-inf")), 0)
    if DATA_BOUND:  # E = 1 + log2(max|v| / floor|v|): the data priced in
        a = a + 1.0 + _range_bits(vn_ptr, NB)
    w = _window(a, slope, gap, cap)
    return tl.maximum(q_pos0 - w, 0) // BLOCK_N * BLOCK_N


@triton.jit(do_not_specialize=["H_KV", "Lk", "NB"])
def _kv_bound_kernel(K, V, KN, VN, skb, skh, skn, skd, svb, svh, svn, svd, H_KV, Lk, NB,
                     BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The forward window's pre-pass: the largest |k_j| and |v_j| of each BLOCK rows of each
    (batch, kv head), (B*H_KV, NB) fp32 each (rows past Lk: 0; a NaN or inf: inf). One read of K
    and V."""
    pid_m = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // H_KV).to(tl.int64)
    hk = (pid_bk % H_KV).to(tl.int64)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (offs_m < Lk)[:, None]
    k = tl.load(K + b * skb + hk * skh + offs_m[:, None] * skn + offs_d[None, :] * skd, mask=ok,
                other=0.0).to(tl.float32)
    v = tl.load(V + b * svb + hk * svh + offs_m[:, None] * svn + offs_d[None, :] * svd, mask=ok,
                other=0.0).to(tl.float32)
    slot = pid_bk.to(tl.int64) * NB + pid_m
    tl.store(KN + slot, _block_norm(k))
    tl.store(VN + slot, _block_norm(v))


@triton.jit(do_not_specialize=["H", "GROUP", "Lq", "Lk", "past_len", "num_m_blocks", "BH",
                               "GROUP_BH", "NB"])
def _alibi_fwd_kernel(
    Q, K, V, O, Slopes, LSE, KN, VN, CNT,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    H, GROUP, Lq, Lk, past_len, qk_scale, num_m_blocks, BH, GROUP_BH, NB, gap,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, WARP_SPEC: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr, ORDER: tl.constexpr, MERGE: tl.constexpr,
    STORE_LSE: tl.constexpr, WINDOW: tl.constexpr, DATA_BOUND: tl.constexpr,
    COUNT: tl.constexpr,
):
    # 1-D grid of num_m_blocks * BH programs, launched in program-id order.
    pid = tl.program_id(0)
    if ORDER == 0:
        # one (batch, head) after the other; inside it the longest query blocks first
        pid_bh = pid // num_m_blocks
        pid_m = pid % num_m_blocks
    else:
        # groups of GROUP_BH (batch, head) pairs (K/V of a group stay in L2); inside a group the
        # longest query blocks of all its pairs first (LPT order: short blocks fill the tail)
        per_grp = GROUP_BH * num_m_blocks
        grp = pid // per_grp
        base = grp * GROUP_BH
        g_sz = tl.minimum(GROUP_BH, BH - base)
        r = pid - grp * per_grp
        pid_m = r // g_sz
        pid_bh = base + r % g_sz
    if CAUSAL:
        # longest query blocks (most key tiles) first, for load balance
        pid_m = num_m_blocks - 1 - pid_m
    start_m = pid_m * BLOCK_M
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    b64 = b.to(tl.int64)

    slope = tl.load(Slopes + h).to(tl.float32) * 1.4426950408889634
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_pos0 = past_len + start_m
    rowpos = past_len + offs_m

    q_base = Q + b64 * sqb + h.to(tl.int64) * sqh
    k_base = K + b64 * skb + hk.to(tl.int64) * skh
    v_base = V + b64 * svb + hk.to(tl.int64) * svh
    q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m < Lq)[:, None], other=0.0)
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[Lk, HEAD_DIM], strides=[skn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[Lk, HEAD_DIM], strides=[svn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
    else:
        k_ptrs = k_base + offs_n[:, None] * skn + offs_d[None, :] * skd
        v_ptrs = v_base + offs_n[:, None] * svn + offs_d[None, :] * svd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if CAUSAL:
        # keys [0, n_full) are visible to every row of the block and in bounds
        n_full = (q_pos0 + 1) // BLOCK_N * BLOCK_N
        n_full = tl.minimum(n_full, Lk // BLOCK_N * BLOCK_N)
        hi = tl.minimum(q_pos0 + BLOCK_M, Lk)
    else:
        n_full = Lk // BLOCK_N * BLOCK_N
        hi = Lk
    if WINDOW:
        # the ALiBi window (causal only, see _launch_prefill): the diagonal tiles first, so that
        # each row's running max is a lower bound of its final one; then the off-diagonal tiles
        # from the window's edge lo on (ascending: the loop stays one contiguous range)
        if USE_TMA:
            k_src = k_desc
            v_src = v_desc
        else:
            k_src = k_ptrs
            v_src = v_ptrs
        qf = q.to(tl.float32)
        qn = tl.sqrt(tl.sum(qf * qf, 1))  # |q_i|, for the bound (a NaN or inf: the window off)
        for start_n in range(n_full, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, _kv_src(k_src, start_n, skn, USE_TMA),
                                      _kv_src(v_src, start_n, svn, USE_TMA), start_n, offs_n,
                                      rowpos, q_pos0, Lk, slope, qk_scale, CAUSAL, True, USE_TMA,
                                      DOT_PREC)
        pid_bk = (b64 * (H // GROUP) + hk) * NB
        lo = _fwd_window_lo(qn, m_i, offs_m < Lq, KN + pid_bk, VN + pid_bk, NB, slope, qk_scale,
                            gap, q_pos0, Lq + Lk + past_len, BLOCK_N, DATA_BOUND)
        for start_n in tl.range(lo, n_full, BLOCK_N, warp_specialize=WARP_SPEC):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, _kv_src(k_src, start_n, skn, USE_TMA),
                                      _kv_src(v_src, start_n, svn, USE_TMA), start_n, offs_n,
                                      rowpos, q_pos0, Lk, slope, qk_scale, CAUSAL, False, USE_TMA,
                                      DOT_PREC)
        if COUNT:  # test / benchmark hook: key tiles computed
            tl.atomic_add(CNT, _trips(n_full, hi, BLOCK_N) + _trips(lo, n_full, BLOCK_N))
    elif USE_TMA and MERGE and CAUSAL:
        for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=WARP_SPEC):
            acc, l_i, m_i = _fwd_tile_merged(acc, l_i, m_i, q, k_desc, v_desc, start_n, offs_n,
                                             rowpos, q_pos0, Lk, n_full, slope, qk_scale,
                                             DOT_PREC)
    elif USE_TMA:
        for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WARP_SPEC):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_desc, v_desc, start_n, offs_n, rowpos,
                                      q_pos0, Lk, slope, qk_scale, CAUSAL, False, True, DOT_PREC)
        for start_n in range(n_full, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_desc, v_desc, start_n, offs_n, rowpos,
                                      q_pos0, Lk, slope, qk_scale, CAUSAL, True, True, DOT_PREC)
    else:
        for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WARP_SPEC):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_ptrs + start_n * skn,
                                      v_ptrs + start_n * svn, start_n, offs_n, rowpos, q_pos0, Lk,
                                      slope, qk_scale, CAUSAL, False, False, DOT_PREC)
        for start_n in range(n_full, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_ptrs + start_n * skn,
                                      v_ptrs + start_n * svn, start_n, offs_n, rowpos, q_pos0, Lk,
                                      slope, qk_scale, CAUSAL, True, False, DOT_PREC)

    if COUNT and not WINDOW:
        tl.atomic_add(CNT, _trips(0, hi, BLOCK_N))
    # one reciprocal per row, then multiplies: the per-element divide costs an MUFU op per output
    # element in the epilogue, which nothing overlaps (l_i >= 1: the row max contributes 1)
    out = acc * (1.0 / l_i)[:, None]
    if STORE_LSE:
        # log2-sum-exp2 of the row's true scores (for the backward): the causal column form left
        # out -slope * (i - i0), added back here (|i - i0| < BLOCK_M: no precision lost)
        lse = m_i + tl.math.log2(l_i)
        if CAUSAL:
            lse = lse - slope * (offs_m - start_m).to(tl.float32)
        tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)
    o_ptrs = O + b64 * sob + h.to(tl.int64) * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m < Lq)[:, None])


@triton.jit(do_not_specialize=["H", "H_KV", "GROUP", "Lq", "Lk", "past_len", "split_len",
                               "num_splits"])
def _alibi_split_kernel(
    Q, K, V, O, OP, MP, LP, Slopes,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    H, H_KV, GROUP, Lq, Lk, past_len, qk_scale, split_len, num_splits,
    CAUSAL: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Rows = (head g of the KV group, query i) pairs, r = g * Lq + i; keys of one split."""
    pid_s = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // H_KV
    hk = pid_bk % H_KV
    b64 = b.to(tl.int64)

    r = tl.arange(0, BLOCK_M)
    r_ok = r < GROUP * Lq
    g = r // Lq
    i = r % Lq
    h = hk * GROUP + g
    h = tl.where(r_ok, h, 0)
    slope = tl.load(Slopes + h, mask=r_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    rowpos = past_len + i
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q = tl.load(Q + b64 * sqb + h.to(tl.int64)[:, None] * sqh + i[:, None] * sqm
                + offs_d[None, :] * sqd, mask=r_ok[:, None], other=0.0)
    k_base = K + b64 * skb + hk.to(tl.int64) * skh
    v_base = V + b64 * svb + hk.to(tl.int64) * svh

    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[Lk, HEAD_DIM], strides=[skn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[Lk, HEAD_DIM], strides=[svn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
    n_lo = pid_s * split_len
    n_hi = tl.minimum(n_lo + split_len, Lk)
    if CAUSAL:
        n_hi = tl.minimum(n_hi, past_len + Lq)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        cols = start_n + offs_n
        c_ok = cols < n_hi
        if USE_TMA:  # rows >= Lk read as zeros; rows in [n_hi, Lk) get p = 0 below
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
        else:
            k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :] * skd, mask=c_ok[:, None],
                        other=0.0)
            v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd, mask=c_ok[:, None],
                        other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        rel = cols[None, :] - rowpos[:, None]
        if CAUSAL:
            s = qk * qk_scale + slope[:, None] * rel.to(tl.float32)
            ok = c_ok[None, :] & (rel <= 0)
        else:
            s = qk * qk_scale - slope[:, None] * tl.abs(rel).to(tl.float32)
            ok = c_ok[None, :] & (rel > -2147483647)
        s = tl.where(ok, s, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)  # rows with no key yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_ij

    if SPLIT:
        # partials: (B*H, num_splits, Lq[, D]) fp32, unnormalised
        prow = ((b64 * H + h) * num_splits + pid_s) * Lq + i
        tl.store(MP + prow, m_i, mask=r_ok)
        tl.store(LP + prow, l_i, mask=r_ok)
        tl.store(OP + prow[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=r_ok[:, None])
    else:
        out = acc * (1.0 / l_i)[:, None]
        o_ptrs = O + b64 * sob + h.to(tl.int64)[:, None] * soh + i[:, None] * som \
            + offs_d[None, :] * sod
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=r_ok[:, None])


@triton.jit(do_not_specialize=["H", "Lq", "num_splits"])
def _alibi_combine_kernel(
    O, OP, MP, LP, sob, soh, som, sod, H, Lq, num_splits,
    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    pid = tl.program_id(0)  # (b*H + h) * Lq + i
    bh = pid // Lq
    i = pid % Lq
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < num_splits
    prow = (bh.to(tl.int64) * num_splits + offs_s) * Lq + i
    m = tl.load(MP + prow, mask=s_ok, other=float("-inf"))
    l = tl.load(LP + prow, mask=s_ok, other=0.0)
    acc = tl.load(OP + prow[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)  # finite: split 0 holds key 0, visible to every row
    w = tl.math.exp2(m - m_max)
    w = tl.where(m == float("-inf"), 0.0, w)
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l * w, 0)
    out = num * (1.0 / den)
    o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + i * som + offs_d * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty))


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
_PROPS: dict[int, object] = {}


def _props(device: torch.device):
    """torch's properties of the GPU, asked once per GPU: the query costs 2.5-5 us of host time, and
    the training path needed the compute capability six times per attention call."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PROPS:
        _PROPS[idx] = torch.cuda.get_device_properties(idx)
    return _PROPS[idx]


def _sm_count(device: torch.device) -> int:
    return _props(device).multi_processor_count if device.type == "cuda" else 4


def _prefill_config(head_dim: int, dtype: torch.dtype, q_len: int, kv_len: int | None = None,
                    causal: bool = True):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize); from tools/bench_attention.py
    sweeps on an H100 (see tools/kernel_notes.md)."""
    if dtype == torch.float32:
        return (64, 32, 4, 2, False) if head_dim >= 128 else (64, 64, 4, 2, False)
    if q_len <= 64:
        return (64, 64, 4, 3, False)
    kv_len = q_len if kv_len is None else kv_len
    keys_per_row = kv_len - q_len // 2 if causal else kv_len  # mean visible keys of a query row
    if head_dim >= 128 and keys_per_row < 1536:
        # short programs (causal L <= ~2048): BLOCK_M 64 / 4 warps / 112 KB smem runs 2 CTAs per
        # SM, so one CTA's prologue (Q load, first K/V tiles) and epilogue overlap the other's
        # loop; 128x128 / 8 warps needs 225 KB smem and 240 registers: 1 CTA per SM
        return (64, 64, 4, 3, False)
    if head_dim >= 128:
        return (128, 128, 8, 3, False)
    if head_dim == 64:
        return (128, 64, 4, 3, False)
    return (128, 64, 4, 3, False)


# Test / benchmark hook: force the prefill kernel and its config
# (BLOCK_M, BLOCK_N, num_warps, num_stages[, warp_specialize, order, merge, maxnreg]);
# missing trailing fields take _CFG_DEFAULTS. order: 0 = (batch, head) pairs one after the other,
# 1 = LPT inside groups of pairs; merge: one pipelined key loop with the diagonal mask under a
# branch (TMA + causal only); maxnreg: register cap per thread (0 = none).
_CONFIG_OVERRIDE: tuple | None = None
_CFG_DEFAULTS = (128, 64, 4, 3, False, 0, False, 0)


def _decode_config(head_dim: int, dtype: torch.dtype, rows: int) -> tuple[int, int, int, int]:
    block_m = max(16, triton.next_power_of_2(rows))
    if dtype == torch.float32:
        return block_m, 32, 4, 2
    if head_dim >= 128:
        return block_m, 64, 4, 3
    return block_m, 128, 4, 3


_DECODE_MAX_ROWS = 64
# Test / benchmark hook: None = automatic, False = never use TMA descriptors.
_TMA_OVERRIDE: bool | None = None


def _tma_ok(t, strides, device) -> bool:
    """TMA needs sm_90+, a 16-byte aligned base, unit last stride, 16-byte aligned other strides."""
    if _TMA_OVERRIDE is not None:
        return _TMA_OVERRIDE
    if device.type != "cuda":
        return False
    if _props(device).major < 9:
        return False
    es = t.dtype.itemsize
    return (t.data_ptr() % 16 == 0 and strides[3] == 1
            and all((s * es) % 16 == 0 for s in strides[:3]))


def _ensure_allocator() -> None:
    # device-side tensor descriptors need a small global scratch buffer per launch
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(
            lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _launch(q, k, v, out, slopes, B, H, H_kv, Lq, Lk, D, past_len, causal, scale,
            q_strides, k_strides, v_strides, o_strides, device, window=False):
    """Pick a schedule and launch on torch's current stream. All checks done by callers.
    ``window``: the prefill kernel's ALiBi window (see _launch_prefill); decode ignores it."""
    group = H // H_kv
    qk_scale = float(scale) * LOG2E
    use_tma = _tma_ok(k, k_strides, device) and _tma_ok(v, v_strides, device)
    if use_tma and not _INTERPRET:
        _ensure_allocator()
    # fp32 inputs: 3-pass TF32 (error ~1e-6) instead of plain TF32 (~1e-3 relative here)
    prec = "tf32x3" if q.dtype == torch.float32 else "tf32"
    rows = group * Lq
    if rows <= _DECODE_MAX_ROWS and _CONFIG_OVERRIDE is None:
        block_m, block_n, warps, stages = _decode_config(D, q.dtype, rows)
        eff = min(Lk, past_len + Lq) if causal else Lk
        eff = max(eff, 1)
        n_prog = B * H_kv
        want = -(-4 * _sm_count(device) // n_prog)
        max_splits = -(-eff // 128)
        splits = max(1, min(want, max_splits, 256))
        split_len = -(-eff // splits)
        split_len = -(-split_len // block_n) * block_n
        splits = -(-eff // split_len)
        if splits > 1:
            op = torch.empty((B * H * splits * Lq * D,), device=device, dtype=torch.float32)
            mp = torch.empty((B * H * splits * Lq,), device=device, dtype=torch.float32)
            lp = torch.empty_like(mp)
        else:
            op = mp = lp = out  # unused
        _alibi_split_kernel[(splits, B * H_kv)](
            q, k, v, out, op, mp, lp, slopes,
            *q_strides, *k_strides, *v_strides, *o_strides,
            H, H_kv, group, Lq, Lk, past_len, qk_scale, split_len, splits,
            CAUSAL=causal, SPLIT=splits > 1, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D,
            USE_TMA=use_tma, DOT_PREC=prec, num_warps=warps, num_stages=stages,
        )
        if splits > 1:
            _alibi_combine_kernel[(B * H * Lq,)](
                out, op, mp, lp, *o_strides, H, Lq, splits,
                BLOCK_S=max(2, triton.next_power_of_2(splits)), HEAD_DIM=D, num_warps=4,
            )
        return out
    return _launch_prefill(q, k, v, out, slopes, B, H, H_kv, Lq, Lk, D, past_len, causal, scale,
                           q_strides, k_strides, v_strides, o_strides, device, use_tma=use_tma,
                           window=window)


def _launch_prefill(q, k, v, out, slopes, B, H, H_kv, Lq, Lk, D, past_len, causal, scale,
                    q_strides, k_strides, v_strides, o_strides, device, *, use_tma, lse=None,
                    window=False):
    """The FA2-style prefill kernel; with ``lse`` (B*H*Lq fp32) it also stores each row's log2
    sum-exp2 of the scores, which the backward (triton_alibi_bwd) needs.

    ``window`` (causal only; opt-in until measured on a GPU): the ALiBi window. A key tile is not
    computed when, for every row i of the query block, every score satisfies
    ``s_ij - m_i < -(gap + E)`` (log2 units), with m_i the row's running max after its diagonal
    tiles (computed first; a lower bound of its final max and so of its log-sum-exp lse_i), gap =
    32 + log2(Lk) (window_gap) and E = 1 + log2(V / v_): V the largest |v_j| of the (batch, kv
    head), v_ its floor, the smallest nonzero maximum over its 64-row blocks. Then each skipped
    weight p_ij = 2^(s_ij - lse_i) < 2^-(gap + E), their sum l_i < Lk 2^-(gap + E) = 2^-(32 + E),
    and with the weights normalized (the kept output o' = (o - sum_skipped p_ij v_j) / (1 - l_i)),
    for every output element

        |o'_id - o_id| <= 2 l_i V < 2^-31 2^-E V = 2^-32 v_          (2^-E = v_ / (2 V)):

    less than 2^-32 of an ordinary value (v_), below the fp32 rounding (2^-24) of the accumulator
    it would have gone into. The stored lse misses l_i < 2^-32 of its sum (the backward recomputes
    P from it; every kept tile is computed exactly as without the window).
    Large values far away widen the window (by E / slope positions) instead of hiding in it.
    Cauchy-Schwarz bounds the scores: s_ij - m_i <= |qk_scale| |q_i| K - m_i + slope (j - i0), K
    the largest |k_j| of the (batch, kv head). Since the ALiBi term falls with distance and the
    other terms do not depend on j, the skipped tiles are a prefix [0, lo) of the key range: the
    loop stays one contiguous range. K, V and v_ come from a pre-pass (_kv_bound_kernel: one read
    of K and V, two (B*H_kv, cdiv(Lk, 64)) fp32 arrays). A slope <= 0, any NaN or inf in q, k or v
    (or a norm that overflows fp32), or causal=False: every tile computed."""
    qk_scale = float(scale) * LOG2E
    prec = "tf32x3" if q.dtype == torch.float32 else "tf32"
    cfg = tuple(_CONFIG_OVERRIDE or _prefill_config(D, q.dtype, Lq, Lk, causal))
    cfg = cfg + _CFG_DEFAULTS[len(cfg):]
    block_m, block_n, warps, stages, ws, order, merge, maxnreg = cfg
    num_m = triton.cdiv(Lq, block_m)
    # ORDER 1: LPT inside groups of (batch, head) pairs holding about one wave of programs
    group_bh = max(1, -(-_sm_count(device) // num_m)) if order == 1 else 1
    extra = {"maxnreg": int(maxnreg)} if maxnreg else {}
    window = bool(window) and bool(causal)
    lse_arg = out if lse is None else lse
    kn = vn = lse_arg  # unused without the window
    nb = triton.cdiv(Lk, _BND_ROWS)
    if window:
        kn, vn = torch.empty((2, B * H_kv, nb), device=device, dtype=torch.float32)
        _kv_bound_kernel[(nb, B * H_kv)](k, v, kn, vn, *k_strides, *v_strides, H_kv, Lk, nb,
                                         BLOCK=_BND_ROWS, HEAD_DIM=D, num_warps=4)
    count = _TILE_COUNTS is not None
    _alibi_fwd_kernel[(num_m * B * H,)](
        q, k, v, out, slopes, lse_arg, kn, vn, _TILE_COUNTS if count else lse_arg,
        *q_strides, *k_strides, *v_strides, *o_strides,
        H, H // H_kv, Lq, Lk, past_len, qk_scale, num_m, B * H, group_bh, nb, window_gap(Lk),
        CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D, WARP_SPEC=bool(ws),
        USE_TMA=use_tma, DOT_PREC=prec, ORDER=int(order), MERGE=bool(merge),
        STORE_LSE=lse is not None, WINDOW=window, DATA_BOUND=_WINDOW_DATA_BOUND, COUNT=count,
        num_warps=warps, num_stages=stages, **extra,
    )
    return out


# Rows per block of the window's pre-pass maxima (|k|, |v|).
_BND_ROWS = 64
# Test / benchmark hook: the forward window's gap in log2 units (None: window_gap's rule).
_SKIP_GAP: float | None = None
# Test / benchmark hook: an int32 tensor of 1 to which the prefill kernel adds the key tiles it
# computes (a constexpr branch: compiled out otherwise).
_TILE_COUNTS: torch.Tensor | None = None
# Test hook: False bounds the forward window by P alone, without the values' range E (the negative
# control: a far value large enough makes a skipped P matter).
_WINDOW_DATA_BOUND = True


def window_gap(n_terms: int) -> float:
    """The window skips a tile where every weight is below 2^-(gap + E); ``n_terms``: the most terms
    one sum holds (keys per row in the forward; max(Lk, GROUP * Lq) in the backward). gap = 32 +
    log2(n_terms): the skipped terms of a sum stay below 2^-32 of one ordinary term."""
    if _SKIP_GAP is not None:
        return float(_SKIP_GAP)
    return 32.0 + math.ceil(math.log2(max(n_terms, 2)))


def _check_head_dim(D: int) -> None:
    if D not in (16, 32, 64, 128):
        raise ValueError(f"alibi_attention: head_dim must be one of 16, 32, 64, 128, got {D}")


def alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, *,
                    causal: bool = True, scale: float | None = None,
                    past_len: int | None = None, out: torch.Tensor | None = None,
                    window: bool = False) -> torch.Tensor:
    """Fused ALiBi attention. q: (B, H, Lq, D); k, v: (B, H_kv, Lk, D), any strides.

    ``slopes``: (H,) per-query-head slopes (e.g. ``torch.tensor(alibi_slopes(H))``), cast to fp32.
    Query i has absolute position ``past_len + i``; ``past_len`` defaults to ``Lk - Lq``.
    ``scale`` defaults to ``1/sqrt(D)``. Returns (B, H, Lq, D) in q's dtype (or writes ``out``).
    Forward only (no autograd graph); ``alibi_attention_train`` has the backward.
    ``window=True`` (causal prefill only; off by default until timed on a GPU) skips the key tiles
    whose contribution is provably below 2^-32 of an ordinary value (see ``_launch_prefill``).
    """
    slopes, past_len, scale = _check_inputs(q, k, v, slopes, past_len, scale)
    B, H, Lq, D = q.shape
    H_kv, Lk = k.shape[1], k.shape[2]
    if out is None:
        out = empty_in_layout_of(q, (B, H, Lq, D))
    elif tuple(out.shape) != (B, H, Lq, D) or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"alibi_attention: out must be {(B, H, Lq, D)} {q.dtype} on {q.device}")
    if B == 0 or H == 0 or Lq == 0:
        return out
    with torch.cuda.device(q.device) if q.device.type == "cuda" else _nullctx():
        _launch(q, k, v, out, slopes, B, H, H_kv, Lq, Lk, D, past_len, bool(causal), scale,
                q.stride(), k.stride(), v.stride(), out.stride(), q.device, window=bool(window))
    return out


def _check_inputs(q, k, v, slopes, past_len, scale):
    """Validate shapes, dtypes, devices; return (fp32 contiguous slopes, past_len, scale)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"alibi_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"alibi_attention: {name} must be 4-D (B, H, L, D), got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in _SUPPORTED:
            raise ValueError(f"alibi_attention: {name} dtype must be float16, bfloat16 or float32, "
                             f"got {t.dtype}")
        if t.device.type != "cuda" and not _INTERPRET:
            raise ValueError(f"alibi_attention: {name} must be on a CUDA device, got {t.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"alibi_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"alibi_attention: q, k, v must be on one device, got {q.device}, "
                         f"{k.device}, {v.device}")
    B, H, Lq, D = q.shape
    Bk, H_kv, Lk, Dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"alibi_attention: k and v shapes differ: {tuple(k.shape)} vs "
                         f"{tuple(v.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(f"alibi_attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on "
                         f"batch or head_dim")
    if H_kv < 1 or H % H_kv != 0:
        raise ValueError(f"alibi_attention: query heads ({H}) must be a multiple of kv heads "
                         f"({H_kv})")
    _check_head_dim(D)
    if Lk < 1:
        raise ValueError("alibi_attention: kv_len must be >= 1")
    if past_len is None:
        past_len = Lk - Lq
        if past_len < 0:
            raise ValueError(f"alibi_attention: q_len ({Lq}) > kv_len ({Lk}); pass past_len "
                             f"explicitly")
    if int(past_len) < 0:
        raise ValueError(f"alibi_attention: past_len must be >= 0, got {past_len}")
    past_len = int(past_len)
    if not isinstance(slopes, torch.Tensor):
        slopes = torch.tensor(list(slopes), dtype=torch.float32)
    if slopes.numel() != H:
        raise ValueError(f"alibi_attention: need one slope per query head ({H}), got "
                         f"{slopes.numel()}")
    slopes = slopes.reshape(H).to(device=q.device, dtype=torch.float32).contiguous()
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    return slopes, past_len, float(scale)


def empty_in_layout_of(t: torch.Tensor, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new (B, H, L, D) tensor stored in ``t``'s memory order: positions outside heads, (B, L, H, D), when
    ``t`` is the model's head view of a (B, L, H * D) projection, else contiguous. The caller's
    transpose back to (B, L, H * D) is then a view, not a copy (one per output per layer otherwise:
    about 2% of a training step of the 12-layer d768 model at 2048 tokens, by profile)."""
    B, H, L, D = shape
    dtype = t.dtype if dtype is None else dtype
    if t.dim() == 4 and t.shape[1] > 1 and t.shape[2] > 1 and t.stride(1) < t.stride(2):
        return torch.empty((B, L, H, D), device=t.device, dtype=dtype).transpose(1, 2)
    return torch.empty(shape, device=t.device, dtype=dtype)


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


class _DevicePtr:
    """A raw device pointer that Triton accepts as a tensor argument (data_ptr() and dtype)."""

    __slots__ = ("ptr", "dtype")

    def __init__(self, ptr: int, dtype: torch.dtype):
        self.ptr = int(ptr)
        self.dtype = dtype

    def data_ptr(self) -> int:
        return self.ptr


_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def launch_alibi_attention(q_ptr: int, k_ptr: int, v_ptr: int, out_ptr: int, slopes_ptr: int, *,
                           batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int,
                           head_dim: int, past_len: int | None = None,
                           dtype: torch.dtype | str = torch.float16, stream: int = 0,
                           causal: bool = True, scale: float | None = None,
                           device: int | None = None) -> None:
    """Pointer-level launch for a TensorRT plugin: contiguous q (B,H,Lq,D), k/v (B,H_kv,Lk,D),
    out (B,H,Lq,D) of ``dtype``; slopes (H,) float32; all raw device pointers (int). Launches on
    the CUDA stream handle ``stream`` (int, 0 = legacy default) of device ``device`` (default:
    current). Asynchronous. The split-KV decode path allocates a small fp32 workspace through
    PyTorch's caching allocator.
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"launch_alibi_attention: unknown dtype {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype not in _SUPPORTED:
        raise ValueError(f"launch_alibi_attention: dtype must be float16, bfloat16 or float32, "
                         f"got {dtype}")
    for name, val in (("batch", batch), ("heads", heads), ("kv_heads", kv_heads),
                      ("q_len", q_len), ("kv_len", kv_len)):
        if int(val) < 1:
            raise ValueError(f"launch_alibi_attention: {name} must be >= 1, got {val}")
    if heads % kv_heads:
        raise ValueError(f"launch_alibi_attention: heads ({heads}) must be a multiple of kv_heads "
                         f"({kv_heads})")
    _check_head_dim(head_dim)
    for name, p in (("q_ptr", q_ptr), ("k_ptr", k_ptr), ("v_ptr", v_ptr), ("out_ptr", out_ptr),
                    ("slopes_ptr", slopes_ptr)):
        if not int(p):
            raise ValueError(f"launch_alibi_attention: {name} is null")
    if past_len is None:
        past_len = kv_len - q_len
    if past_len < 0:
        raise ValueError(f"launch_alibi_attention: past_len must be >= 0, got {past_len}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    B, H, Hk, Lq, Lk, D = batch, heads, kv_heads, q_len, kv_len, head_dim
    dev = torch.device("cuda", torch.cuda.current_device() if device is None else device)
    q = _DevicePtr(q_ptr, dtype)
    k = _DevicePtr(k_ptr, dtype)
    v = _DevicePtr(v_ptr, dtype)
    o = _DevicePtr(out_ptr, dtype)
    s = _DevicePtr(slopes_ptr, torch.float32)
    with torch.cuda.device(dev), torch.cuda.stream(torch.cuda.ExternalStream(int(stream), device=dev)):
        _launch(q, k, v, o, s, B, H, Hk, Lq, Lk, D, int(past_len), bool(causal), scale,
                (H * Lq * D, Lq * D, D, 1), (Hk * Lk * D, Lk * D, D, 1),
                (Hk * Lk * D, Lk * D, D, 1), (H * Lq * D, Lq * D, D, 1), dev)
