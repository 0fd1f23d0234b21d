"""ALiBi's math, in one place: the per-head slopes and the additive bias.

Everything else in the project (the PyTorch model, the ONNX graph builder, the fused
kernels, the tests) takes its slopes from :func:`alibi_slopes` and, where a dense bias is
needed at all, builds it with :func:`alibi_bias`.
"""
from __future__ import annotations

import math

import torch

__all__ = ["alibi_slopes", "alibi_bias"]


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


def alibi_bias(
    slopes: torch.Tensor,
    q_len: int | torch.SymInt,
    k_len: int | torch.SymInt,
    *,
    past_len: int | torch.SymInt = 0,
    causal: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive attention bias of shape (H, q_len, k_len): m_h * (j - i).

    Query i sits at absolute position ``past_len + i``; key j at position j. The bias is not
    scaled by 1/sqrt(d). With ``causal`` the keys after each query get -inf (the bias term
    itself is <= 0 there). Without it the bidirectional form -m_h * |j - i| is returned.
    Sizes may be symbolic so that an export keeps them dynamic.
    """
    device = slopes.device
    q_pos = torch.arange(q_len, device=device) + past_len  # (q_len,)
    k_pos = torch.arange(k_len, device=device)  # (k_len,)
    rel = (k_pos[None, :] - q_pos[:, None]).to(torch.float32)  # (q_len, k_len), j - i
    if not causal:
        rel = -rel.abs()
    bias = slopes.to(torch.float32)[:, None, None] * rel[None]  # (H, q_len, k_len)
    if causal:
        bias = bias.masked_fill(rel[None] > 0, float("-inf"))
    return bias.to(dtype)
