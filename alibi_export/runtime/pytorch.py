"""The PyTorch model as a Polygraphy runner: the reference side of every comparison."""
from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

__all__ = ["TorchRunner"]


class TorchRunner(BaseRunner):
    """Runs an :class:`~alibi_export.model.AlibiLM` (or a callable returning one) on ``input_ids``.

    Polygraphy's own PytRunner moves inputs to CUDA unconditionally; this one runs where the model is.
    """

    def __init__(self, model, *, name: str | None = None):
        super().__init__(name=name, prefix="pytorch-runner")
        self._model = model

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
            logits = self.model(ids)
        self.inference_time = time.perf_counter() - start
        return OrderedDict(logits=logits.float().cpu().numpy())

    def deactivate_impl(self):
        del self.model
