"""The forward kernel (window off, D 128, bf16, causal) at one length, timed, then run a few times more for Nsight
Compute to catch (issue 23 §1: what it names as the limiter; tools/profile_forward_ncu.sh runs it on a GPU machine).
--config: a prefill config (BLOCK_M, BLOCK_N, warps, stages[, warp_specialize]); --flex: FlexAttention instead."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from alibi_export.alibi import alibi_slopes  # noqa: E402
from alibi_export.kernels import triton_alibi as ka  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, default=16384)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per call: batch = tokens / L")
    ap.add_argument("--config", default=None, help="JSON list, e.g. [128,128,8,3,true]")
    ap.add_argument("--flex", action="store_true")
    ap.add_argument("--time", action="store_true", help="print ms and TFLOP/s (2*B*H*L^2*D) from do_bench")
    ap.add_argument("--runs", type=int, default=3, help="calls after the first, for the profiler")
    a = ap.parse_args(argv)
    import triton.testing as tt

    L, D, H = a.L, a.D, a.H
    B = max(1, a.tokens // L)
    g = torch.Generator("cuda").manual_seed(L + D)  # as tools/bench_attention.py
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    m = torch.tensor(alibi_slopes(H), device="cuda", dtype=torch.float32)
    if a.config:
        ka._CONFIG_OVERRIDE = tuple(json.loads(a.config))
    if a.flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention)
        bm = create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, L, L, device="cuda")

        def fn():
            return flex(q, k, v, score_mod=lambda s, b, h, qi, kv: s + m[h] * (kv - qi), block_mask=bm)
    else:
        def fn():
            return ka.alibi_attention(q, k, v, m)
    fn()
    torch.cuda.synchronize()
    if a.time:
        ms = tt.do_bench(fn, warmup=50, rep=300)
        print(json.dumps({"L": L, "D": D, "B": B, "config": a.config, "flex": a.flex, "ms": ms,
                          "tflops": 2 * B * H * L * L * D / ms / 1e9}), flush=True)
    for _ in range(a.runs):
        fn()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
