"""alibi-export: ALiBi language models from PyTorch to ONNX Runtime and TensorRT."""
from __future__ import annotations

from .alibi import alibi_bias, alibi_slopes
from .checkpoint import Checkpoint, load, save
from .errors import AlibiExportError
from .model import AlibiLM, ModelConfig

__all__ = ["alibi_slopes", "alibi_bias", "AlibiLM", "ModelConfig", "Checkpoint", "load", "save",
           "AlibiExportError", "__version__"]
__version__ = "0.1.0"
