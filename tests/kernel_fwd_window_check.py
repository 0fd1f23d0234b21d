"""The forward kernel's ALiBi window against the full computation, under Triton's CPU interpreter.

Run as a script with TRITON_INTERPRET=1 (``python tests/kernel_fwd_window_check.py``) by
tests/test_kernels_fwd_window.py; prints one JSON line per case. Each case runs the prefill kernel
(with its lse, as the training forward does) three ways on the same seeded inputs: window off,
window on, and the window's order with nothing skipped (gap = inf), and reports the key tiles each
computed (the kernel's ``_TILE_COUNTS`` hook) and the differences.
"""
from __future__ import annotations

import json
import os
import sys

import torch

if __name__ == "__main__":  # run as a script from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alibi_export.alibi import alibi_slopes  # noqa: E402


def run(q, k, v, slopes, *, window, gap=None, data_bound=True, causal=True):
    """(out, lse, key tiles computed) of the prefill kernel."""
    from alibi_export.kernels import triton_alibi as fwd

    B, H, Lq, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B * H * Lq,), dtype=torch.float32, device=q.device)
    use_tma = fwd._tma_ok(k, k.stride(), q.device) and fwd._tma_ok(v, v.stride(), q.device)
    if use_tma and q.is_cuda:
        fwd._ensure_allocator()
    fwd._SKIP_GAP, fwd._WINDOW_DATA_BOUND = gap, data_bound
    fwd._TILE_COUNTS = torch.zeros(1, dtype=torch.int32, device=q.device)
    try:
        fwd._launch_prefill(q, k, v, out, slopes.to(q.device, torch.float32).contiguous(), B, H, k.shape[1], Lq,
                            k.shape[2], D, k.shape[2] - Lq, causal, D ** -0.5, q.stride(), k.stride(), v.stride(),
                            out.stride(), q.device, use_tma=use_tma, lse=lse, window=window)
        return out, lse, int(fwd._TILE_COUNTS.item())
    finally:
        fwd._SKIP_GAP, fwd._WINDOW_DATA_BOUND, fwd._TILE_COUNTS = None, True, None


def rel_max(a, b) -> float:
    """max |a - b| / max |b| (NaN-free inputs)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def floor_bound(v) -> float:
    """2^-32 v_: the window's bound on what it may change in an output element (see
    triton_alibi._launch_prefill), v_ the smallest nonzero 64-row block maximum of |v_j| over every
    (batch, kv head) (the smallest floor: the strictest bound)."""
    n = v.double().norm(dim=-1)  # (B, Hk, Lk)
    pad = (-n.shape[-1]) % 64
    blk = torch.nn.functional.pad(n, (0, pad)).view(*n.shape[:2], -1, 64).amax(-1)
    return 2.0 ** -32 * blk[blk > 0].min().item()


def inputs(B, H, Hk, Lq, Lk, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g).to(dtype) for h, n in ((H, Lq), (Hk, Lk), (Hk, Lk)))
    return q, k, v


def case(name, B, H, Hk, Lq, Lk, D, dtype=torch.float32, seed=0, slope_scale=1.0, slopes=None,
         bad=None, causal=True):
    """Window off / on / window order with gap inf; ``bad`` puts a NaN or inf into v."""
    q, k, v = inputs(B, H, Hk, Lq, Lk, D, dtype, seed)
    if bad is not None:
        v[:, :, Lk // 3, 0] = bad
    m = torch.tensor(alibi_slopes(H) if slopes is None else slopes, dtype=torch.float32) * slope_scale
    off = run(q, k, v, m, window=False, causal=causal)
    on = run(q, k, v, m, window=True, causal=causal)
    order = run(q, k, v, m, window=True, gap=float("inf"), causal=causal)
    res = {"case": name, "shape": [B, H, Hk, Lq, Lk, D], "dtype": str(dtype)[6:], "causal": causal,
           "tiles_off": off[2], "tiles_on": on[2], "tiles_order": order[2]}
    if bad is None:
        res.update(bound=floor_bound(v), abs_vs_order=(on[0].double() - order[0].double()).abs().max().item(),
                   lse_abs_vs_order=(on[1].double() - order[1].double()).abs().max().item(),
                   out_vs_off=rel_max(on[0], off[0]), lse_vs_off=rel_max(on[1], off[1]),
                   order_vs_off=rel_max(order[0], off[0]),
                   out_vs_order=rel_max(on[0], order[0]), lse_vs_order=rel_max(on[1], order[1]),
                   equal_to_order=bool(torch.equal(on[0], order[0]) and torch.equal(on[1], order[1])),
                   equal_to_off=bool(torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])))
    else:
        same = lambda a, b: bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))  # noqa: E731
        res.update(bad=str(bad), same_as_order=same(on[0], order[0]) and same(on[1], order[1]))
    return res


def spike_case(seed=0, spike=1e15, q_scale=0.01):
    """The adversarial input: one key per head, at a tile boundary, with |v| ``spike`` times larger, q
    scaled by ``q_scale`` (scores near 0: the skipped weights sit near their bound 2^-gap). A slope
    of 0.47 (0.68 in log2 units) puts the P-only window's edge (gap 41 / 0.68 = 60 keys) just inside
    the 64-key tile before each query block: the key just before that tile carries a P of about
    2^-44, times 2^50. The window with the data priced in (E = 1 + log2(max|v| / floor|v|), about
    50 bits here) computes it; the P-only window (the broken variant) skips it."""
    B, H, Hk, L, D = 1, 1, 1, 260, 16
    q, k, v = inputs(B, H, Hk, L, L, D, torch.float32, seed)
    q = q * q_scale
    v[:, :, 63] *= spike
    m = torch.tensor([0.47])
    off, on = run(q, k, v, m, window=False), run(q, k, v, m, window=True)
    p_only = run(q, k, v, m, window=True, data_bound=False)
    row = lambda a, b: ((a.double() - b.double()).norm(dim=-1)  # noqa: E731
                        / b.double().norm(dim=-1).clamp_min(1e-300)).max().item()
    return {"case": "spike", "spike": spike, "tiles_off": off[2], "tiles_on": on[2], "tiles_p_only": p_only[2],
            "row_diff_on": row(on[0], off[0]), "row_diff_p_only": row(p_only[0], off[0]),
            "lse_on": rel_max(on[1], off[1]), "lse_p_only": rel_max(p_only[1], off[1])}


def public_entry_case(seed=0):
    """``window=`` through the public entry points: alibi_export.kernels.alibi_attention (no grad) and
    its autograd form (the model's training path) skip tiles with it, none without it (the default)."""
    from alibi_export.kernels import alibi_attention
    from alibi_export.kernels import triton_alibi as fwd

    q, k, v = inputs(1, 2, 1, 200, 200, 16, torch.float32, seed)
    m = torch.tensor(alibi_slopes(2)) * 64
    res = {"case": "public"}
    for name, grad in (("nograd", False), ("autograd", True)):
        for win in (False, True):
            fwd._TILE_COUNTS = torch.zeros(1, dtype=torch.int32)
            try:
                a = q.clone().requires_grad_(grad)
                alibi_attention(a, k, v, m, window=win) if win else alibi_attention(a, k, v, m)
                res[f"{name}_{'on' if win else 'default'}"] = int(fwd._TILE_COUNTS.item())
            finally:
                fwd._TILE_COUNTS = None
    return res


def predict_case(seed=0):
    """tools/predict_fwd_window.py evaluates the window's bound in torch: on the same inputs (its draws,
    fp32, 64x64 tiles) it must count the tiles the kernel keeps."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    from predict_fwd_window import kept_share

    H, L, D = 4, 512, 16
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(H, L, D, generator=g)[None] for _ in range(3))
    m = torch.tensor(alibi_slopes(H))
    off, on = run(q, k, v, m, window=False), run(q, k, v, m, window=True)
    return {"case": "predict", "kernel": on[2] / off[2],
            "predicted": kept_share(L, D, H, 1.0, tokens=L, seed=seed, blocks=(64, 64))}


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    from tests.kernel_grad_check import _patch_interpreter

    _patch_interpreter()
    from alibi_export.kernels import triton_alibi as fwd

    # slopes 64x the standard ones: steep heads skip tiles at these lengths; GQA; a ragged length
    print(json.dumps(case("skips", 1, 4, 2, 260, 260, 16, slope_scale=64.0)), flush=True)
    print(json.dumps(case("skips_fp16", 1, 2, 2, 200, 260, 16, dtype=torch.float16, slope_scale=64.0)), flush=True)
    try:  # the TMA-descriptor loads (the path an H200 takes)
        fwd._TMA_OVERRIDE = True
        print(json.dumps({**case("skips", 1, 2, 1, 260, 260, 16, slope_scale=64.0), "tma": True}), flush=True)
    finally:
        fwd._TMA_OVERRIDE = None
    print(json.dumps(case("no_skip", 1, 2, 2, 200, 200, 16)), flush=True)  # standard slopes: w > L
    print(json.dumps(case("slope0", 1, 2, 2, 260, 260, 16, slopes=[0.0, -1.0])), flush=True)
    print(json.dumps(case("nan", 1, 2, 2, 260, 260, 16, slope_scale=64.0, bad=float("nan"))), flush=True)
    print(json.dumps(case("inf", 1, 2, 2, 260, 260, 16, slope_scale=64.0, bad=float("inf"))), flush=True)
    print(json.dumps(case("noncausal", 1, 2, 2, 130, 130, 16, slope_scale=64.0, causal=False)), flush=True)
    print(json.dumps(spike_case()), flush=True)
    print(json.dumps(public_entry_case()), flush=True)
    print(json.dumps(predict_case()), flush=True)


if __name__ == "__main__":
    main()
