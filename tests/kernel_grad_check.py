"""Gradient check of the fused ALiBi attention: kernel, SDPA with a materialized bias, and a float64
reference of the same formula, on the same inputs.

Imported by tests/test_kernels_bwd.py (GPU), and run as a script under TRITON_INTERPRET=1 on CPU
(``python tests/kernel_grad_check.py [--spikes]``): Triton's interpreter executes the kernels with numpy, so
the CPU suite checks the kernels' index and mask logic on tiny shapes (fp16 and fp32 only: the
interpreter has no bfloat16 arithmetic). Prints one JSON line per case.
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.nn.functional as F

if __name__ == "__main__":  # run as a script from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alibi_export.alibi import alibi_bias, alibi_slopes  # noqa: E402

NAMES = ("out", "dq", "dk", "dv")


def make_inputs(B, H, Hk, Lq, Lk, D, dtype, device, seed):
    g = torch.Generator(device).manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, device=device, dtype=dtype, generator=g)
               for h, n in ((H, Lq), (Hk, Lk), (Hk, Lk)))
    do = torch.randn(B, H, Lq, D, device=device, dtype=dtype, generator=g)
    slopes = torch.tensor(alibi_slopes(H), dtype=torch.float32, device=device)
    return q, k, v, do, slopes


def _grads(fn, q, k, v, do, dtype=None):
    q, k, v = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def _dense(q, k, v, slopes, causal, past_len, sdpa):
    """softmax(q k^T / sqrt(D) + ALiBi) v with K/V repeated over each query head group."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    bias = alibi_bias(slopes, q.shape[2], k.shape[2], past_len=past_len, causal=causal,
                      dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    if sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    return torch.softmax(s, -1) @ v


def reference(q, k, v, do, slopes, causal, past_len):
    """float64 out, dq, dk, dv from the same (rounded) inputs."""
    return _grads(lambda a, b, c: _dense(a, b, c, slopes.double(), causal, past_len, False),
                  q, k, v, do.double(), torch.float64)


def sdpa(q, k, v, do, slopes, causal, past_len):
    """PyTorch SDPA with the bias materialized in the inputs' dtype (what BLOOM/MPT training does)."""
    return _grads(lambda a, b, c: _dense(a, b, c, slopes, causal, past_len, True), q, k, v, do)


def kernel(q, k, v, do, slopes, causal, past_len):
    from alibi_export.kernels import alibi_attention

    return _grads(lambda a, b, c: alibi_attention(a, b, c, slopes, causal=causal, past_len=past_len),
                  q, k, v, do)


def rel_errors(got, ref) -> dict[str, float]:
    """||got - ref|| / ||ref|| for out, dq, dk, dv."""
    return {n: ((a.double() - b).norm() / b.norm()).item() for n, a, b in zip(NAMES, got, ref)}


def compare(B, H, Hk, Lq, Lk, D, dtype, causal=True, past_len=None, device="cuda", seed=0,
            with_sdpa=True, slope_factor=1.0):
    """Errors of the kernel (and of SDPA) against float64. ``slope_factor`` != 1 runs the kernel
    with wrong slopes: the negative control."""
    past = Lk - Lq if past_len is None else past_len
    q, k, v, do, slopes = make_inputs(B, H, Hk, Lq, Lk, D, dtype, device, seed)
    ref = reference(q, k, v, do, slopes, causal, past)
    res = {"shape": [B, H, Hk, Lq, Lk, D], "dtype": str(dtype)[6:], "causal": causal,
           "past_len": past, "seed": seed,
           "kernel": rel_errors(kernel(q, k, v, do, slopes * slope_factor, causal, past), ref)}
    if with_sdpa:
        res["sdpa"] = rel_errors(sdpa(q, k, v, do, slopes, causal, past), ref)
    return res


def _window_run(q, k, v, do, slopes, causal, past_len, gap):
    """The kernel's (out, dq, dk, dv) with the backward window's gap forced to ``gap`` (inf: no
    tile skipped), and the (dK/dV, dQ) tiles it computed."""
    from alibi_export.kernels import triton_alibi_bwd as kb

    kb._SKIP_GAP, kb._TILE_COUNTS = gap, torch.zeros(2, dtype=torch.int32, device=q.device)
    try:
        got = kernel(q, k, v, do, slopes, causal, past_len)
        return got, kb._TILE_COUNTS.tolist()
    finally:
        kb._SKIP_GAP, kb._TILE_COUNTS = None, None


def window_check(B, H, Hk, Lq, Lk, D, dtype, causal=True, past_len=None, device="cuda", seed=0,
                 slope_scale=1.0, cut_gap=-32.0):
    """The backward's ALiBi window against the full computation on the same inputs: the tiles each
    computed, and max |difference| / max |full| of out, dq, dk, dv, for the default window and for
    one cut short (gap ``cut_gap``: the negative control)."""
    past = Lk - Lq if past_len is None else past_len
    q, k, v, do, slopes = make_inputs(B, H, Hk, Lq, Lk, D, dtype, device, seed)
    slopes = slopes * slope_scale
    full, n_full = _window_run(q, k, v, do, slopes, causal, past, float("inf"))
    win, n_win = _window_run(q, k, v, do, slopes, causal, past, None)
    cut, _ = _window_run(q, k, v, do, slopes, causal, past, cut_gap)
    diff = lambda a, b: ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()  # noqa: E731
    return {"shape": [B, H, Hk, Lq, Lk, D], "dtype": str(dtype)[6:], "causal": causal,
            "past_len": past, "seed": seed, "slope_scale": slope_scale,
            "tiles": n_win, "tiles_full": n_full,
            "diff": {n: diff(a, b) for n, a, b in zip(NAMES, win, full)},
            "diff_cut": {n: diff(a, b) for n, a, b in zip(NAMES, cut, full)}}


def nan_check(B, H, Hk, Lq, Lk, D, dtype, causal=True, past_len=None, device="cuda", seed=0, slope_scale=1.0,
              bad=float("nan")):
    """One ``bad`` value (NaN or inf) in v and one in dO of every (batch, head): the window, decided per
    (batch, head), must turn itself off in each (every tile computed, as with no window) so the gradients
    are those of the full computation, NaNs included."""
    past = Lk - Lq if past_len is None else past_len
    q, k, v, do, slopes = make_inputs(B, H, Hk, Lq, Lk, D, dtype, device, seed)
    v[:, :, Lk // 3, 0], do[:, :, Lq // 2, 1] = bad, bad
    slopes = slopes * slope_scale
    full, n_full = _window_run(q, k, v, do, slopes, causal, past, float("inf"))
    win, n_win = _window_run(q, k, v, do, slopes, causal, past, None)
    same = all(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
               for a, b in zip(win, full))
    return {"shape": [B, H, Hk, Lq, Lk, D], "dtype": str(dtype)[6:], "bad": str(bad), "tiles": n_win,
            "tiles_full": n_full, "same": same}


def _forward_with_lse(q, k, v, slopes, causal, past_len):
    """The fused forward's output and its rows' log-sum-exp (log2 units), what the backward reads."""
    from alibi_export.kernels import triton_alibi as fwd

    B, H, Lq, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B * H * Lq,), device=q.device, dtype=torch.float32)
    slopes = slopes.to(device=q.device, dtype=torch.float32).contiguous()
    fwd._launch_prefill(q, k, v, out, slopes, B, H, k.shape[1], Lq, k.shape[2], D, past_len, causal, D ** -0.5,
                        q.stride(), k.stride(), v.stride(), out.stride(), q.device, use_tma=False, lse=lse)
    return out, lse


def row_rel(a, b) -> float:
    """max over rows (the last dim) of ||a_r - b_r|| / ||b_r||: a change in one row shows however
    small that row is against the tensor's largest."""
    a, b = a.double(), b.double()
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-300)).max().item()


def spike_check(B, H, Hk, Lq, Lk, D, dtype, causal=True, past_len=None, device="cuda", seed=0,
                slope_scale=1.0, spike=1e12, n_spikes=2, q_scale=0.01):
    """The window with values and upstream gradients that are ``spike`` times larger in a few rows
    (v: ``n_spikes`` key rows per KV head; dO: as many query rows per head), against the full
    computation: row-relative differences (``row_rel``) of dq, dk, dv for the window (``diff``) and
    for the window bounded by P alone (``diff_p_only``: the window of before, the negative control),
    and the tiles each computed. q is scaled by ``q_scale``: with small scores the Cauchy-Schwarz
    term of the bound is small, so the P just past the window sit near its bound 2^-gap, where a
    spike of 1e12 (2^40) makes them count."""
    from alibi_export.kernels import triton_alibi_bwd as kb

    past = Lk - Lq if past_len is None else past_len
    q, k, v, do, slopes = make_inputs(B, H, Hk, Lq, Lk, D, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    scale = lambda n, m: torch.ones(n, m).index_put_(  # noqa: E731
        (torch.arange(n).repeat_interleave(n_spikes), torch.randint(0, m, (n * n_spikes,), generator=g)),
        torch.tensor(spike))
    v = v * scale(B * Hk, Lk).view(B, Hk, Lk, 1).to(device=device, dtype=dtype)
    do = do * scale(B * H, Lq).view(B, H, Lq, 1).to(device=device, dtype=dtype)
    slopes, q = slopes * slope_scale, q * q_scale
    out, lse = _forward_with_lse(q, k, v, slopes, causal, past)  # once: the three backwards share it

    def backward(gap, data_bound=True):
        kb._SKIP_GAP, kb._TILE_COUNTS = gap, torch.zeros(2, dtype=torch.int32, device=q.device)
        kb._WINDOW_DATA_BOUND = data_bound
        try:
            grads = kb.alibi_attention_backward(do, q, k, v, out, lse, slopes, causal=causal,
                                                scale=q.shape[-1] ** -0.5, past_len=past)
            return (out, *grads), kb._TILE_COUNTS.tolist()
        finally:
            kb._SKIP_GAP, kb._TILE_COUNTS, kb._WINDOW_DATA_BOUND = None, None, True

    full, n_full = backward(float("inf"))
    win, n_win = backward(None)
    old, n_old = backward(None, data_bound=False)
    return {"shape": [B, H, Hk, Lq, Lk, D], "dtype": str(dtype)[6:], "causal": causal, "past_len": past,
            "seed": seed, "slope_scale": slope_scale, "spike": spike,
            "tiles": n_win, "tiles_p_only": n_old, "tiles_full": n_full,
            "finite": all(bool(torch.isfinite(t).all()) for t in full),
            "diff": {n: row_rel(a, b) for n, a, b in zip(NAMES, win, full)},
            "diff_p_only": {n: row_rel(a, b) for n, a, b in zip(NAMES, old, full)}}


def _patch_interpreter() -> None:
    """The interpreter's NumPy 2.4 fix (triton_alibi._patch_interpreter, applied on its import under
    TRITON_INTERPRET=1)."""
    from alibi_export.kernels import triton_alibi

    triton_alibi._patch_interpreter()


# Tiny shapes for the interpreter: GQA and MQA, causal and not, a KV cache (past_len), lengths
# that are not multiples of any block size, every head size the kernels take.
INTERPRET_CASES = [
    dict(B=1, H=4, Hk=2, Lq=70, Lk=70, D=16, dtype=torch.float16),
    dict(B=2, H=2, Hk=1, Lq=37, Lk=50, D=32, dtype=torch.float16, causal=False),
    dict(B=1, H=3, Hk=3, Lq=20, Lk=90, D=64, dtype=torch.float16, past_len=30),
    dict(B=1, H=2, Hk=2, Lq=129, Lk=129, D=128, dtype=torch.float32),
    dict(B=1, H=2, Hk=1, Lq=260, Lk=260, D=32, dtype=torch.float16),  # several dQ/dK blocks
]


# The backward's window on tiny shapes: slopes 64x the standard ones (steep heads) so that it
# skips tiles at these lengths; causal and not, GQA, a KV cache.
WINDOW_CASES = [
    dict(B=1, H=2, Hk=1, Lq=260, Lk=260, D=32, dtype=torch.float32, slope_scale=64.0),
    dict(B=1, H=4, Hk=2, Lq=200, Lk=260, D=16, dtype=torch.float16, past_len=60, slope_scale=64.0),
    dict(B=1, H=2, Hk=2, Lq=150, Lk=200, D=16, dtype=torch.float32, causal=False, past_len=50,
         slope_scale=64.0),
]


# The window with v and dO spiked 1e12 in a few rows (fp32: no overflow), under the interpreter: a shallow
# head (slope 2^-4, w ~ 460 keys before its data term) beside a steep one (slope 1, which still skips tiles
# with it), at 1024 tokens so that the shallow head's skipped tiles start at its window's edge; 128-key
# blocks keep the interpreter's tile count down (~30 s on 2 cores).
SPIKE_CASE = dict(B=1, H=2, Hk=1, Lq=1024, Lk=1024, D=16, dtype=torch.float32, slope_scale=16.0, n_spikes=2)
SPIKE_BLOCKS = (64, 128, 4, 2, 128, 64, 4, 2)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    _patch_interpreter()
    if sys.argv[1:] == ["--spikes"]:
        from alibi_export.kernels import triton_alibi_bwd as kb

        kb._BWD_CONFIG_OVERRIDE = SPIKE_BLOCKS
        print(json.dumps({**spike_check(**SPIKE_CASE, device="cpu"), "spikes": True}), flush=True)
        return
    from alibi_export.kernels import triton_alibi

    for case in INTERPRET_CASES:
        print(json.dumps(compare(**case, device="cpu", with_sdpa=False)), flush=True)
    try:  # the TMA-descriptor loads (the path taken on sm_90+ with aligned strides)
        triton_alibi._TMA_OVERRIDE = True
        for case in INTERPRET_CASES[:2]:
            print(json.dumps({**compare(**case, device="cpu", with_sdpa=False), "tma": True}),
                  flush=True)
    finally:
        triton_alibi._TMA_OVERRIDE = None
    bad = dict(INTERPRET_CASES[0], slope_factor=0.5)  # negative control: wrong slopes
    print(json.dumps({**compare(**bad, device="cpu", with_sdpa=False), "control": True}), flush=True)
    for case in WINDOW_CASES:
        print(json.dumps({**window_check(**case, device="cpu"), "window": True}), flush=True)
    print(json.dumps({**nan_check(**WINDOW_CASES[0], device="cpu"), "nan": True}), flush=True)


if __name__ == "__main__":
    main()
