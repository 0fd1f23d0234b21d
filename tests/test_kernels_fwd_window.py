"""The forward kernel's ALiBi window (opt-in, ``window=True``): it skips the key tiles whose share of
every output element is provably below 2^-32 of an ordinary value (triton_alibi._launch_prefill
derives the bound), and otherwise computes exactly what the full forward computes.

The interpreter test runs tests/kernel_fwd_window_check.py under TRITON_INTERPRET=1 on CPU (tiny
shapes, ~15 s on 2 cores); the GPU test (skipped without triton or a CUDA GPU) checks real shapes.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.interpret import run_interpreted


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    res = run_interpreted("kernel_fwd_window_check.py")
    for r in res:
        print("FWD WINDOW", json.dumps(r))
    return res


def _cases(res, name):
    found = [r for r in res if r["case"] == name]
    assert found, (name, res)
    return found


def test_window_skips_tiles_and_keeps_the_output(interpreted):
    """(a, b) Steep heads (slopes x64) at 200-260 tokens, GQA, a KV cache, fp32 and fp16, pointer and
    TMA loads: the window skips tiles (measured 41 of 60, 23 of 30, 14 of 16 kept). Against the same
    kernel in the window's order with nothing skipped (gap inf), every output element moves by less
    than the bound 2^-32 v_ (measured: bitwise equal: the skipped terms are below the fp32 rounding of
    the accumulators), lse by less than 2^-31. Against the window off (the diagonal tiles last: the
    fp32 sums in another order) within rounding: fp32 1e-6 of the largest output (16 ulp; measured
    7e-8), fp16 2e-3 (the forward's fp16 bound in tests/test_kernels.py)."""
    skipping = _cases(interpreted, "skips") + _cases(interpreted, "skips_fp16")
    assert len(skipping) == 3 and any(r.get("tma") for r in skipping)
    tol = {"float32": 1e-6, "float16": 2e-3}
    for r in skipping:
        assert r["tiles_on"] < r["tiles_off"] == r["tiles_order"], r
        assert r["abs_vs_order"] <= r["bound"] and r["lse_abs_vs_order"] <= 2.0 ** -31, r
        assert r["out_vs_off"] <= tol[r["dtype"]] and r["lse_vs_off"] <= tol[r["dtype"]], r


def test_window_without_a_skip_is_exact(interpreted):
    """(a) Standard slopes at 200 tokens: the window reaches past the sequence, no tile is skipped, and
    the output and lse are bitwise those of the window's order with nothing skipped."""
    (r,) = _cases(interpreted, "no_skip")
    assert r["tiles_on"] == r["tiles_off"] and r["equal_to_order"], r
    assert r["out_vs_off"] <= 1e-6, r


def test_window_turns_itself_off(interpreted):
    """(d) A zero and a negative slope, a NaN or an inf in v, and causal=False: every tile computed, the
    outputs those of the window's order with nothing skipped (NaNs in the same places); non-causal runs
    the unchanged kernel (bitwise the window-off output). Control: the same inputs with finite values
    skip (test_window_skips_tiles_and_keeps_the_output, same slopes and lengths)."""
    (zero,) = _cases(interpreted, "slope0")
    assert zero["tiles_on"] == zero["tiles_off"] and zero["equal_to_order"], zero
    for name in ("nan", "inf"):
        (r,) = _cases(interpreted, name)
        assert r["tiles_on"] == r["tiles_off"] and r["same_as_order"], r
    (nc,) = _cases(interpreted, "noncausal")
    assert nc["tiles_on"] == nc["tiles_off"] and nc["equal_to_off"], nc


def test_window_prices_the_values_in(interpreted):
    """(c) One key per head with |v| 1e15 (2^50) at a tile boundary, q x 0.01 so the skipped weights sit
    near their bound (kernel_fwd_window_check.spike_case). The window with the data priced in still
    skips a tile and changes no row by more than 1e-5 of its norm (the window-off order rounds the
    exponent argument, about 44 in log2 units, to 2^-19 relative: measured 1.4e-6). Negative control:
    the broken variant bounded by P alone (``_WINDOW_DATA_BOUND = False``) skips the spiked key's tile
    and changes a row by more than 1e-2 (measured 1.1)."""
    (r,) = _cases(interpreted, "spike")
    assert r["tiles_p_only"] < r["tiles_on"] < r["tiles_off"], r
    assert r["row_diff_on"] <= 1e-5, r
    assert r["row_diff_p_only"] > 1e-2, r


def test_window_keyword_reaches_the_kernel(interpreted):
    """(opt-in) ``window=True`` through alibi_export.kernels.alibi_attention, without and with autograd
    (the training forward), skips tiles; the default computes every tile."""
    (r,) = _cases(interpreted, "public")
    for path in ("nograd", "autograd"):
        assert r[f"{path}_on"] < r[f"{path}_default"], r
    assert r["nograd_default"] == r["autograd_default"], r


def test_predictor_counts_the_kernels_tiles(interpreted):
    """tools/predict_fwd_window.py (the bound in torch, for expected shares before GPU time) keeps the
    kernel's tile count on the same inputs (4 heads, standard slopes, 512 tokens: measured 0.93 both)."""
    (r,) = _cases(interpreted, "predict")
    assert r["kernel"] < 1.0 and r["predicted"] == r["kernel"], r


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,Hk,L,D,dtype", [
    (1, 16, 16, 4097, 128, torch.bfloat16),  # the benchmark's slopes and data; a ragged length
    (2, 8, 2, 2000, 64, torch.float16),
])
def test_window_on_gpu(seed, B, H, Hk, L, D, dtype):
    """On real shapes (TMA loads on sm_90+): the window keeps at most 0.8 of the tiles (predicted by
    tools/predict_fwd_window.py: 0.54 and 0.69), and against its own order with nothing skipped moves the
    output elements by less than 2^-32 v_ (the interpreter: bitwise equal), allowing a one-in-a-million
    element a rounding flip of at most one ulp of the output's dtype (a skipped term can change the last
    bit of an accumulator element near 0); within 2e-2 of the window-off output (bf16/fp16 round P
    relative to another running max: a few 1e-3)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (NVIDIA) for the Triton kernel")
    from alibi_export.alibi import alibi_slopes
    from tests.kernel_fwd_window_check import floor_bound, rel_max, run

    g = torch.Generator("cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, h, L, D, device="cuda", dtype=dtype, generator=g) for h in (H, Hk, Hk))
    m = torch.tensor(alibi_slopes(H), device="cuda")
    off, on = run(q, k, v, m, window=False), run(q, k, v, m, window=True)
    order = run(q, k, v, m, window=True, gap=float("inf"))
    print("GPU FWD WINDOW kept", on[2] / off[2], "vs off", rel_max(on[0], off[0]))
    assert on[2] <= 0.8 * off[2] and order[2] == off[2]
    diff = (on[0].double() - order[0].double()).abs()
    assert (diff > floor_bound(v)).double().mean().item() <= 1e-6
    assert diff.max().item() <= torch.finfo(dtype).eps * order[0].double().abs().max().item()
    assert rel_max(on[0], off[0]) <= 2e-2
