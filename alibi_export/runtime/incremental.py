"""A KV-cache export as a Polygraphy runner: ``infer({"input_ids"}) -> {"logits"}`` through its cache.

A KV-cache file takes ``attention_mask`` and the past tensors besides ``input_ids``, so feeding it only ids (as
Polygraphy's own ONNX Runtime runner does) fails. This runner prefills all but the last ``steps`` tokens and
decodes those one at a time, so the logits it returns went through the cache: parity checks use ``steps > 0``
(the cache is what they prove), perplexity ``steps = 0`` (one prefill per window, as fast as a plain file).
With ``kv_window`` W the cache is a rolling window: at most W tokens in the prefill, then one step per token,
each seeing its last W tokens (``ppl --kv-window`` on a KV-cache file: exact, and one step per token).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

__all__ = ["IncrementalRunner"]


class IncrementalRunner(BaseRunner):
    def __init__(self, path: str | Path, *, steps: int = 0, provider: str = "cpu", threads: int | None = None,
                 name: str | None = None, kv_window: int | None = None):
        super().__init__(name=name or f"onnxruntime-{provider}-kv-cache", prefix="kv-cache-runner")
        self.path, self.steps, self.provider, self.threads = Path(path), steps, provider, threads
        self.kv_window = kv_window

    def activate_impl(self):
        from .generate import GenerationSession

        self.session = GenerationSession(self.path, provider=self.provider, threads=self.threads,
                                         kv_window=self.kv_window)

    def get_input_metadata_impl(self):
        return TensorMetadata().add("input_ids", dtype=np.int64, shape=["batch", "sequence"])

    def infer_impl(self, feed_dict):
        ids = np.asarray(feed_dict["input_ids"])
        prefill = max(1, ids.shape[1] - self.steps)
        if self.kv_window is not None:
            prefill = min(prefill, self.kv_window)
        start = time.perf_counter()
        logits, _ = self.session.step_pieces(ids, [prefill] + [1] * (ids.shape[1] - prefill))
        self.inference_time = time.perf_counter() - start  # Polygraphy sums it per runner
        return OrderedDict(logits=logits)

    def deactivate_impl(self):
        del self.session
