"""A rolling KV window: each row attends to its last W tokens only, so memory and time per token stay flat.

Why dropping cache columns needs no re-export: ALiBi's bias is m * (p_j - p_i), a function of distances
only, and the KV-cache export counts positions as the cumulative sum of the attention mask
(``alibi.token_positions``). Dropping the oldest columns of the cache and of the mask together lowers
every remaining key's position and the new query's by the same amount, so the distances inside the
window stay exact. Masking a column (0 in the mask) drops it from the positions' count in the same way,
which is how a window is applied between two physical cuts (``slack``).

Two exceptions, refused by :func:`check_window_form`: the ``onnx`` attention form stores each key's
absolute position in its cache columns (the new query's position restarts after a cut, the stored keys'
do not), and position methods other than ALiBi (their positions are absolute).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import AlibiExportError

__all__ = ["check_window", "check_window_form", "window_mask", "trim_window"]


def check_window(window) -> int:
    """``window`` as a positive int, or a one-line error."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise AlibiExportError(f"the KV window must be a positive number of tokens, got {window!r}")
    return int(window)


def check_window_form(config, cache_width: int | None, what: str) -> None:
    """Refuse a model whose distances a cut would change: a non-ALiBi position method, or a cache wider than
    the heads (the onnx attention form, whose extra columns hold each key's absolute position)."""
    if config.position != "alibi":
        raise AlibiExportError(f"{what} uses {config.position} positions; a rolling KV window keeps distances "
                               "exact for ALiBi only. Note: drop --kv-window")
    if cache_width is not None and cache_width != config.head_dim:
        raise AlibiExportError(f"{what} is the onnx attention form, whose cache holds each key's absolute position, "
                               "so a rolling window would shift the new tokens' positions only. Note: export with "
                               "--attention decomposed or plugin for --kv-window")


def window_mask(mask: np.ndarray, window: int, incoming: int = 1) -> np.ndarray:
    """A copy of ``mask`` (B, past) whose columns older than the last ``window - incoming`` are masked, so that
    the next step's ``incoming`` tokens each see at most ``window`` tokens (themselves included).

    Rows are right-aligned (their newest token in the last column, padding or holes on the left: this
    project's GenerationSession and serving batches), so the last columns are each row's last tokens."""
    keep = window - incoming
    if keep < 0:
        raise AlibiExportError(f"{incoming} tokens in one step do not fit a KV window of {window}")
    out = np.array(mask, dtype=np.int64, copy=True)
    out[:, :max(out.shape[1] - keep, 0)] = 0
    return out


def trim_window(cache: Sequence, mask: np.ndarray, window: int, *, incoming: int = 1, slack: int = 0,
                device: str = "cpu", device_id: int = 0, cut=None) -> tuple[list, np.ndarray]:
    """The cache and mask for a step of ``incoming`` new tokens under a rolling window of ``window`` tokens.

    Columns older than the window are masked (:func:`window_mask`); once more than ``slack`` such columns
    are held they are cut from the cache and the mask together, so the cache never exceeds
    ``window - incoming + slack`` columns. ``slack`` > 0 trades that many columns of memory for copying
    the cache once every ``slack`` steps instead of at every step. ``cache``: arrays or ``OrtValue``s
    (batch, heads, past, width); cut ``OrtValue``s are made anew on ``device`` (the session's), through host
    memory unless ``cut(values, first)`` does it where they are (``DeviceOps.cut``: GenerationSession and the
    serving engine pass it, so on CUDA the cache stays on the GPU). Call it before each step; the step's mask is
    the returned one with ``incoming`` ones appended.
    """
    mask = window_mask(mask, window, incoming)
    keep = window - incoming
    if mask.shape[1] <= keep + slack:
        return list(cache), mask
    first = mask.shape[1] - keep
    if cut is not None:
        return cut(list(cache), first), mask[:, first:]
    return [_last_columns(v, keep, device, device_id) for v in cache], mask[:, first:]


def _last_columns(value, keep: int, device: str, device_id: int):
    """The last ``keep`` positions (axis 2) of an array or an ``OrtValue``, contiguous."""
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value[:, :, value.shape[2] - keep:])
    from onnxruntime import OrtValue

    array = value.numpy()  # on CPU a view of the value's memory; on CUDA a copy to the host
    return OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array[:, :, array.shape[2] - keep:]), device, device_id)
