"""Fixed cache slots for a static-cache export (``--kv-cache --static-cache LMAX``): nothing moves per step.

The static-cache graph (export.kv_buffer) writes each step's keys and values into a buffer it is given and
reads its first ``total`` columns, where ``total`` is the attention mask's width for every row and a row's
ALiBi positions are counted over its mask. So the running batch is one buffer per past input, (slots, kv
heads, columns, head width), allocated once, and one shared width ``T``:

- a decode step binds the first ``hi`` slots of every buffer by address (``runtime.kv_buffer.BufferView``)
  and the op appends column ``T`` of each in place: no step copies the cache;
- a joining request is prefilled on its own (or with the prompts that arrived with it) into a scratch
  buffer, then its columns are copied into a free slot, right-aligned at ``T`` (its mask is zero on their
  left); a prompt longer than ``T`` widens the batch instead (the other rows get masked columns, free);
- a leaving request frees its slot (its mask row is zeroed); the last occupied slot moves into it, so the
  occupied slots stay a prefix and a step runs over occupied rows only;
- when ``T`` reaches the buffers' end (or when at least half of every row's columns are masked ones), each
  row's own columns are packed against the right end of a narrower ``T``: one copy of the cache, once every
  many steps.

Copies (joins, moves, packing) are torch operations on the buffers' device (torch is this package's own
dependency), and the graph sees the same memory through IO binding; on CUDA the copies are synchronized
before the next run. The CPU runs the same code, so the CPU tests exercise it.
"""
from __future__ import annotations

import numpy as np

from ..errors import AlibiExportError
from ..runtime.kv_buffer import BufferView
from .batch_cache import DeviceOps

__all__ = ["SlotCache"]


class SlotCache:
    """The running batch of a static-cache session: ``slots`` rows of ``columns`` cache columns.

    Engine rows are numbered as the engine's running list; ``slot_of[i]`` is where row i lives."""

    def __init__(self, session, slots: int, columns: int):
        import torch

        if session.static is None:
            raise AlibiExportError("fixed cache slots need a --static-cache export")
        if columns > session.static.limit:
            raise AlibiExportError(f"{columns} cache columns per slot exceed the file's static cache of "
                                   f"{session.static.limit}")
        self.session, self.slots, self.columns = session, slots, columns
        self.device = torch.device("cuda", session.device_id) if session.device == "cuda" else torch.device("cpu")
        self._dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}[
            np.dtype(session.cache_dtype)]
        shape = (slots, session.config.kv_heads, columns, session.cache_width)
        # Zeros, not garbage: a masked column still enters the op's products (with weight exactly 0, which a
        # NaN bit pattern would turn into NaN).
        self.buffers = [torch.zeros(shape, dtype=self._dtype, device=self.device) for _ in range(session.n_past)]
        self.mask = np.zeros((slots, columns), dtype=np.int64)  # which columns each slot's row owns
        self.width = 0  # T: the columns every row's next step attends
        self.slot_of: list[int] = []
        self.ops = DeviceOps(session, session.n_past)
        self.packs = self.moves = 0  # times the rows were packed (columns reclaimed), rows moved into a hole
        self.move_rows = True  # False leaves holes in the prefix (stepped as padding rows): the benchmark's variant
        self._sync()

    @property
    def batch(self) -> int:
        return len(self.slot_of)

    @property
    def rows(self) -> int:
        """Rows a decode step runs: the occupied prefix of the slots."""
        return max(self.slot_of) + 1 if self.slot_of else 0

    # ------------------------------------------------------------------ the engine's interface
    def new_job(self, batch: int, length: int) -> list:
        """Scratch buffers (batch, heads, length, width) for a prefill on the slots' device."""
        import torch

        shape = (batch, *self.buffers[0].shape[1:2], length, self.buffers[0].shape[3])
        views = [self._view(torch.zeros(shape, dtype=self._dtype, device=self.device)) for _ in self.buffers]
        self._sync()
        return views

    def merge(self, values: list, mask: np.ndarray, rows: list[int] | None = None) -> None:
        """Rows ``rows`` of a finished prefill (scratch ``values``, left-padded ``mask``) join: each is copied
        into a free slot, its tokens in the columns that end at the batch's width."""
        rows = list(range(len(mask))) if rows is None else rows
        owned = [int(mask[i].sum()) for i in rows]
        if len(self.slot_of) + len(rows) > self.slots:
            raise AlibiExportError(f"{len(rows)} rows do not fit in {self.slots - len(self.slot_of)} free slots")
        if not self.slot_of:
            self.width = 0
        self.width = max(self.width, max(owned))  # wider: the running rows get masked columns, not copies
        T, L = self.width, mask.shape[1]
        free = sorted(set(range(self.slots)) - set(self.slot_of))
        for i, n, slot in zip(rows, owned, free):
            dest = _join_columns(T, n)
            for buf, v in zip(self.buffers, values):
                buf[slot, :, dest].copy_(v.owner[i, :, L - n:L])
            self.mask[slot] = 0
            self.mask[slot, T - n:T] = 1
            self.slot_of.append(slot)
        self._sync()

    def decode(self, ids: np.ndarray, window=None) -> np.ndarray:
        """One step of every row (``ids`` (n, 1) in the engine's order): the (n, V) logits of its token."""
        self._make_room()
        hi, T = self.rows, self.width
        step_ids = np.zeros((hi, 1), dtype=np.int64)  # a free slot inside the prefix decodes padding, unread
        step_ids[self.slot_of] = ids
        mask = np.zeros((hi, T + 1), dtype=np.int64)
        mask[:, :T] = self.mask[:hi, :T]
        mask[:, T] = 1
        logits, _ = self.session.step(step_ids, mask, [self._view(b[:hi]) for b in self.buffers])
        self.mask[self.slot_of, T] = 1
        self.width = T + 1
        return logits[self.slot_of, -1]

    def keep(self, rows: list[int]) -> None:
        """Keep engine rows ``rows`` (in this order); free the others' slots, and fill the holes they leave
        below the last occupied slot by moving that slot's row (so a step runs occupied rows only)."""
        kept = [self.slot_of[i] for i in rows]
        for slot in set(self.slot_of) - set(kept):
            self.mask[slot] = 0
        self.slot_of = kept
        if not kept:
            self.width = 0
            return
        moved = False
        while self.move_rows:
            hole = min(set(range(self.rows)) - set(self.slot_of), default=None)
            if hole is None:
                break
            last = self.rows - 1
            first = int(self.mask[last, :self.width].argmax())  # the first column the row owns
            for buf in self.buffers:
                buf[hole, :, first:self.width].copy_(buf[last, :, first:self.width])
            self.mask[hole], self.mask[last] = self.mask[last], 0
            self.slot_of[self.slot_of.index(last)] = hole
            self.moves += 1
            moved = True
        if moved:
            self._sync()

    def last_logits(self, logits) -> np.ndarray:
        return self.ops.last_logits(logits)

    # ------------------------------------------------------------------ packing
    def _make_room(self) -> None:
        """Before a step: pack the rows when the buffers are full, or when every row's columns are at least
        half masked (a step reads all ``T`` columns of every row; packing copies the cache once)."""
        hi, T = self.rows, self.width
        owned = self.mask[:hi, :T].sum(axis=1)
        longest = int(owned.max())
        if T + 1 <= self.columns and T < 2 * longest + 16:
            return
        # Each occupied row's own columns, moved to end at column ``longest``; gathered for all rows at once.
        index = np.zeros((hi, longest), dtype=np.int64)
        for slot in self.slot_of:
            cols = np.flatnonzero(self.mask[slot, :T])
            index[slot, longest - len(cols):] = cols
        self._gather(hi, index)
        packed = np.zeros((hi, self.columns), dtype=np.int64)
        for slot in self.slot_of:
            packed[slot, longest - owned[slot]:longest] = 1
        self.mask[:hi] = packed
        self.width = longest
        self.packs += 1
        self._sync()

    def _gather(self, hi: int, index: np.ndarray) -> None:
        import torch

        idx = torch.from_numpy(index).to(self.device)
        for buf in self.buffers:
            part = buf[:hi]
            heads, width = part.shape[1], part.shape[3]
            moved = torch.gather(part, 2, idx[:, None, :, None].expand(hi, heads, index.shape[1], width))
            part[:, :, :index.shape[1]].copy_(moved)

    # ------------------------------------------------------------------ the device
    def _view(self, tensor) -> BufferView:
        s = self.session
        return BufferView(tensor, tensor.data_ptr(), tuple(tensor.shape), s.cache_dtype, s.device, s.device_id)

    def _sync(self) -> None:
        """Torch's copies are queued on its own CUDA stream; ONNX Runtime's next run must see them done."""
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)


def _join_columns(width: int, n: int) -> slice:
    """Where a joining row's ``n`` columns go: the last ``n`` of the batch's ``width`` (its next step writes
    column ``width``, as every other row's does)."""
    return slice(width - n, width)
