"""TensorRT engines: the builder, the AlibiAttention plugin and a Polygraphy runner.

Nothing here imports TensorRT at import time; :mod:`._trt` picks the installed family on first use.
"""
from __future__ import annotations

from .builder import PRECISIONS, BuildResult, LengthProfile, attention_form, build_engine

__all__ = ["build_engine", "BuildResult", "LengthProfile", "PRECISIONS", "attention_form", "register_plugin",
           "TrtEngineRunner"]


def register_plugin(trt=None, **kwargs):
    """See :func:`.plugin.register_plugin`."""
    from .plugin import register_plugin as register

    return register(trt, **kwargs)


def TrtEngineRunner(path, **kwargs):
    """See :func:`.runner.TrtEngineRunner`."""
    from .runner import TrtEngineRunner as runner

    return runner(path, **kwargs)
