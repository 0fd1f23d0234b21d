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

A step reads all ``T`` columns of every row, its own and the masked ones. The default static form masks by
the attention mask (its bias), so what a masked column holds does not matter. The folded form (``--attention
onnx``: no attention bias, which ONNX Runtime's CUDA GroupQueryAttention refuses) cannot: the padding mark
travels in each cached key (export.attention_op), written when the key was. So a column a row attends
without owning it (left of a join, the gap a wider join opens, left of a moved or packed row) must hold
what the model writes for a padding token (``batch_cache.padding_entries``, as the concatenating form's
holes do); a stale key left there by an earlier row, or a zero key, is attended (without this fill, 8 of
the 12 greedy answers of tests/test_serve.py's packing schedule differed from the prompt alone).
``_fill_holes`` writes them, once per change of layout, never per step. A row's ALiBi positions need
nothing: the graph counts them over its mask's ones (the real tokens), whichever columns hold them.

The buffers are numpy arrays on the CPU and torch tensors on CUDA (torch is this package's own dependency;
ONNX Runtime offers no copy into part of an OrtValue); the graph sees the same memory through IO binding.
Both index and assign alike, so one code path copies on either device (``_Device`` holds the differences:
allocation, address, gather, and on CUDA the synchronization before ONNX Runtime's next run). Not torch on
the CPU: its OpenMP threads and ONNX Runtime's spinning pool fight over the cores, and a join of 300
columns took 190 ms there against 0.8 ms single-threaded.
"""
from __future__ import annotations

import numpy as np

from ..errors import AlibiExportError
from ..runtime.kv_buffer import BufferView
from .batch_cache import DeviceOps, padding_entries

__all__ = ["SlotCache"]


class SlotCache:
    """The running batch of a static-cache session: ``slots`` rows of ``columns`` cache columns.

    Engine rows are numbered as the engine's running list; ``slot_of[i]`` is where row i lives."""

    def __init__(self, session, slots: int, columns: int):
        if session.static is None:
            raise AlibiExportError("fixed cache slots need a --static-cache export")
        if columns > session.static.limit:
            raise AlibiExportError(f"{columns} cache columns per slot exceed the file's static cache of "
                                   f"{session.static.limit}")
        self.session, self.slots, self.columns = session, slots, columns
        self.device = _Device(session)
        shape = (slots, session.config.kv_heads, columns, session.cache_width)
        # Zeros, not garbage: a masked column still enters the op's products (with weight exactly 0, which a
        # NaN bit pattern would turn into NaN).
        self.buffers = [self.device.zeros(shape, commit=True) for _ in range(session.n_past)]
        self.mask = np.zeros((slots, columns), dtype=np.int64)  # which columns each slot's row owns
        self.width = 0  # T: the columns every row's next step attends
        self.slot_of: list[int] = []
        self.ops = DeviceOps(session, session.n_past)
        # The folded form's padding entry (1, heads, width) per buffer; None where the mask alone masks
        self.holes = ([self.device.put(h[:, :, 0]) for h in padding_entries(session)]
                      if session.cache_width != session.config.head_dim else None)
        self.packs = self.moves = 0  # times the rows were packed (columns reclaimed), rows moved into a hole
        self.move_rows = True  # False leaves holes in the prefix (stepped as padding rows): the benchmark's variant
        self.device.sync()

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
        shape = (batch, self.buffers[0].shape[1], length, self.buffers[0].shape[3])
        views = [self._view(self.device.zeros(shape)) for _ in self.buffers]
        self.device.sync()
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
        before = self.width
        self.width = max(self.width, max(owned))  # wider: the running rows get masked columns, not copies
        T, L = self.width, mask.shape[1]
        free = sorted(set(range(self.slots)) - set(self.slot_of))
        self._fill_holes(self.slot_of, before)  # the gap a wider batch opens in the running rows
        for i, n, slot in zip(rows, owned, free):
            dest = _join_columns(T, n)
            for buf, v in zip(self.buffers, values):
                buf[slot, :, dest] = v.owner[i, :, L - n:L]
            self.mask[slot] = 0
            self.mask[slot, T - n:T] = 1
            self.slot_of.append(slot)
        self._fill_holes(free[:len(rows)])
        self.device.sync()

    def join_empty(self, count: int) -> None:
        """``count`` rows join with no cache columns (their prompts go through the decode steps): each takes a free
        slot, masked everywhere left of the batch's next column, which its first token writes."""
        free = sorted(set(range(self.slots)) - set(self.slot_of))[:count]
        if len(free) < count:
            raise AlibiExportError(f"{count} rows do not fit in {len(free)} free slots")
        if not self.slot_of:
            self.width = 0
        for slot in free:
            self.mask[slot] = 0
            self.slot_of.append(slot)
        self._fill_holes(free)
        self.device.sync()

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
                buf[hole, :, first:self.width] = buf[last, :, first:self.width]
            self.mask[hole], self.mask[last] = self.mask[last], 0
            self.slot_of[self.slot_of.index(last)] = hole
            self._fill_holes([hole])
            self.moves += 1
            moved = True
        if moved:
            self.device.sync()

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
        for buf in self.buffers:
            buf[:hi, :, :longest] = self.device.gather(buf[:hi, :, :T], index)
        packed = np.zeros((hi, self.columns), dtype=np.int64)
        for slot in self.slot_of:
            packed[slot, longest - owned[slot]:longest] = 1
        self.mask[:hi] = packed
        self.width = longest
        self._fill_holes(self.slot_of)
        self.packs += 1
        self.device.sync()

    def _fill_holes(self, slots: list[int], start: int = 0) -> None:
        """The folded form: the padding entry into each column in [start, width) that ``slots`` do not own
        (the only place a masked column is written; see the module's docstring)."""
        if self.holes is None or not slots or start >= self.width:
            return
        rows, columns = np.nonzero(self.mask[slots, start:self.width] == 0)
        if not len(rows):
            return
        rows, columns = self.device.put(np.asarray(slots)[rows]), self.device.put(columns + start)
        for buf, hole in zip(self.buffers, self.holes):
            buf[rows, :, columns] = hole  # (k, heads, width) entries, each the (1, heads, width) padding entry

    def _view(self, array) -> BufferView:
        s = self.session
        return BufferView(array, self.device.address(array), tuple(array.shape), s.cache_dtype, s.device, s.device_id)


class _Device:
    """What differs between the slots' two homes: numpy on the CPU, torch on CUDA."""

    def __init__(self, session):
        self.dtype = np.dtype(session.cache_dtype)
        self.cuda = session.device == "cuda"
        if self.cuda:
            import torch

            self.torch, self.where = torch, torch.device("cuda", session.device_id)
            self.torch_dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}[self.dtype]

    def zeros(self, shape, commit: bool = False):
        """Zeroed memory; ``commit``: written now on the CPU, where numpy's zeros are pages the kernel maps on
        first touch (the slots' first joins took 50-80 ms of page faults under load; a scratch is used once)."""
        if self.cuda:
            return self.torch.zeros(shape, dtype=self.torch_dtype, device=self.where)
        if commit:
            array = np.empty(shape, dtype=self.dtype)
            array.fill(0)
            return array
        return np.zeros(shape, dtype=self.dtype)

    def put(self, array: np.ndarray):
        """A host array (values or indices) on the slots' device."""
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.where) if self.cuda else array

    def address(self, array) -> int:
        return array.data_ptr() if self.cuda else array.ctypes.data

    def gather(self, part, index: np.ndarray):
        """``part`` (rows, heads, T, width) -> (rows, heads, K, width): row r's columns ``index[r]`` (rows, K)."""
        if self.cuda:
            idx = self.torch.from_numpy(index).to(self.where)[:, None, :, None]
            return self.torch.gather(part, 2, idx.expand(part.shape[0], part.shape[1], index.shape[1], part.shape[3]))
        return np.take_along_axis(part, index[:, None, :, None], axis=2)

    def sync(self) -> None:
        """Torch's copies are queued on its CUDA stream; ONNX Runtime's next run must find them done."""
        if self.cuda:
            self.torch.cuda.synchronize(self.where)


def _join_columns(width: int, n: int) -> slice:
    """Where a joining row's ``n`` columns go: the last ``n`` of the batch's ``width`` (its next step writes
    column ``width``, as every other row's does)."""
    return slice(width - n, width)
