"""Backward of the fused Triton ALiBi attention: dq, dk, dv against float64, beside PyTorch SDPA.

The claim: the kernel's gradients (and its output) are within 2x the error of PyTorch SDPA with a
materialized ALiBi bias in the same dtype, both measured against a float64 evaluation of the same
formula from the same rounded inputs, in the same test (tests/kernel_grad_check.py). Both round
P (and dS) to 16 bits before their matmuls; SDPA also rounds the bias to 16 bits, so it is not a
loose yardstick only at long L. GPU tests skip without triton or a CUDA GPU; the interpreter test
runs the kernels on CPU under TRITON_INTERPRET=1 (tiny shapes).
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.interpret import run_interpreted
from tests.kernel_grad_check import NAMES, compare, window_check


@pytest.fixture(scope="module")
def gpu():
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (NVIDIA) for the Triton kernel")


def check(B, H, Hk, Lq, Lk, D, dtype, causal=True, past_len=None, seed=0):
    res = compare(B, H, Hk, Lq, Lk, D, dtype, causal=causal, past_len=past_len, seed=seed)
    ker, ref = res["kernel"], res["sdpa"]
    line = " ".join(f"{n} {ker[n]:.1e}/{ref[n]:.1e}" for n in NAMES)
    print(f"GRAD kernel/sdpa {line} | {res['dtype']} B={B} H={H}/{Hk} Lq={Lq} Lk={Lk} D={D} "
          f"causal={causal} past={res['past_len']} seed={seed}")
    for n in NAMES:
        assert ker[n] <= 2 * ref[n], f"{n}: kernel {ker[n]:.2e} > 2 x SDPA {ref[n]:.2e} ({res})"
    return res


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [16, 32, 64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_grads_dtypes_headdims(gpu, dtype, D, causal):
    check(2, 4, 4, 700, 700, D, dtype, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("L", [2, 17, 255, 4097])
def test_grads_lengths(gpu, L):
    check(2, 4, 4, L, L, 128, torch.bfloat16)
    check(1, 5, 5, L, L, 64, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("H,Hk", [(12, 4), (8, 1)])
def test_grads_gqa_mqa(gpu, H, Hk):
    check(2, H, Hk, 1000, 1000, 128, torch.bfloat16)
    check(1, H, Hk, 333, 333, 64, torch.float16, causal=False)


@pytest.mark.gpu
@pytest.mark.parametrize("Lq,Lk,past", [(255, 1000, None), (300, 1000, 100), (1, 300, None)])
def test_grads_past_len(gpu, Lq, Lk, past):
    check(2, 8, 8, Lq, Lk, 128, torch.bfloat16, past_len=past)
    check(1, 8, 2, Lq, Lk, 64, torch.float16, causal=False, past_len=past)


@pytest.mark.gpu
def test_grads_float32(gpu):
    """fp32 inputs (tf32x3 dots, as the forward): error ~1e-6, bound 1e-4 (tests/test_kernels.py)."""
    res = compare(2, 4, 2, 500, 500, 128, torch.float32, with_sdpa=False)
    assert max(res["kernel"].values()) <= 1e-4, res


# (BLOCK_M, BLOCK_N, warps, stages) of the dK/dV kernel, then of the dQ kernel: every config
# tools/bench_attention_train.py --sweep may time computes the same function.
BWD_CONFIGS = [(32, 64, 8, 3, 128, 32, 8, 3), (32, 128, 8, 3, 128, 64, 8, 3),
               (16, 64, 4, 3, 64, 64, 4, 3), (32, 64, 4, 3, 128, 64, 8, 2),
               (16, 128, 8, 3, 128, 32, 8, 3), (32, 64, 4, 3, 128, 64, 8, 3),
               (64, 64, 4, 2, 128, 64, 8, 2), (64, 128, 8, 2, 128, 64, 8, 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", BWD_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_grads_bwd_configs(gpu, cfg):
    from alibi_export.kernels import triton_alibi_bwd as kb

    try:
        kb._BWD_CONFIG_OVERRIDE = cfg
        check(2, 4, 2, 777, 777, 128, torch.bfloat16)
        check(1, 4, 4, 300, 1000, 64, torch.float16, past_len=100)
        check(1, 4, 4, 255, 255, 64, torch.float16, causal=False)
    finally:
        kb._BWD_CONFIG_OVERRIDE = None


@pytest.mark.gpu
def test_projection_layout_and_concurrent_dq(gpu, seed):
    """The model's q, k, v are head views of one (B, L, (H + 2 Hk) D) projection. The output and the
    gradients come back in that memory order ((B, L, H, D): the model's transpose back is a view, no
    copy) with the same values as for contiguous inputs, and the dQ kernel on its own stream (the
    default) gives the values of the one-stream backward. Control: contiguous inputs get contiguous
    outputs."""
    from alibi_export.alibi import alibi_slopes
    from alibi_export.kernels import alibi_attention
    from alibi_export.kernels import triton_alibi_bwd as kb

    B, L, H, Hk, D = 2, 777, 8, 2, 64
    g = torch.Generator("cuda").manual_seed(seed)
    proj = torch.randn(B, L, (H + 2 * Hk) * D, device="cuda", dtype=torch.bfloat16, generator=g)
    do = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    slopes = torch.tensor(alibi_slopes(H), device="cuda")

    def run(contiguous: bool, concurrent: bool = True):
        x = proj.detach().clone().requires_grad_()
        q, k, v = x[..., :H * D], x[..., H * D:(H + Hk) * D], x[..., (H + Hk) * D:]
        q, k, v = (t.view(B, L, -1, D).transpose(1, 2) for t in (q, k, v))
        if contiguous:
            q, k, v = (t.contiguous() for t in (q, k, v))
        kb._BWD_CONCURRENT = concurrent
        try:
            out = alibi_attention(q, k, v, slopes)
            return (out, *torch.autograd.grad(out, (q, k, v), do))  # as the backward returned them
        finally:
            kb._BWD_CONCURRENT = True

    views, dense = run(False), run(True)
    for name, a, b in zip(NAMES, views, dense):
        assert torch.equal(a, b), name
        assert a.transpose(1, 2).is_contiguous(), (name, a.stride())  # (B, L, H, D) in memory
        assert b.is_contiguous() and not b.transpose(1, 2).is_contiguous(), (name, b.stride())  # control
    for name, a, b in zip(NAMES, run(False, concurrent=False), views):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_grads_negative_control(gpu):
    """Wrong slopes (halved) in the kernel must break the 2x-SDPA bound the tests above assert."""
    res = compare(2, 4, 4, 700, 700, 64, torch.bfloat16, slope_factor=0.5)
    for n in NAMES:
        assert res["kernel"][n] > 2 * res["sdpa"][n], res


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,Hk,L,D,dtype,causal,slope_scale", [
    (1, 16, 16, 4097, 128, torch.bfloat16, True, 1.0),  # the slopes of 16 heads: the steep half skips
    (2, 8, 2, 1500, 64, torch.float16, True, 16.0),
    (1, 4, 4, 1000, 128, torch.bfloat16, False, 16.0),
    (1, 4, 1, 777, 32, torch.float32, True, 16.0),
])
def test_window_skips_tiles_and_changes_nothing(gpu, seed, B, H, Hk, L, D, dtype, causal, slope_scale):
    """The backward skips the tiles whose every P is below 2^-gap (skip_gap: the skipped P of a row
    sum to < 2^-32 of it). The claim: on these shapes it skips a fifth of the tiles or more, and
    out, dq, dk, dv are those of the full computation to fp32 rounding (max difference <= 1e-6 of
    the largest value; measured: equal). Control: a window cut short (gap -32; the bound is loose by
    its Cauchy-Schwarz term, so only a negative gap drops P that matter) changes the gradients by
    more than 1e-3 (measured 0.35-0.95)."""
    res = window_check(B, H, Hk, L, L, D, dtype, causal=causal, seed=seed, slope_scale=slope_scale)
    print("WINDOW", res)
    n_win, n_full = res["tiles"], res["tiles_full"]
    assert n_win[0] <= 0.8 * n_full[0] and n_win[1] <= 0.8 * n_full[1], res
    assert max(res["diff"].values()) <= 1e-6, res
    assert max(res["diff_cut"][n] for n in ("dq", "dk", "dv")) > 1e-3, res


def test_grads_interpreted_on_cpu():
    """The kernels (forward with lse, dK/dV, dQ) under Triton's CPU interpreter, in a subprocess
    (TRITON_INTERPRET is read at import), on the tiny shapes of kernel_grad_check.INTERPRET_CASES (two of them again through the
    TMA-descriptor loads), and the backward's window on kernel_grad_check.WINDOW_CASES (it skips
    tiles, changes nothing, and a window cut short does change the gradients), and with a NaN in v and
    dO (the window turns itself off);
    ~15 s on 2 cores. Bounds are the forward's (tests/test_kernels.py): fp16 2e-3 (P and dS
    rounded to 11-bit mantissas, measured 3.4e-4), fp32 1e-4 (tf32x3 dots, measured 4e-7). The
    last case runs the kernel with halved slopes and must miss the bound by far (measured 0.22)."""
    pytest.importorskip("triton")
    results = run_interpreted("kernel_grad_check.py")
    windows = [r for r in results if r.get("window")]
    nans = [r for r in results if r.get("nan")]
    results = [r for r in results if not (r.get("window") or r.get("nan"))]
    assert len(results) == 8 and len(windows) == 3 and len(nans) == 1, results
    for res in nans:  # a NaN in v and dO: the window is off (every tile computed), the gradients the full ones
        print("INTERPRET NAN", json.dumps(res))
        assert res["tiles"] == res["tiles_full"] and res["same"], res
    for res in windows:  # as test_window_skips_tiles_and_changes_nothing, on a few tiles only
        print("INTERPRET WINDOW", json.dumps(res))
        assert all(w < f for w, f in zip(res["tiles"], res["tiles_full"])), res
        assert max(res["diff"].values()) <= 1e-6, res
        assert max(res["diff_cut"][n] for n in ("dq", "dk", "dv")) > 1e-3, res
    tol = {"float16": 2e-3, "float32": 1e-4}
    for res in results:
        print("INTERPRET", json.dumps(res))
        worst = max(res["kernel"].values())
        if res.get("control"):
            assert worst > 20 * tol[res["dtype"]], res
        else:
            assert worst <= tol[res["dtype"]], res


@pytest.mark.slow
def test_window_spikes_interpreted_on_cpu():
    """The window's guarantee with v and dO 1e12 larger in a few rows, under Triton's CPU interpreter
    (kernel_grad_check.SPIKE_CASE, ~30 s on 2 cores): the skipped terms of every gradient stay below
    2^-32 of an ordinary one (module docstring of triton_alibi_bwd), so dq, dk, dv equal the full
    computation row by row (row-relative difference <= 1e-6; measured 0). Negative control: the window
    bounded by P alone (the window of before, ``_WINDOW_DATA_BOUND = False``) skips tiles whose
    P * 1e12 matter, and changes a row by more than 1e-3 (measured 2.9e-3 to 3.1e-3 in dq)."""
    pytest.importorskip("triton")
    res = run_interpreted("kernel_grad_check.py", "--spikes")[0]
    print("INTERPRET SPIKES", json.dumps(res))
    _assert_spike_result(res)


def _assert_spike_result(res):
    assert res["finite"], res
    assert max(res["diff"][n] for n in ("dq", "dk", "dv")) <= 1e-6, res
    assert max(res["diff_p_only"][n] for n in ("dq", "dk", "dv")) > 1e-3, res
    # the data term widens the window, yet the steep heads still skip tiles
    assert all(p <= w < f for p, w, f in zip(res["tiles_p_only"], res["tiles"], res["tiles_full"])), res


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,Hk,L,D,dtype,causal,slope_scale", [
    (1, 8, 8, 4097, 64, torch.bfloat16, True, 1.0),
    (1, 8, 2, 3000, 128, torch.float32, True, 1.0),
    (1, 4, 4, 2000, 64, torch.bfloat16, False, 4.0),
])
def test_window_holds_with_spiked_values_and_gradients(gpu, seed, B, H, Hk, L, D, dtype, causal, slope_scale):
    """As test_window_spikes_interpreted_on_cpu on real shapes: v and dO 1e12 larger in two rows per head
    (bf16 holds 1e12 and 1e24; fp32 throughout), q scaled by 0.01 (small scores: the P just past the
    window sit near its bound). The window's gradients equal the full ones row by row (<= 1e-6); the
    window bounded by P alone changes some row by more than 1e-3."""
    from tests.kernel_grad_check import spike_check

    res = spike_check(B, H, Hk, L, L, D, dtype, causal=causal, seed=seed, slope_scale=slope_scale)
    print("SPIKES", res)
    _assert_spike_result(res)


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_window_is_off_on_nan_or_inf(gpu, seed, bad):
    """A NaN or an inf in v and dO of every (batch, head): the window, decided per (batch, head), turns itself
    off (every tile computed, as without it), so the gradients are the full computation's, NaNs and all.
    Control: the same shape with finite data skips."""
    from tests.kernel_grad_check import nan_check, window_check

    res = nan_check(1, 8, 8, 2048, 2048, 64, torch.bfloat16, seed=seed, bad=bad)
    assert res["tiles"] == res["tiles_full"] and res["same"], res
    ok = window_check(1, 8, 8, 2048, 2048, 64, torch.bfloat16, seed=seed)
    assert ok["tiles"][0] < ok["tiles_full"][0] and ok["tiles"][1] < ok["tiles_full"][1], ok


@pytest.mark.gpu
def test_model_training_grads(gpu):
    """One training step's parameter gradients of a 2-layer bf16 AlibiLM through the kernel
    ("triton") and through SDPA with the materialized bias ("sdpa", what training used before),
    both against an fp32 eager copy of the same weights. The bf16 model's own rounding (weights,
    activations, P) dominates both, so the kernel must be no worse than SDPA: error <= 1.5x SDPA's
    + 2e-3 (the margin test_model_triton_matches_eager uses for logits). Negative control: the
    kernel with the slopes zeroed (plain causal attention) misses that bound."""
    from alibi_export.model import AlibiLM, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, n_layer=2, n_head=8, d_model=256, d_ff=512, train_len=300)
    base = AlibiLM(cfg)
    with torch.no_grad():
        for block in base.blocks:
            block.attn.qkv.weight.mul_(4.0)
    ids = torch.randint(0, 512, (2, 301), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(3))

    def grads(impl, dtype, zero_slopes=False):
        m = AlibiLM(cfg)
        m.load_state_dict(base.state_dict())
        m = m.to("cuda", dtype).train().set_attention(impl)
        if zero_slopes:
            m.pos.slopes.zero_()
        logits = m(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        return torch.cat([p.grad.float().flatten() for p in m.parameters()])

    ref = grads("eager", torch.float32)
    rel = lambda g: ((g - ref).norm() / ref.norm()).item()  # noqa: E731
    e_tri, e_sdpa = rel(grads("triton", torch.bfloat16)), rel(grads("sdpa", torch.bfloat16))
    e_wrong = rel(grads("triton", torch.bfloat16, zero_slopes=True))
    print(f"MODEL GRADS vs fp32: triton {e_tri:.2e}, sdpa {e_sdpa:.2e}, triton without ALiBi "
          f"{e_wrong:.2e}")
    assert e_tri <= 1.5 * e_sdpa + 2e-3, (e_tri, e_sdpa)
    assert e_wrong > 1.5 * e_sdpa + 2e-3, (e_wrong, e_sdpa)


@pytest.mark.gpu
def test_dropout_says_attention_stays_on_kernel(gpu, caplog, monkeypatch, seed):
    """ModelConfig.dropout > 0 drops embeddings and residual branches, not attention weights: the
    kernel keeps training attention, and the model says so once."""
    import alibi_export.kernels as K
    from alibi_export import model as model_mod
    from alibi_export.model import AlibiLM, ModelConfig

    calls = []
    real = K.alibi_attention
    monkeypatch.setattr(K, "alibi_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(model_mod, "_WARNED", set())
    cfg = ModelConfig(vocab_size=512, n_layer=2, n_head=8, d_model=256, d_ff=512, dropout=0.1)
    torch.manual_seed(seed)  # weights, ids and dropout masks (CPU and CUDA generators)
    model = AlibiLM(cfg).to("cuda").train()
    ids = torch.randint(0, 512, (2, 100), device="cuda")
    with caplog.at_level("WARNING", logger="alibi_export.model"):
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(ids).float().mean().backward()
    said = [r for r in caplog.records if "no dropout" in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert len(calls) == 2 * cfg.n_layer
