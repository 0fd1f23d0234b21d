"""Fused Triton ALiBi attention against a float64 reference of the same formula.

GPU tests skip on machines without triton or without a CUDA GPU. Tolerances are on
||out - ref|| / ||ref||, the reference computed in float64 on the GPU from the same (rounded)
inputs:
  * bf16 <= 1e-2: P is rounded to bf16 (8-bit mantissa, ~2e-3 relative) before the P@V matmul
    and the output is rounded to bf16 (~2e-3); typical 3e-3.
  * fp16 <= 2e-3: same with a 11-bit mantissa (~3e-4 each); typical 5e-4.
  * fp32 <= 1e-4: the kernel asks tl.dot for input_precision="tf32x3" (three TF32 passes, error
    ~1e-6) on fp32 inputs; plain TF32 measured 8e-4..9.6e-4 on the H100, too close to 1e-3.
"""
from __future__ import annotations

import math

import pytest
import torch

from alibi_export.alibi import alibi_bias, alibi_slopes

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def test_import_is_lazy_and_error_is_actionable():
    """Runs everywhere: importing the package never needs triton."""
    import alibi_export.kernels as K

    if K.triton_available():
        pytest.skip("triton is installed; the missing-triton error path is not reachable")
    with pytest.raises(ImportError, match="pip install triton"):
        K.alibi_attention(torch.zeros(1, 1, 1, 64), torch.zeros(1, 1, 1, 64),
                          torch.zeros(1, 1, 1, 64), torch.ones(1))


@pytest.fixture(scope="module")
def ka():
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (NVIDIA) for the Triton kernel")
    from alibi_export.kernels import triton_alibi

    return triton_alibi


def reference(q, k, v, slopes, causal, past_len, chunk=4096):
    """float64 softmax(q k^T / sqrt(D) + alibi_bias) v, computed in chunks of queries."""
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    g = H // Hk
    k64 = k.double().repeat_interleave(g, 1)
    v64 = v.double().repeat_interleave(g, 1)
    out = torch.empty(B, H, Lq, D, dtype=torch.float64, device=q.device)
    for c0 in range(0, Lq, chunk):
        c1 = min(Lq, c0 + chunk)
        bias = alibi_bias(slopes, c1 - c0, Lk, past_len=past_len + c0, causal=causal,
                          dtype=torch.float64)
        s = q[:, :, c0:c1].double() @ k64.transpose(-1, -2) / math.sqrt(D) + bias[None]
        out[:, :, c0:c1] = torch.softmax(s, -1) @ v64
        del s, bias
    return out


def check(ka, B, H, Hk, Lq, Lk, D, dtype, causal=True, past_len=None, layout="bhld",
          pointer=False):
    dev = "cuda"
    if layout == "blhd":  # views with non-standard strides, as from a (B, L, H, D) projection
        q = torch.randn(B, Lq, H, D, device=dev, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, Lk, Hk, D, device=dev, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, Lk, Hk, D, device=dev, dtype=dtype).transpose(1, 2)
    elif layout == "sliced":  # a head-dim slice of a wider tensor: strides not 16-byte aligned
        q = torch.randn(B, H, Lq, D + 8, device=dev, dtype=dtype)[..., 3:3 + D]
        k = torch.randn(B, Hk, Lk, D + 8, device=dev, dtype=dtype)[..., 1:1 + D]
        v = torch.randn(B, Hk, Lk, D + 8, device=dev, dtype=dtype)[..., 5:5 + D]
    else:
        q = torch.randn(B, H, Lq, D, device=dev, dtype=dtype)
        k = torch.randn(B, Hk, Lk, D, device=dev, dtype=dtype)
        v = torch.randn(B, Hk, Lk, D, device=dev, dtype=dtype)
    slopes = torch.tensor(alibi_slopes(H), dtype=torch.float32, device=dev)
    out = torch.full((B, H, Lq, D), float("nan"), device=dev, dtype=dtype)  # poisoned
    if pointer:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        ka.launch_alibi_attention(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), slopes.data_ptr(),
            batch=B, heads=H, kv_heads=Hk, q_len=Lq, kv_len=Lk, head_dim=D, past_len=past_len,
            dtype=dtype, stream=stream.cuda_stream, causal=causal)
        stream.synchronize()
    else:
        ka.alibi_attention(q, k, v, slopes, causal=causal, past_len=past_len, out=out)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "output not fully written (NaN poison left) or non-finite"
    ref = reference(q, k, v, slopes, causal, Lk - Lq if past_len is None else past_len)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"ERR {err:.2e} {str(dtype)[6:]} B={B} H={H}/{Hk} Lq={Lq} Lk={Lk} D={D} "
          f"causal={causal} past={past_len} {layout}{' ptr' if pointer else ''}")
    assert err <= TOL[dtype], f"rel err {err:.2e} > {TOL[dtype]:.0e}"
    return err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_dtypes_headdims(ka, dtype, D, causal):
    check(ka, 2, 12, 12, 1000, 1000, D, dtype, causal)


@pytest.mark.parametrize("L", [1, 17, 255, 4097])
def test_lengths(ka, L):
    check(ka, 3, 4, 4, L, L, 128, torch.bfloat16)
    check(ka, 1, 5, 5, L, L, 64, torch.float16)


def test_long_32768(ka):
    check(ka, 1, 2, 2, 32768, 32768, 128, torch.bfloat16)
    check(ka, 1, 2, 2, 32768, 32768, 64, torch.float16)


@pytest.mark.parametrize("Lq,Lk,past", [(255, 1000, None), (300, 1000, 100), (129, 4097, None),
                                        (1000, 1000, 0)])
def test_past_len(ka, Lq, Lk, past):
    check(ka, 2, 8, 8, Lq, Lk, 128, torch.bfloat16, past_len=past)
    check(ka, 1, 8, 8, Lq, Lk, 64, torch.float16, causal=False, past_len=past)


@pytest.mark.parametrize("H,Hk", [(12, 4), (8, 1), (16, 2)])
def test_gqa_mqa(ka, H, Hk):
    check(ka, 2, H, Hk, 1000, 1000, 128, torch.bfloat16)
    check(ka, 2, H, Hk, 1, 4097, 128, torch.bfloat16)          # decode
    check(ka, 1, H, Hk, 7, 2000, 64, torch.float16, causal=False)


@pytest.mark.parametrize("Lk", [1, 1000, 4097, 32768])
@pytest.mark.parametrize("B", [1, 3])
def test_decode(ka, Lk, B):
    check(ka, B, 8, 8, 1, Lk, 128, torch.bfloat16)
    check(ka, B, 12, 12, 1, Lk, 64, torch.float16)


def test_decode_small_q_and_noncausal(ka):
    check(ka, 2, 8, 8, 4, 4097, 128, torch.bfloat16)           # speculative decode, 4 queries
    check(ka, 2, 8, 8, 1, 4097, 128, torch.float32)
    check(ka, 2, 8, 8, 1, 5000, 64, torch.bfloat16, causal=False)
    check(ka, 1, 4, 4, 3, 50, 128, torch.float16, past_len=10)


@pytest.mark.parametrize("layout", ["blhd", "sliced"])
def test_strided_views(ka, layout):
    check(ka, 2, 6, 3, 517, 517, 64, torch.bfloat16, layout=layout)
    check(ka, 2, 6, 3, 1, 900, 64, torch.bfloat16, layout=layout)


@pytest.mark.parametrize("D", [16, 32])
def test_small_head_dims(ka, D):
    check(ka, 2, 4, 4, 300, 300, D, torch.float16)
    check(ka, 2, 4, 4, 1, 300, D, torch.float16)


def test_prefill_configs(ka):
    """Every config the benchmark may pick computes the same function."""
    try:
        for cfg in [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3)]:
            ka._CONFIG_OVERRIDE = cfg
            check(ka, 1, 4, 4, 700, 700, 128, torch.bfloat16)
            check(ka, 1, 4, 4, 700, 700, 64, torch.bfloat16)
    finally:
        ka._CONFIG_OVERRIDE = None


def test_pointer_path_without_tma(ka):
    try:
        ka._TMA_OVERRIDE = False
        check(ka, 2, 8, 4, 600, 600, 128, torch.bfloat16)
        check(ka, 2, 8, 4, 1, 3000, 128, torch.bfloat16)
    finally:
        ka._TMA_OVERRIDE = None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pointer_launcher(ka, dtype):
    check(ka, 2, 8, 2, 333, 333, 128, dtype, pointer=True)
    check(ka, 2, 8, 8, 1, 5000, 64, dtype, pointer=True)             # decode, split-KV
    check(ka, 1, 4, 4, 100, 400, 128, dtype, causal=False, pointer=True)
    with pytest.raises(ValueError):
        ka.launch_alibi_attention(1, 1, 1, 1, 1, batch=1, heads=3, kv_heads=2, q_len=1,
                                  kv_len=1, head_dim=64, dtype=dtype, stream=0)


def test_validation(ka):
    dev = "cuda"
    q = torch.randn(1, 4, 8, 64, device=dev, dtype=torch.float16)
    s = torch.ones(4, device=dev)
    with pytest.raises(ValueError, match="4-D"):
        ka.alibi_attention(q[0], q, q, s)
    with pytest.raises(ValueError, match="dtype"):
        ka.alibi_attention(q.double(), q.double(), q.double(), s)
    with pytest.raises(ValueError, match="share a dtype"):
        ka.alibi_attention(q, q.bfloat16(), q, s)
    with pytest.raises(ValueError, match="CUDA"):
        ka.alibi_attention(q.cpu(), q.cpu(), q.cpu(), s)
    with pytest.raises(ValueError, match="multiple"):
        ka.alibi_attention(q, q[:, :3], q[:, :3], s)
    with pytest.raises(ValueError, match="head_dim"):
        ka.alibi_attention(q[..., :48], q[..., :48], q[..., :48], s)
    with pytest.raises(ValueError, match="slope"):
        ka.alibi_attention(q, q, q, s[:3])
    with pytest.raises(ValueError, match="past_len"):
        ka.alibi_attention(q, q[:, :, :4], q[:, :, :4], s)
