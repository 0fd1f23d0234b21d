"""A TensorRT engine as a Polygraphy runner (``infer({"input_ids": ...}) -> {"logits": ...}``).

Polygraphy's own ``TrtRunner`` does the work. It imports ``tensorrt``, or ``tensorrt_rtx`` when
``polygraphy.config.USE_TENSORRT_RTX`` is set before its TensorRT backend is first imported; the
TensorRT-RTX wheels name their module ``tensorrt_rtx_bindings``, so it is registered under that name too.
Engines execute only on a GPU their backend supports (TensorRT-RTX 1.7: compute capability 7.5 to 8.9 and
12.x, not Hopper).
"""
from __future__ import annotations

import sys
from pathlib import Path

from ...artifacts import read_sidecar
from ...errors import AlibiExportError
from ._trt import import_trt

__all__ = ["TrtEngineRunner"]


def _select_polygraphy_backend(trt, backend: str) -> None:
    from polygraphy import config

    rtx = backend == "tensorrt-rtx"
    if "polygraphy.backend.trt" in sys.modules and config.USE_TENSORRT_RTX != rtx:
        raise AlibiExportError(f"Polygraphy's TensorRT backend was already loaded for the other TensorRT family "
                               f"than this {backend} engine. Note: run with POLYGRAPHY_USE_TENSORRT_RTX="
                               f"{int(rtx)}")
    if rtx:
        sys.modules.setdefault("tensorrt_rtx", trt)
        config.USE_TENSORRT_RTX = True


def TrtEngineRunner(path: str | Path, *, name: str | None = None):
    """Polygraphy's TrtRunner over the engine file ``path``. Its sidecar (``ENGINE.json``) says which
    TensorRT family built it and whether the AlibiAttention plugin must be registered first."""
    path = Path(path)
    side = read_sidecar(path)  # refuses a missing engine, a missing sidecar and one that does not match
    trt = import_trt(side.backend, why="running a TensorRT engine")
    backend = "tensorrt-rtx" if "rtx" in trt.__name__ else "tensorrt"
    if side.attention == "plugin":
        from .plugin import register_plugin

        register_plugin(trt)
    _select_polygraphy_backend(trt, backend)
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(BytesFromPath(str(path))), name=name or f"{backend}-{path.stem}")
