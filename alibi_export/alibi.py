"""ALiBi's math, in one place: the per-head slopes and the additive bias.

Everything else in the project (the PyTorch model, the ONNX graph builder, the fused
kernels, the tests) takes its slopes from :func:`alibi_slopes` and, where a dense bias is
needed at all, builds it with :func:`alibi_bias`.
"""
from __future__ import annotations

import math

import torch

__all__ = ["alibi_slopes", "mpt_alibi_slopes", "slopes_for", "SLOPE_RULES", "alibi_bias", "alibi_bias_bf16",
           "token_positions"]

SLOPE_RULES = ("paper", "mpt")


def _power_of_two_slopes(n: int) -> list[float]:
    # Geometric sequence starting at 2^(-8/n) with the same ratio: m_h = 2^(-8h/n), h = 1..n.
    start = 2.0 ** (-8.0 / n)
    return [start ** (h + 1) for h in range(n)]


def alibi_slopes(num_heads: int) -> list[float]:
    """Per-head slopes m_h as in Press et al.'s reference implementation.

    For a head count that is not a power of two, the reference takes the slopes of the
    closest smaller power of two, then interleaves every other slope of the next power of
    two until ``num_heads`` slopes are chosen.
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    if num_heads & (num_heads - 1) == 0:
        return _power_of_two_slopes(num_heads)
    closest = 2 ** int(math.floor(math.log2(num_heads)))
    extra = alibi_slopes(2 * closest)[0::2][: num_heads - closest]
    return _power_of_two_slopes(closest) + extra


def mpt_alibi_slopes(num_heads: int, bias_max: float = 8.0) -> list[float]:
    """MPT's slopes (MosaicML's ``gen_slopes``): m_k = 2^(-k * bias_max / N), k = 1..N, with N the next
    power of two at or above ``num_heads``.

    For a head count that is not a power of two MPT keeps N slopes and takes every second one
    (k = 2, 4, ...) first, then the others, cut to ``num_heads``; with ``bias_max`` 8 that is exactly
    the paper's rule (tested), so only ``bias_max`` makes MPT's slopes differ. Computed in float32 as
    MPT does, so a float32 model sees bit-identical slopes."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    if not bias_max > 0:
        raise ValueError(f"alibi_bias_max must be positive, got {bias_max!r}")
    n = 2 ** math.ceil(math.log2(num_heads))
    # On the CPU whatever the default device: a meta-device model (parameter_count) still gets real slopes.
    exponent = torch.arange(1, n + 1, dtype=torch.int64, device="cpu").float() * (bias_max / n)
    slopes = 1.0 / torch.pow(2, exponent)  # float32, as MPT computes them
    if n != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes.tolist()


def slopes_for(rule: str, num_heads: int, bias_max: float = 8.0) -> list[float]:
    """The slopes of a named rule: "paper" (Press et al.; BLOOM and Falcon) or "mpt"."""
    if rule == "paper":
        return alibi_slopes(num_heads)
    if rule == "mpt":
        return mpt_alibi_slopes(num_heads, bias_max)
    raise ValueError(f"unknown ALiBi slope rule {rule!r}. Note: expected one of {SLOPE_RULES}")


def alibi_bias_bf16(slopes: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """Falcon's ALiBi term, bf16(bf16(m_h) * bf16(j)), returned in float32: shape (..., H, 1, Lk).

    Falcon (the RW models and transformers' port of them) computes the bias in bfloat16 from each
    key's absolute position ``j`` (counted from the first real token), whatever the model's dtype:
    the position and the product are rounded to 8 significant bits, so keys past 256 share
    rounded positions. This is the trained model's math and is reproduced as is. Softmax ignores a
    per-query constant, so the query's position does not enter. ``key_positions``: (Lk,) or (B, Lk)."""
    bf16 = torch.bfloat16
    m = slopes.to(bf16).to(torch.float32)  # (H,)
    j = key_positions.to(torch.float32).to(bf16).to(torch.float32)  # (..., Lk)
    return (m[:, None, None] * j[..., None, None, :]).to(bf16).to(torch.float32)  # (..., H, 1, Lk)


def token_positions(real: torch.Tensor) -> torch.Tensor:
    """(B, Lk) float32 position of each key among the real tokens of its row: cumsum(real) - 1, 0 before the first.

    ``real``: (B, Lk), true (or 1) for real tokens, false for padding. Padding is skipped wherever it sits:
    on the left (this project's GenerationSession), or on the right of a prompt with the generated tokens
    after it, as onnxruntime-genai batches prompts (its mask then has a hole). Hugging Face's BLOOM and
    Falcon count ALiBi positions the same way (the attention mask's cumulative sum)."""
    return (real.to(torch.float32).cumsum(-1) - 1).clamp(min=0)


def alibi_bias(
    slopes: torch.Tensor,
    q_len: int | torch.SymInt,
    k_len: int | torch.SymInt,
    *,
    past_len: int | torch.SymInt = 0,
    causal: bool = True,
    dtype: torch.dtype = torch.float32,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive attention bias of shape (H, q_len, k_len): m_h * (j - i).

    Query i sits at absolute position ``past_len + i``; key j at position j. The bias is not
    scaled by 1/sqrt(d). With ``causal`` the keys after each query get -inf (the bias term
    itself is <= 0 there). Without it the bidirectional form -m_h * |j - i| is returned.
    Sizes may be symbolic so that an export keeps them dynamic.

    ``positions`` (B, k_len), from :func:`token_positions`, puts padded batches' tokens at their
    positions among their row's real tokens: the distance becomes p_j - p_i (the queries are the
    last q_len keys) and the result (B, H, q_len, k_len); the causal mask stays on the raw indices.
    """
    device = slopes.device
    q_pos = torch.arange(q_len, device=device) + past_len  # (q_len,)
    k_pos = torch.arange(k_len, device=device)  # (k_len,)
    rel = (k_pos[None, :] - q_pos[:, None]).to(torch.float32)  # (q_len, k_len), j - i
    future = rel > 0
    if positions is not None:
        rel = positions[:, None, :] - positions[:, k_len - q_len:, None]  # (B, q_len, k_len): p_j - p_i
    if not causal:
        rel = -rel.abs()
    bias = slopes.to(torch.float32)[:, None, None] * rel[..., None, :, :]  # (H, q, k) or (B, H, q, k)
    if causal:
        bias = bias.masked_fill(future, float("-inf"))
    return bias.to(dtype)
