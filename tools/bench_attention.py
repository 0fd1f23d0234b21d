"""Benchmark the fused Triton ALiBi attention against its peers on one GPU.

Prefill (bf16, causal, H=16, 16384 tokens per batch, B = 16384 / L), TFLOP/s with the causal count
2*B*H*L*L*D (= 4*B*H*L^2*D / 2):
  flash_nobias : torch SDPA flash backend, causal, no bias (the "ALiBi is free" ceiling)
  sdpa_bias    : torch SDPA with a materialised ALiBi+causal bf16 bias (1, H, L, L)
  flex_alibi   : FlexAttention, ALiBi score_mod + causal block mask, torch.compile'd
  triton_alibi : alibi_export.kernels (best of the swept configs; the default config too)
Decode (q_len 1, bf16, H=16, D=128): microseconds per step (CUDA-graph replays, inputs rotated so
that the working set exceeds L2) and GB/s of K+V+q+out against a measured D2D copy bandwidth.

The peer side mirrors shared/device/peer_attention_bench.py (a project helper). Timing:
triton.testing.do_bench, median, as one sample of tools/harness.py's timer. Usage: python tools/bench_attention.py [--sweep] [--json F]

--window (issue 23): the forward's ALiBi window (``alibi_attention(..., window=True)``) against the
same forward without it and FlexAttention, on the backward benchmark's inputs (bench_attention_train:
randn q, k, v from a generator seeded L + D) and with q and k scaled x2 and x4 (larger scores: wider
windows); TFLOP/s with the full causal count (2*B*H*L^2*D) for every peer, x Flex, the share of key
tiles the window keeps, the window's pre-pass alone (us), and max |window - no window| / max |out|.
Writes $OUT/bench_fwd_window.json when $OUT is set. ``--device cpu`` (with TRITON_INTERPRET=1, tiny
--tokens) runs the same code on CPU through Triton's interpreter, wall-clock timed, without Flex: a
dry run of the script, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch._dynamo
import torch.nn.functional as F
from harness import out_path, time_one, write_record

import triton.testing as tt  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

from alibi_export.alibi import alibi_bias, alibi_slopes  # noqa: E402
from alibi_export.kernels import triton_alibi as ka  # noqa: E402

DEV = "cuda"
DT = torch.bfloat16
CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3),
           (128, 64, 8, 3, True), (64, 64, 4, 3), (64, 64, 4, 3, False, 1, False),
           (64, 64, 4, 3, False, 1, True), (128, 64, 4, 3, False, 1, False),
           (128, 128, 8, 3, False, 1, False)]


# candidate prefill variants, (BLOCK_M, BLOCK_N, warps, stages, warp_specialize, order, merge,
# maxnreg): see triton_alibi._CONFIG_OVERRIDE; timed by --variants
VARIANTS = {
    128: [(128, 128, 8, 3, False, 1, False), (128, 128, 8, 3, False, 0, True),
          (128, 128, 8, 3, False, 1, True), (128, 128, 8, 2, False, 1, True),
          (128, 64, 8, 3, False, 1, True), (128, 64, 8, 2, False, 1, True, 128),
          (64, 64, 4, 3, False, 1, True), (64, 64, 4, 2, False, 1, True),
          (128, 128, 8, 3, True, 1, True)],
    64: [(128, 64, 4, 3, False, 1, False), (128, 64, 4, 3, False, 0, True),
         (128, 64, 4, 3, False, 1, True), (128, 64, 4, 4, False, 1, True),
         (128, 64, 4, 2, False, 1, True), (128, 64, 8, 3, False, 1, True),
         (64, 64, 4, 3, False, 1, True), (128, 128, 8, 3, False, 1, True),
         (128, 64, 4, 3, True, 1, True)],
}


def time_flex(flex, q, k, v, m, L, device, timer):
    """The FlexAttention peer of every prefill table, ALiBi as a score_mod over the causal block mask of
    length L: (its output, ms by ``timer``), or (None, nan) where Flex fails (printed)."""
    def score_mod(score, b, h, qi, kv):
        return score + m[h] * (kv - qi)
    bm = create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, L, L, device=device)
    run = lambda: flex(q, k, v, score_mod=score_mod, block_mask=bm)  # noqa: E731
    try:
        out = run()
        return out, timer(run)
    except Exception as e:  # noqa: BLE001
        print("flex failed", repr(e)[:200])
        return None, float("nan")


def variants(dims, lengths, flex_lengths, flex, H=16):
    """Time the candidate variants next to the default config (timed first and last: spread)."""
    m = torch.tensor(alibi_slopes(H), device=DEV, dtype=torch.float32)
    rows = []
    for D in dims:
        for L in lengths:
            B = max(1, 16384 // L)
            q, k, v = (torch.randn(B, H, L, D, device=DEV, dtype=DT) for _ in range(3))
            flops = 2 * B * H * L * L * D
            tf = lambda ms: flops / ms / 1e9  # noqa: E731
            r = {"D": D, "L": L, "B": B}
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                r["flash"] = tf(bench(lambda: F.scaled_dot_product_attention(q, k, v,
                                                                             is_causal=True)))
            r["flex"] = float("nan")
            if L in flex_lengths:
                r["flex"] = tf(time_flex(flex, q, k, v, m, L, DEV, bench)[1])
            ka._CONFIG_OVERRIDE = None
            o = ka.alibi_attention(q, k, v, m)
            r["default"] = tf(bench(lambda: ka.alibi_attention(q, k, v, m)))
            for cfg in VARIANTS[D]:
                ka._CONFIG_OVERRIDE = cfg
                try:
                    oc = ka.alibi_attention(q, k, v, m)
                    e = rel_err(oc, o)
                    t = tf(bench(lambda: ka.alibi_attention(q, k, v, m)))
                    r[str(cfg)] = t if e < 2e-2 else -1.0
                    if e >= 2e-2:
                        print("WRONG", cfg, e)
                except Exception as ex:  # noqa: BLE001
                    print("variant", cfg, "failed:", repr(ex)[:300])
                    r[str(cfg)] = float("nan")
                finally:
                    ka._CONFIG_OVERRIDE = None
            r["default_again"] = tf(bench(lambda: ka.alibi_attention(q, k, v, m)))
            rows.append(r)
            print(json.dumps({k_: (round(v_, 1) if isinstance(v_, float) else v_)
                              for k_, v_ in r.items()}), flush=True)
            del q, k, v
            torch.cuda.empty_cache()
    print(f"\nvariants, TFLOP/s, {torch.cuda.get_device_name()} (x flex / x flash in brackets)")
    for r in rows:
        print(f"D={r['D']} L={r['L']} B={r['B']}: flash {r['flash']:.1f} flex {r['flex']:.1f} "
              f"default {r['default']:.1f} / again {r['default_again']:.1f}")
        for key, val in r.items():
            if key.startswith("("):
                print(f"   {key:<42} {val:7.1f}  [{val / r['flex']:.3f} / {val / r['flash']:.3f}]"
                      f"  vs default {val / r['default']:.3f}")
    return rows


def bench(fn):
    """ms per call: one harness sample measured by triton's GPU timer (itself a median over ~100 runs)."""
    return time_one(fn, warmup=0, repeats=1,
                    measure=lambda f: tt.do_bench(f, warmup=25, rep=100, return_mode="median") / 1e3).ms


def copy_bandwidth():
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV).random_(0, 255)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    return 2 * n / ms / 1e6  # GB/s, read + write


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def prefill(D, lengths, H, sweep, peers, flex):
    rows = []
    m = torch.tensor(alibi_slopes(H), device=DEV, dtype=torch.float32)
    for L in lengths:
        B = max(1, 16384 // L)
        q, k, v = (torch.randn(B, H, L, D, device=DEV, dtype=DT) for _ in range(3))
        flops = 2 * B * H * L * L * D
        tf = lambda ms: flops / ms / 1e9  # noqa: E731
        r = {"L": L, "B": B, "D": D}
        if peers:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                r["flash_nobias"] = tf(bench(lambda: F.scaled_dot_product_attention(
                    q, k, v, is_causal=True)))
            bias = alibi_bias(m, L, L, causal=True, dtype=DT)[None]
            try:
                r["sdpa_bias"] = tf(bench(lambda: F.scaled_dot_product_attention(
                    q, k, v, attn_mask=bias)))
            except Exception:  # noqa: BLE001
                r["sdpa_bias"] = float("nan")
            del bias
            o_flex, ms = time_flex(flex, q, k, v, m, L, DEV, bench)
            r["flex_alibi"] = tf(ms)
        else:
            o_flex = None
        # ours: default config, then the sweep
        ka._CONFIG_OVERRIDE = None
        o = ka.alibi_attention(q, k, v, m)
        r["ours_default"] = tf(bench(lambda: ka.alibi_attention(q, k, v, m)))
        if o_flex is not None:
            r["err_vs_flex"] = rel_err(o, o_flex)
        best, best_cfg = r["ours_default"], "default"
        for cfg in (CONFIGS if sweep else []):
            ka._CONFIG_OVERRIDE = cfg
            try:
                oc = ka.alibi_attention(q, k, v, m)
                e = rel_err(oc, o)
                t = tf(bench(lambda: ka.alibi_attention(q, k, v, m)))
            except Exception as ex:  # noqa: BLE001
                print("config", cfg, "failed:", repr(ex)[:200])
                continue
            finally:
                ka._CONFIG_OVERRIDE = None
            r[f"cfg{cfg}"] = round(t, 1)
            if e > 2e-2:
                print("config", cfg, "WRONG, rel err vs default", e)
                continue
            if t > best:
                best, best_cfg = t, str(cfg)
        r["ours_best"], r["ours_best_cfg"] = best, best_cfg
        rows.append(r)
        print(json.dumps({k_: (round(v_, 1) if isinstance(v_, float) else v_)
                          for k_, v_ in r.items()}), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def decode(H, D, kv_lens, batches, peers, flex, bw):
    rows = []
    m = torch.tensor(alibi_slopes(H), device=DEV, dtype=torch.float32)
    for Lk in kv_lens:
        for B in batches:
            kv_bytes = 2 * B * H * Lk * D * 2
            nbytes = kv_bytes + 2 * B * H * D * 2
            nsets = max(1, min(16, math.ceil(256e6 / kv_bytes)))
            sets = [tuple(torch.randn(B, H, n, D, device=DEV, dtype=DT) for n in (1, Lk, Lk))
                    for _ in range(nsets)]
            r = {"kv_len": Lk, "B": B}

            def timeit(f, graph=True):
                def run_all():
                    for s in sets:
                        f(*s)
                run_all()
                torch.cuda.synchronize()
                if not graph:  # launch gaps included
                    return bench(run_all) / nsets * 1e3
                return time_one(run_all, warmup=0, repeats=1, measure=lambda f: tt.do_bench_cudagraph(
                    f, rep=50, return_mode="median") / 1e3).ms / nsets * 1e3

            us = timeit(lambda q, k, v: ka.alibi_attention(q, k, v, m))
            r["ours_us"] = us
            r["ours_GBps"] = nbytes / us / 1e3
            r["ours_pct_copy"] = 100 * r["ours_GBps"] / bw
            if peers:
                bias = alibi_bias(m, 1, Lk, past_len=Lk - 1, causal=True, dtype=DT)[None]
                r["sdpa_bias_us"] = timeit(lambda q, k, v: F.scaled_dot_product_attention(
                    q, k, v, attn_mask=bias))
                if Lk in (4096, 32768):
                    def score_mod(score, b, h, qi, kv):
                        return score + m[h] * (kv - (qi + Lk - 1))
                    bmd = create_block_mask(lambda b, h, qi, kv: kv <= qi + (Lk - 1), None,
                                            None, 1, Lk, device=DEV)
                    try:
                        r["flex_us_nograph"] = timeit(
                            lambda q, k, v: flex(q, k, v, score_mod=score_mod, block_mask=bmd),
                            graph=False)
                        r["ours_us_nograph"] = timeit(
                            lambda q, k, v: ka.alibi_attention(q, k, v, m), graph=False)
                    except Exception as e:  # noqa: BLE001
                        print("flex decode failed", repr(e)[:200])
                q, k, v = sets[0]
                ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                     attn_mask=bias.float())
                r["err_vs_sdpa_fp32"] = rel_err(ka.alibi_attention(q, k, v, m), ref)
            rows.append(r)
            print(json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_)
                              for k_, v_ in r.items()}), flush=True)
            del sets
            torch.cuda.empty_cache()
    return rows


# --window: prefill configs also timed with the window on at the first scale (short programs, as at
# L <= 2048, may prefer the 64x64 / 4-warp tiles that run 2 CTAs per SM)
WINDOW_CONFIGS = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3)]


def window_bench(dims, lengths, scales, flex, H=16, tokens=16384, dev="cuda", configs=()):
    """The forward's ALiBi window, on and off, at each q/k scale; Flex once per shape (its time does not
    depend on the data); ``configs`` timed with the window on at the first scale."""
    import triton

    cuda = dev == "cuda"
    timer = bench if cuda else (lambda fn: time_one(fn, warmup=0, repeats=1).ms)
    m = torch.tensor(alibi_slopes(H), device=dev, dtype=torch.float32)
    dt = DT if cuda else torch.float16  # the interpreter has no bfloat16 arithmetic
    rows = []
    for D in dims:
        for L in lengths:
            B = max(1, tokens // L)
            g = torch.Generator(dev).manual_seed(L + D)  # as tools/bench_attention_train.py
            q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=dt, generator=g) for _ in range(3))
            flops = 2 * B * H * L * L * D
            tf = lambda ms: flops / ms / 1e9  # noqa: E731
            r = {"D": D, "L": L, "B": B, "flex": float("nan")}
            if cuda:
                r["flex"] = tf(time_flex(flex, q, k, v, m, L, dev, timer)[1])
            nb = triton.cdiv(L, ka._BND_ROWS)
            kn, vn = torch.empty((2, B * H, nb), device=dev, dtype=torch.float32)
            r["prepass_us"] = 1e3 * timer(lambda: ka._kv_bound_kernel[(nb, B * H)](
                k, v, kn, vn, *k.stride(), *v.stride(), H, L, nb, BLOCK=ka._BND_ROWS, HEAD_DIM=D,
                num_warps=4))
            for sc in scales:
                qs, ks = q * sc, k * sc
                runs = {}
                for name, win in (("off", False), ("on", True)):
                    ka._TILE_COUNTS = torch.zeros(1, dtype=torch.int32, device=dev)
                    try:
                        runs[name] = ka.alibi_attention(qs, ks, v, m, window=win)
                        r[f"x{sc}_tiles_{name}"] = int(ka._TILE_COUNTS.item())
                    finally:
                        ka._TILE_COUNTS = None
                    r[f"x{sc}_{name}"] = tf(timer(lambda: ka.alibi_attention(qs, ks, v, m, window=win)))
                r[f"x{sc}_kept"] = r[f"x{sc}_tiles_on"] / r[f"x{sc}_tiles_off"]
                out_off = runs["off"].float()
                r[f"x{sc}_diff"] = ((runs["on"].float() - out_off).abs().max() / out_off.abs().max()).item()
                del qs, ks, runs, out_off
            qs, ks = q * scales[0], k * scales[0]
            ref = ka.alibi_attention(qs, ks, v, m).float()
            for cfg in configs:
                ka._CONFIG_OVERRIDE = cfg
                try:
                    e = ((ka.alibi_attention(qs, ks, v, m, window=True).float() - ref).abs().max()
                         / ref.abs().max()).item()
                    t = tf(timer(lambda: ka.alibi_attention(qs, ks, v, m, window=True)))
                    r[f"on_cfg{cfg}"] = t if e < 2e-2 else -1.0
                    if e >= 2e-2:
                        print("config", cfg, "WRONG with the window, max diff", e, flush=True)
                except Exception as ex:  # noqa: BLE001
                    print("config", cfg, "failed:", repr(ex)[:200], flush=True)
                finally:
                    ka._CONFIG_OVERRIDE = None
            del qs, ks, ref
            rows.append(r)
            print(json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_)
                              for k_, v_ in r.items()}), flush=True)
            del q, k, v
            if cuda:
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter: not a measurement)"
    print(f"\nforward, causal H={H} tokens/batch={tokens}, TFLOP/s (2*B*H*L^2*D), {name}")
    print(f"{'D':>4} {'L':>6} {'B':>3} {'qk x':>4} {'flex':>7} {'off':>7} {'on':>7} {'off/flex':>8} "
          f"{'on/flex':>8} {'on/off':>7} {'kept':>5} {'diff':>8} {'pre us':>7}")
    for r in rows:
        for sc in scales:
            on, off = r[f"x{sc}_on"], r[f"x{sc}_off"]
            print(f"{r['D']:>4} {r['L']:>6} {r['B']:>3} {sc:>4} {r['flex']:7.1f} {off:7.1f} {on:7.1f} "
                  f"{off / r['flex']:8.2f} {on / r['flex']:8.2f} {on / off:7.2f} {r[f'x{sc}_kept']:5.2f} "
                  f"{r[f'x{sc}_diff']:8.1e} {r['prepass_us']:7.1f}")
        for key, val in r.items():
            if key.startswith("on_cfg"):
                print(f"{'':>20} window on, x{scales[0]}, config {key[6:]:<18} {val:7.1f} "
                      f"({val / r['flex']:.2f} x flex, {val / r[f'x{scales[0]}_on']:.2f} x default)")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true",
                    help="also time the CONFIGS list (with --window: WINDOW_CONFIGS, window on)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--json", default=None)
    ap.add_argument("--variants", action="store_true",
                    help="time the VARIANTS candidates only (Flex at --flex-lengths)")
    ap.add_argument("--flex-lengths", default="2048")
    ap.add_argument("--window", action="store_true",
                    help="time the forward's ALiBi window on and off against Flex (see the docstring)")
    ap.add_argument("--scales", default="1,2,4", help="--window: q and k multiplied by each")
    ap.add_argument("--tokens", type=int, default=16384, help="--window: tokens per batch (B = tokens / L)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="--window only: cpu runs Triton's interpreter (TRITON_INTERPRET=1), a dry run")
    a = ap.parse_args()
    if a.window:
        if a.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("Error: --device cpu needs TRITON_INTERPRET=1 (set before Python starts)")
        t0 = time.time()
        flex = torch.compile(flex_attention, dynamic=False) if a.device == "cuda" else None
        torch._dynamo.config.recompile_limit = 64
        torch._dynamo.config.cache_size_limit = 64
        rows = window_bench([int(x) for x in a.dims.split(",")], [int(x) for x in a.lengths.split(",")],
                            [float(x) if "." in x else int(x) for x in a.scales.split(",")], flex,
                            tokens=a.tokens, dev=a.device, configs=WINDOW_CONFIGS if a.sweep else ())
        path = out_path("bench_fwd_window.json", a.json)
        if path:
            write_record(path, {"rows": rows})
            print("wrote", path)
        print(f"total {time.time() - t0:.0f} s")
        return
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 64  # one compile per (L, D) shape
    torch._dynamo.config.cache_size_limit = 64
    flex = torch.compile(flex_attention, dynamic=False)
    globals()["flex"] = flex
    t0 = time.time()
    bw = copy_bandwidth()
    print(f"GPU {torch.cuda.get_device_name()} torch {torch.__version__} "
          f"D2D copy {bw:.0f} GB/s (read+write)", flush=True)
    lengths = [int(x) for x in a.lengths.split(",")]
    if a.variants:
        rows = variants([int(x) for x in a.dims.split(",")], lengths,
                        [int(x) for x in a.flex_lengths.split(",")], flex)
        if a.json:
            write_record(a.json, rows)
        print(f"total {time.time() - t0:.0f} s")
        return
    res = {"device": torch.cuda.get_device_name(), "copy_GBps": bw, "prefill": [], "decode": []}
    for D in [int(x) for x in a.dims.split(",")]:
        res["prefill"] += prefill(D, lengths, 16, a.sweep, not a.no_peers, flex)
    if not a.no_decode:
        res["decode"] = decode(16, 128, [1024, 4096, 16384, 32768], [1, 16, 64],
                               not a.no_peers, flex, bw)
    if a.json:
        write_record(a.json, res)
    # summary tables
    print(f"\nprefill bf16 causal H=16 tokens/batch=16384, TFLOP/s (2*B*H*L^2*D), "
          f"{res['device']}")
    print(f"{'D':>4} {'L':>6} {'B':>3} {'flash':>7} {'sdpa+b':>7} {'flex':>7} {'ours':>7} "
          f"{'x flex':>7} {'x flash':>7}  best cfg")
    for r in res["prefill"]:
        fl, fx = r.get("flash_nobias", float("nan")), r.get("flex_alibi", float("nan"))
        print(f"{r['D']:>4} {r['L']:>6} {r['B']:>3} {fl:7.1f} {r.get('sdpa_bias', float('nan')):7.1f}"
              f" {fx:7.1f} {r['ours_best']:7.1f} {r['ours_best'] / fx:7.2f} "
              f"{r['ours_best'] / fl:7.2f}  {r['ours_best_cfg']} (default {r['ours_default']:.1f})")
    if res["decode"]:
        print(f"\ndecode bf16 q_len=1 H=16 D=128; copy {bw:.0f} GB/s; us per step")
        print("(graph replays; the last two columns without graphs, launch gaps included)")
        print(f"{'kv':>6} {'B':>3} {'ours us':>8} {'GB/s':>7} {'%copy':>6} {'sdpa+b us':>9} "
              f"{'ours ng':>8} {'flex ng':>8}")
        nan = float("nan")
        for r in res["decode"]:
            print(f"{r['kv_len']:>6} {r['B']:>3} {r['ours_us']:8.1f} {r['ours_GBps']:7.0f} "
                  f"{r['ours_pct_copy']:6.1f} {r.get('sdpa_bias_us', nan):9.1f} "
                  f"{r.get('ours_us_nograph', nan):8.1f} {r.get('flex_us_nograph', nan):8.1f}")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
