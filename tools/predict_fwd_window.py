"""Predict, on the CPU, the share of key tiles the forward's ALiBi window keeps, before any GPU time.

The window (triton_alibi._launch_prefill) skips the key tiles [0, lo) of a causal query block, lo from
a bound that needs only the block's diagonal scores, |q_i|, max|k| and the values' range. This tool
evaluates that same bound in torch (fp32) on the distribution tools/bench_attention.py --window times
(randn q, k, v, q and k scaled by each --scales, ALiBi slopes of H heads, B = tokens / L, the kernel's
default tiles for bf16) and prints the kept share per (L, scale). It does not run the kernel: the
interpreter tests check that the kernel skips what its bound allows; this says what to expect from the
bound. Other random draws than the GPU's generator: expect the GPU's share within about 0.01.

Usage: PYTHONPATH=. python tools/predict_fwd_window.py [--dims 128] [--lengths 2048,...] [--scales 1,2,4]
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from alibi_export.alibi import alibi_slopes  # noqa: E402

LOG2E = 1.4426950408889634


def kept_share(L: int, D: int, H: int = 16, scale: float = 1.0, tokens: int = 16384, seed: int = 0,
               blocks: tuple[int, int] | None = None) -> float:
    """Key tiles the window keeps / key tiles of the causal forward, one draw per (batch, head)."""
    from alibi_export.kernels.triton_alibi import _prefill_config, window_gap

    if blocks is None:
        blocks = _prefill_config(D, torch.bfloat16, L, L, True)[:2]
    bm, bn = blocks
    B = max(1, tokens // L)
    gap = window_gap(L)
    qks = D ** -0.5 * LOG2E
    g = torch.Generator().manual_seed(seed)
    starts = torch.arange(0, L, bm)
    n_full = (starts + 1) // bn * bn
    hi = (starts + bm).clamp(max=L)
    diag = -(-(hi - n_full) // bn)
    keep = total = 0
    for _ in range(B):
        q, k, v = (torch.randn(H, L, D, generator=g) for _ in range(3))
        q, k = q * scale, k * scale
        for h, m in enumerate(alibi_slopes(H)):
            s2 = m * LOG2E
            kmax = k[h].norm(dim=-1).max().item()
            vn = torch.nn.functional.pad(v[h].norm(dim=-1), (0, (-L) % 64)).view(-1, 64).amax(-1)
            e = 1 + math.log2(vn.max().item() / vn[vn > 0].min().item())
            qn = q[h].norm(dim=-1)
            for s0, nf, h1, nd in zip(starts.tolist(), n_full.tolist(), hi.tolist(), diag.tolist()):
                rows, cols = torch.arange(s0, h1), torch.arange(nf, h1)
                s = qks * (q[h, s0:h1] @ k[h, nf:h1].T) + s2 * (cols - s0).float()[None, :]
                mi = s.masked_fill(cols[None, :] > rows[:, None], float("-inf")).amax(1)
                a = (qks * qn[s0:h1] * kmax - mi).max().item() + e
                lo = max(s0 - math.ceil((a + gap) / s2), 0) // bn * bn
                keep += nd + (nf - lo) // bn
                total += nd + nf // bn
    return keep / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="128")
    ap.add_argument("--lengths", default="2048,4096,8192,16384")
    ap.add_argument("--scales", default="1,2,4")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16384)
    a = ap.parse_args()
    for D in (int(x) for x in a.dims.split(",")):
        for L in (int(x) for x in a.lengths.split(",")):
            row = {"D": D, "L": L, "kept": {s: round(kept_share(L, D, a.heads, float(s), a.tokens), 3)
                                            for s in a.scales.split(",")}}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
