"""The PyTorch model as a Polygraphy runner: the reference side of every comparison.

With ``kv_window`` W it scores as if each token saw only its last W tokens (``ppl --kv-window``), in blocks
of queries over the previous tokens' cache with a banded mask: the same result as decoding one token at a
time through a rolling window of W (tests/test_window.py), at the cost of a forward pass.
"""
from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

__all__ = ["TorchRunner", "windowed_logits", "banded_attend"]

_MIN_BLOCK = 128  # queries per block at least: a window of a few tokens would otherwise run one pass per token


class TorchRunner(BaseRunner):
    """Runs an :class:`~alibi_export.model.AlibiLM` (or a callable returning one) on ``input_ids``.

    Polygraphy's own PytRunner moves inputs to CUDA unconditionally; this one runs where the model is.
    """

    def __init__(self, model, *, name: str | None = None, kv_window: int | None = None):
        super().__init__(name=name, prefix="pytorch-runner")
        self._model, self.kv_window = model, kv_window

    def activate_impl(self):
        self.model = self._model() if callable(self._model) and not isinstance(self._model, torch.nn.Module) \
            else self._model
        self.model.eval()
        self.device = next(self.model.parameters()).device

    def get_input_metadata_impl(self):
        return TensorMetadata().add("input_ids", dtype=np.int64, shape=["batch", "sequence"])

    def infer_impl(self, feed_dict):
        ids = torch.as_tensor(np.asarray(feed_dict["input_ids"]), dtype=torch.int64, device=self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            logits = self.model(ids) if self.kv_window is None else windowed_logits(self.model, ids, self.kv_window)
        self.inference_time = time.perf_counter() - start
        return OrderedDict(logits=logits.float().cpu().numpy())

    def deactivate_impl(self):
        del self.model


def banded_attend(window: int):
    """An attend (see ``model.attend_eager``) in which query i sees keys j with 0 <= i - j < ``window`` only."""
    import torch.nn.functional as F

    def attend(q, k, v, pos, past_len, key_mask=None):
        q_len, k_len = q.shape[2], k.shape[2]
        bias = pos.bias(q_len, k_len, past_len, key_mask).float()  # ALiBi, -inf on future keys
        i = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)  # the queries are the last keys
        far = i - torch.arange(k_len, device=q.device)[None, :] >= window
        bias = bias.masked_fill(far, float("-inf"))
        if key_mask is not None:
            bias = bias + key_mask.float()
        heads = q.shape[1]
        k, v = (t.expand(t.shape[0], heads, *t.shape[2:]) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))

    return attend


def windowed_logits(model, input_ids: torch.Tensor, window: int) -> torch.Tensor:
    """Logits (B, L, V) of ``model`` (an ALiBi AlibiLM) where each token sees only its last ``window`` tokens.

    Blocks of max(window, 128) queries run over the keys and values that the previous blocks left at every
    layer, cut to their last ``window`` tokens, with :func:`banded_attend`: a block costs queries x (queries +
    window) scores, so the time is linear in L and the memory flat."""
    from .window import check_window, check_window_form

    check_window_form(model.config, None, "the model")
    window = check_window(window)
    cfg, (batch, length) = model.config, input_ids.shape
    block = max(window, _MIN_BLOCK)
    dtype = next(model.parameters()).dtype
    empty = torch.zeros(batch, cfg.kv_heads, 0, cfg.head_dim, dtype=dtype, device=input_ids.device)
    past = [(empty, empty) for _ in range(cfg.n_layer)]
    saved = [b.attn.attend for b in model.blocks]
    out = []
    try:
        for b in model.blocks:
            b.attn.attend = banded_attend(window)
        for start in range(0, length, block):
            logits, presents = model(input_ids[:, start:start + block], past_key_values=past)
            out.append(logits)
            past = [(k[:, :, -window:], v[:, :, -window:]) for k, v in presents]
    finally:
        for b, attend in zip(model.blocks, saved):
            b.attn.attend = attend
    return torch.cat(out, dim=1)
