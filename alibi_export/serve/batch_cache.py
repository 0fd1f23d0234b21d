"""One KV-cache tensor shared by requests of different lengths.

The KV-cache export appends each step's keys at column ``past`` of every row and counts a row's ALiBi
positions over its mask (``alibi.token_positions``: the cumulative sum of real tokens), so a row may sit
anywhere in the tensor as long as the columns it does not own are masked. Here every row is aligned on
the right (its newest token in the last column) and the columns on its left that it does not own are
holes: masked (0 in ``mask``) and filled with what the model itself writes for a padding token. The
filler matters for the ``onnx`` attention form, whose cache carries the padding mark in the keys (a
zero key there would be attended); for the other forms the mask alone hides the hole.

Rows join (``merge``: the shorter side gets holes on its left) and leave (``keep``: the columns that
every remaining row masks are cut). Both copy the cache through host memory; they run when the batch
changes, not at every step (on CUDA that is one round trip per change; the steps themselves keep the
cache on the device through IO binding).
"""
from __future__ import annotations

import numpy as np

__all__ = ["BatchCache", "padding_entries"]


def padding_entries(session) -> list[np.ndarray]:
    """What the model writes into its cache for a padding token: one (1, kv heads, 1, width) array per
    past input, taken from a prefill of [pad, token] whose first column is masked."""
    ids = np.zeros((1, 2), dtype=np.int64)
    mask = np.array([[0, 1]], dtype=np.int64)
    _, presents = session.step(ids, mask, session.new_cache(1))
    return [p.numpy()[:, :, :1, :].copy() for p in presents]


class BatchCache:
    """The running batch's cache: ``values`` (OrtValues (B, heads, width, head width) on the session's
    device, as ``GenerationSession.step`` takes and returns them) and ``mask`` (B, width) int64."""

    def __init__(self, session, holes: list[np.ndarray]):
        self.session, self.holes = session, holes
        self.values: list | None = None
        self.mask = np.zeros((0, 0), dtype=np.int64)

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def advance(self, values: list, mask: np.ndarray) -> None:
        """Take a step's presents and the mask it ran with (one column longer)."""
        self.values, self.mask = values, mask

    def merge(self, values: list, mask: np.ndarray) -> None:
        """Append rows (their cache ``values`` and ``mask``, from a prefill) below the running ones."""
        if self.batch == 0:
            self.values, self.mask = values, mask
            return
        width = max(self.width, mask.shape[1])
        old = self._arrays()
        new = [v.numpy() for v in values]
        self._set([np.concatenate([self._pad(a, width, hole), self._pad(b, width, hole)], axis=0)
                   for a, b, hole in zip(old, new, self.holes)],
                  np.concatenate([_pad_mask(self.mask, width), _pad_mask(mask, width)], axis=0))

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order); cut the leading columns that all of them mask."""
        if not rows:
            self.values, self.mask = None, np.zeros((0, 0), dtype=np.int64)
            return
        mask = self.mask[rows]
        first = int(mask.any(axis=0).argmax())  # the first column some row still owns
        if len(rows) == self.batch and first == 0:
            return
        self._set([a[rows][:, :, first:] for a in self._arrays()], mask[:, first:])

    # ------------------------------------------------------------------ host round trip
    def _arrays(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.values]

    def _set(self, arrays: list[np.ndarray], mask: np.ndarray) -> None:
        from onnxruntime import OrtValue

        s = self.session
        self.values = [OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), s.device, s.device_id) for a in arrays]
        self.mask = np.ascontiguousarray(mask)

    @staticmethod
    def _pad(a: np.ndarray, width: int, hole: np.ndarray) -> np.ndarray:
        """(b, heads, w, d) -> (b, heads, width, d) with padding entries on the left."""
        missing = width - a.shape[2]
        if missing == 0:
            return a
        filler = np.broadcast_to(hole, (a.shape[0], a.shape[1], missing, a.shape[3]))
        return np.concatenate([filler, a], axis=2)


def _pad_mask(mask: np.ndarray, width: int) -> np.ndarray:
    return np.concatenate([np.zeros((mask.shape[0], width - mask.shape[1]), dtype=np.int64), mask], axis=1)
