"""Runtimes that execute an exported model: ONNX Runtime here; PyTorch as the reference.

Every runtime is a Polygraphy runner (``infer(feed_dict) -> {"logits": ...}``), so parity and
perplexity code never needs to know which one it drives.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import AlibiExportError
from .generate import GenerationResult, GenerationSession

__all__ = ["make_runner", "GenerationSession", "GenerationResult"]


def make_runner(model: str | Path, *, provider: str = "cpu", threads: int | None = None, attention: str = "sdpa"):
    """A runner for an ``.onnx`` file (ONNX Runtime), an ``.engine`` file (TensorRT) or a checkpoint folder."""
    path = Path(model)
    if path.suffix == ".engine":
        from .tensorrt.runner import TrtEngineRunner

        return TrtEngineRunner(path)
    if path.suffix == ".onnx":
        from .onnxruntime import OrtRunner

        return OrtRunner(path, provider=provider, threads=threads)
    if path.is_dir():
        from ..checkpoint import load
        from .pytorch import TorchRunner

        return TorchRunner(load(path).model.set_attention(attention), name=path.name)
    raise AlibiExportError(f"model {str(path)!r} not found. Note: expected an .onnx or .engine file or a checkpoint folder")
