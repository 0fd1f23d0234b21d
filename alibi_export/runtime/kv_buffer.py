"""The static-cache form's runtime side (export.kv_buffer): one buffer per past tensor, updated in place.

A static-cache export takes ``past_key_values.*`` of shape (batch, kv heads, buffer length, width) and returns
``present.*`` of the same shape. Binding each present output to the OrtValue of its past input (IO binding)
lets GroupQueryAttention write the new keys into that memory: no step copies the cache. The buffer must hold
the whole prompt and generation; its length is chosen per call (the prompt plus the new tokens, so memory
follows the request) and may not exceed the length the file was exported for (``--static-cache LMAX``).
"""
from __future__ import annotations

import numpy as np

from ..errors import AlibiExportError

__all__ = ["StaticCache", "BufferView"]


class BufferView:
    """A static-cache buffer that lives in memory this module did not allocate (the server's slots: one tensor of
    all rows, of which a step binds the first rows): bound by address, so the op updates that memory in place.
    ``owner`` keeps the memory alive; ``shape()`` and ``data_ptr()`` answer as an OrtValue's do."""

    __slots__ = ("owner", "ptr", "dims", "dtype", "device", "device_id")

    def __init__(self, owner, ptr: int, dims: tuple, dtype, device: str, device_id: int = 0):
        self.owner, self.ptr, self.dims, self.dtype = owner, ptr, tuple(dims), np.dtype(dtype)
        self.device, self.device_id = device, device_id

    def shape(self) -> list[int]:
        return list(self.dims)

    def data_ptr(self) -> int:
        return self.ptr


class StaticCache:
    """The buffers of a static-cache session: allocation, the length check and the in-place binding."""

    def __init__(self, limit: int, heads: int, width: int, dtype, device: str, device_id: int = 0):
        self.limit, self.heads, self.width, self.dtype = limit, heads, width, dtype
        self.device, self.device_id = device, device_id

    def check(self, needed: int) -> None:
        """Refuse a prompt + generation longer than the file's static cache, in one line."""
        if needed > self.limit:
            raise AlibiExportError(f"prompt + new tokens = {needed} tokens exceed this file's static cache of "
                                   f"{self.limit}. Note: ask for fewer new tokens or re-export with a larger "
                                   "--static-cache")

    @staticmethod
    def check_step(batch: int, length: int, total: int, cache) -> None:
        """A step the buffers cannot take, refused in one line before ONNX Runtime fails on it: more tokens
        than the buffers hold, or several new tokens after a past for more than one row (GroupQueryAttention in
        ONNX Runtime 1.32: "batch_size must be 1 when sequence_length > 1 and past context is given")."""
        room = cache[0].shape()[2] if cache else 0
        if total > room:
            raise AlibiExportError(f"the static KV cache's buffers hold {room} tokens; this step needs {total}. "
                                   "Note: allocate them with new_cache(batch, prompt + new tokens)")
        if batch > 1 and length > 1 and total > length:
            raise AlibiExportError(f"a static KV cache takes {length} tokens after a past for one row at a time, "
                                   f"not {batch}. Note: prefill each row alone, or feed one token per step")

    def allocate(self, batch: int, length: int, count: int) -> list:
        """``count`` zeroed buffers (batch, heads, length, width) on the session's device."""
        from onnxruntime import OrtValue

        shape = (batch, self.heads, max(length, 1), self.width)
        if self.device == "cpu":  # numpy's zeros are lazily committed pages: a long buffer costs what is written
            return [OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self.dtype)) for _ in range(count)]
        return [OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, self.device_id)
                for _ in range(count)]

    @staticmethod
    def bind_pasts(binding, past_names, cache) -> None:
        for name, value in zip(past_names, cache):
            if isinstance(value, BufferView):
                binding.bind_input(name, value.device, value.device_id, value.dtype, value.dims, value.ptr)
            else:
                binding.bind_ortvalue_input(name, value)

    @staticmethod
    def bind_presents(binding, present_names, cache) -> None:
        """Each present output into its past's buffer: the op updates the cache where it is."""
        for name, value in zip(present_names, cache):
            if isinstance(value, BufferView):
                binding.bind_output(name, value.device, value.device_id, value.dtype, value.dims, value.ptr)
            else:
                binding.bind_ortvalue_output(name, value)

    @staticmethod
    def updated(cache, outputs) -> list:
        """The buffers, once each present output is checked to be its buffer's memory: a copy would leave the
        buffers stale and every later step wrong, so it is refused rather than followed."""
        if any(o.data_ptr() != c.data_ptr() for o, c in zip(outputs, cache)):
            raise AlibiExportError("ONNX Runtime did not update the static KV cache in place. Note: bind each "
                                   "present.* output to its past_key_values.* buffer (GenerationSession does)")
        return list(cache)
