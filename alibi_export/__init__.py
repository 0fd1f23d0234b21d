"""alibi-export: ALiBi language models from PyTorch to ONNX Runtime and TensorRT.

The names below are imported on first use (PEP 562), so that the command line starts without torch and
rejects a bad input in a fraction of a second.
"""
from __future__ import annotations

import importlib

from .errors import AlibiExportError

__all__ = ["alibi_slopes", "alibi_bias", "AlibiLM", "ModelConfig", "Checkpoint", "load", "save",
           "AlibiExportError", "__version__"]
__version__ = "0.1.0"

_LAZY = {"alibi_slopes": ".alibi", "alibi_bias": ".alibi", "AlibiLM": ".model", "ModelConfig": ".model",
         "Checkpoint": ".checkpoint", "load": ".checkpoint", "save": ".checkpoint"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
