"""How far back each ALiBi head can still matter, proved from the weights alone (the exact KV window).

Why a bound and not a measurement: a rolling window (``--kv-window W``) drops keys beyond W, and a measured
attention map only says what one text did. Here the distance beyond which every softmax weight of a head is
below 2^-g follows from the weights, for every input:

- The query attends to itself (causal), so its log-sum-exp is at least its own score ``s_ii``, and
  ``log P_ij = s_ij - lse_i <= s_ij - s_ii = scale * q_i . (k_j - k_i) - m_h * (i - j)``.
- Attention reads a LayerNorm's output ``x = gamma * n + beta`` with ``|n| <= sqrt(d)``; so
  ``|x| <= G sqrt(d) + |beta|`` and ``|x_j - x_i| <= 2 G sqrt(d)`` (beta cancels), ``G = max |gamma|``.
- ``q_i . (k_j - k_i) = (W_k^T (W_q x_i + b_q)) . (x_j - x_i)`` (the key bias cancels) is at most
  ``(||W_k^T W_q|| |x_i| + |W_k^T b_q|) * 2 G sqrt(d)``: the spectral norm of the head's q.k product matrix.
  MPT's clipped projections are bounded instead by ``|q| |k_j - k_i| <= |q| * 2 |k|_max``, with each
  clipped vector at most ``clip * sqrt(head_dim)`` long.

So the weights at distance ``d`` fall at least geometrically, ``P <= exp(B_h - m_h d)``, and all keys at distance
``D_h`` or more weigh together at most ``exp(B_h - m_h D_h) / (1 - exp(-m_h))``: below 2^-gap from
``D_h = (B_h + gap ln 2 - ln(1 - exp(-m_h))) / m_h`` on, whatever the row's length. A rolling window of
``max_h D_h`` tokens therefore changes no attention output by more than 2^-gap of its values' range, in a stream
of any length: what ``--kv-window exact`` uses. A head whose ``D_h`` reaches the context needs the full cache,
and the report names it: small slopes (the last heads) are the usual ones.

The bound is loose where norms are large (it assumes the worst alignment of q and k); it is never wrong.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import AlibiExportError

__all__ = ["Reach", "provable_reach", "reach_of", "write_reach_json", "DEFAULT_GAP_BITS"]

DEFAULT_GAP_BITS = 32.0  # the fused backward's window uses the same margin (kernels/triton_alibi_bwd.py)


@dataclass(frozen=True)
class Reach:
    """Per layer and head, the distance from which every weight is provably negligible (``distances``), for
    rows of up to ``context`` tokens."""

    distances: tuple[tuple[float, ...], ...]  # (layers, heads) in tokens; inf: no slope, nothing is negligible
    context: int  # the row length the report is for: a head whose distance reaches it needs the full cache
    gap_bits: float

    @property
    def window(self) -> int:
        """The smallest rolling window that keeps every key any head may still need (at most the context)."""
        return int(min(max(max(row) for row in self.distances), self.context))

    @property
    def full_heads(self) -> list[tuple[int, int]]:
        """(layer, head) of the heads that need every key of a ``context``-token row."""
        return [(li, h) for li, row in enumerate(self.distances) for h, d in enumerate(row) if d >= self.context]

    def to_dict(self) -> dict:
        return {"producer": "alibi-export", "context": self.context, "gap_bits": self.gap_bits, "window": self.window,
                "distances": [[d if math.isfinite(d) else None for d in row] for row in self.distances],
                "full_heads": [list(x) for x in self.full_heads]}

    def report(self) -> str:
        """A table a person reads: one line per layer, 'full' where a head needs the whole context."""
        lines = [f"provable reach per head in tokens (the keys beyond it weigh < 2^-{self.gap_bits:g} of a row "
                 f"together), context {self.context}:"]
        for li, row in enumerate(self.distances):
            cells = " ".join("full" if d >= self.context else str(int(d)) for d in row)
            lines.append(f"  layer {li}: {cells}")
        full = self.full_heads
        if full:
            lines.append(f"{len(full)} of {sum(map(len, self.distances))} heads need the full context: no window "
                         f"shorter than {self.context} is exact here")
        else:
            lines.append(f"exact window: {self.window} tokens, for a stream of any length")
        return "\n".join(lines)


def _layer_norm_bounds(ln) -> tuple[float, float]:
    """(bound on |x|, bound on |x_j - x_i|) for x the LayerNorm's output."""
    d = ln.normalized_shape[0]
    g = ln.weight.detach().abs().max().item() * math.sqrt(d) if ln.weight is not None else math.sqrt(d)
    beta = ln.bias.detach().norm().item() if ln.bias is not None else 0.0
    return g + beta, 2.0 * g


def _score_bounds(block, cfg) -> list[float]:
    """Per head, a bound on ``scale * q_i . (k_j - k_i)`` over all inputs (the module docstring's algebra)."""
    H, KV, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    C = H * D
    x_max, dx_max = _layer_norm_bounds(block.ln_1)
    attn = block.attn
    w = attn.qkv.weight.detach().double()
    b = attn.qkv.bias.detach().double() if attn.qkv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    gain = attn.q_gain if attn.q_gain is not None else 1.0
    scale = abs(gain) / math.sqrt(D)  # every attend scales q.k by 1/sqrt(head_dim); q_gain rescales q
    bounds = []
    for h in range(H):
        g = h // (H // KV)
        wq, bq = w[h * D:(h + 1) * D], b[h * D:(h + 1) * D]
        wk, bk = w[C + g * D:C + (g + 1) * D], b[C + g * D:C + (g + 1) * D]
        if cfg.clip_qkv is None:
            u = torch.linalg.matrix_norm(wk.T @ wq, 2).item() * x_max + (wk.T @ bq).norm().item()
            bounds.append(scale * u * dx_max)
        else:
            clip = cfg.clip_qkv * math.sqrt(D)
            q = min(torch.linalg.matrix_norm(wq, 2).item() * x_max + bq.norm().item(), clip)
            k = min(torch.linalg.matrix_norm(wk, 2).item() * x_max + bk.norm().item(), clip)
            bounds.append(scale * q * 2.0 * k)
    return bounds


def provable_reach(model, *, context: int, gap_bits: float = DEFAULT_GAP_BITS) -> Reach:
    """The :class:`Reach` of an ALiBi :class:`~alibi_export.model.AlibiLM` for rows of up to ``context`` tokens."""
    cfg = model.config
    if cfg.position != "alibi":
        raise AlibiExportError(f"the model uses {cfg.position} positions: only ALiBi's bias bounds how far a head "
                               "reaches. Note: a rolling window is exact for ALiBi models only")
    if not isinstance(context, int) or context < 1:
        raise AlibiExportError(f"the context must be a positive number of tokens, got {context!r}")
    slopes = model.pos.head_slopes()
    if slopes is None:  # Falcon's bf16-rounded bias is not m * distance exactly
        raise AlibiExportError("this model rounds its ALiBi bias in bfloat16 (Falcon's alibi_bf16), so its distances "
                               "are not exact and no reach is proved. Note: pass a number to --kv-window")
    distances = []
    for block in model.blocks:
        row = []
        for m, bound in zip(slopes.tolist(), _score_bounds(block, cfg)):
            if not (m > 0 and math.isfinite(bound)):
                row.append(math.inf)  # no slope (or a NaN weight): nothing is provably negligible
                continue
            # the keys at distance >= this weigh < 2^-gap together (a geometric tail; module docstring)
            x = (bound + gap_bits * math.log(2) - math.log1p(-math.exp(-m))) / m
            row.append(float(math.floor(x) + 1))
        distances.append(tuple(row))
    return Reach(tuple(distances), context, gap_bits)


def reach_of(checkpoint, *, context: int | None = None, gap_bits: float = DEFAULT_GAP_BITS) -> Reach:
    """:func:`provable_reach` of a checkpoint folder, for rows of ``context`` tokens (default: 64 times its
    training length); an export holds no weights this reads (one-line error)."""
    from pathlib import Path

    path = Path(checkpoint)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise AlibiExportError(f"{str(checkpoint)!r} is not a checkpoint folder: the reach is proved from a "
                               "checkpoint's weights. Note: run `alibi-export reach CHECKPOINT` and pass its window "
                               "to --kv-window as a number")
    from .checkpoint import load

    model = load(path).model
    return provable_reach(model, context=context or 64 * model.config.train_len, gap_bits=gap_bits)


def write_reach_json(reach: Reach, path) -> None:
    """The report as JSON, written to a temporary name and renamed; a file this tool did not write is refused."""
    import json

    from ._io import atomic_path
    from .perplexity import check_outputs

    check_outputs(path, None, kind="reach")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(reach.to_dict(), indent=2) + "\n")
