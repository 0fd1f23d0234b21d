"""One KV-cache tensor shared by requests of different lengths, re-laid on the device.

The KV-cache export appends each step's keys at column ``past`` of every row and counts a row's ALiBi
positions over its mask (``alibi.token_positions``: the cumulative sum of real tokens), so a row may sit
anywhere in the tensor as long as the columns it does not own are masked. Here every row is aligned on
the right (its newest token in the last column) and the columns on its left that it does not own are
holes: masked (0 in ``mask``) and filled with what the model itself writes for a padding token. The
filler matters for the ``onnx`` attention form, whose cache carries the padding mark in the keys (a
zero key there would be attended); for the other forms the mask alone hides the hole.

Rows join (``merge``: the shorter side gets holes on its left) and leave (``keep``: the columns that
every remaining row masks are cut). Both run as small ONNX graphs (``DeviceOps``) on the session's own
provider through IO binding, so on CUDA the cache never leaves the GPU, not even when the batch
changes: a join or a leave costs one device copy of the cache, about what a decode step's own Concat
of past and present costs. (Copying it through host memory instead made every change of a 64-row
batch a 1.5 GB round trip on an H200; BENCHMARKS.md, the GPU serving sections.) On CPU the same
graphs run on host memory, so the CPU tests exercise the GPU's code path.
"""
from __future__ import annotations

import numpy as np

from ..runtime.device_ops import DeviceOps

__all__ = ["BatchCache", "DeviceOps", "padding_entries"]  # DeviceOps: its home is runtime.device_ops


def padding_entries(session) -> list[np.ndarray]:
    """What the model writes into its cache for a padding token: one (1, kv heads, 1, width) array per
    past input, taken from a prefill of [pad, token] whose first column is masked (a static-cache file's
    buffers are allocated for those 2 columns)."""
    ids = np.zeros((1, 2), dtype=np.int64)
    mask = np.array([[0, 1]], dtype=np.int64)
    _, presents = session.step(ids, mask, session.new_cache(1, 2))
    return [p.numpy()[:, :, :1, :].copy() for p in presents]


class BatchCache:
    """The running batch's cache: ``values`` (OrtValues (B, heads, width, head width) on the session's
    device, as ``GenerationSession.step`` takes and returns them) and ``mask`` (B, width) int64.
    ``holes`` (numpy, one (1, heads, 1, width) per past input) is what fills a row's unowned columns."""

    def __init__(self, session, holes: list[np.ndarray], ops: DeviceOps | None = None):
        self.session = session
        self.ops = ops or DeviceOps(session, len(holes))
        self.holes = holes
        self.values: list | None = None
        self.mask = np.zeros((0, 0), dtype=np.int64)

    @property
    def holes(self) -> list[np.ndarray]:
        return self._holes

    @holes.setter
    def holes(self, holes: list[np.ndarray]) -> None:
        from onnxruntime import OrtValue

        s = self.session
        self._holes = holes
        self._device_holes = [OrtValue.ortvalue_from_numpy(np.ascontiguousarray(h), s.device, s.device_id)
                              for h in holes]

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def advance(self, values: list, mask: np.ndarray) -> None:
        """Take a step's presents and the mask it ran with (one column longer)."""
        self.values, self.mask = values, mask

    def new_job(self, batch: int, length: int) -> list:
        """The empty cache a prefill of ``batch`` prompts starts from."""
        return self.session.new_cache(batch)

    def decode(self, ids: np.ndarray, window) -> np.ndarray:
        """One step of every row (``ids`` (B, 1)), the cache first cut by ``window`` (values, mask) -> (values,
        mask) for a rolling window: the (B, V) logits of each row's token."""
        values, base = window(self.values, self.mask)
        mask = np.concatenate([base, np.ones((len(ids), 1), dtype=np.int64)], axis=1)  # (B, width + 1)
        logits, values = self.session.step(ids, mask, values)
        self.advance(values, mask)
        return logits[:, -1]

    def last_logits(self, logits) -> np.ndarray:
        return self.ops.last_logits(logits)

    def merge(self, values: list, mask: np.ndarray, rows: list[int] | None = None) -> None:
        """Append rows (their cache ``values`` and ``mask``, from a prefill; only ``rows`` of them if given)
        below the running ones."""
        if rows is not None:
            values, mask = self._cut(values, mask, rows)
        if self.batch == 0:
            self.values, self.mask = values, mask
            return
        width = max(self.width, mask.shape[1])
        self.values = self.ops.merge(self.values, values, self._device_holes, width)
        self.mask = np.concatenate([_pad_mask(self.mask, width), _pad_mask(mask, width)], axis=0)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order); cut the leading columns that all of them mask."""
        if not rows:
            self.values, self.mask = None, np.zeros((0, 0), dtype=np.int64)
            return
        self.values, self.mask = self._cut(self.values, self.mask, rows)

    def _cut(self, values: list, mask: np.ndarray, rows: list[int]) -> tuple[list, np.ndarray]:
        kept = mask[rows]
        first = int(kept.any(axis=0).argmax())  # the first column some row still owns
        if rows == list(range(len(mask))) and first == 0:
            return values, mask
        return self.ops.keep(values, rows, first), np.ascontiguousarray(kept[:, first:])


def _pad_mask(mask: np.ndarray, width: int) -> np.ndarray:
    return np.concatenate([np.zeros((mask.shape[0], width - mask.shape[1]), dtype=np.int64), mask], axis=1)
