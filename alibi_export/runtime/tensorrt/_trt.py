"""Import whichever TensorRT family is installed, lazily: a CPU install never pays for, or breaks on, it.

Full TensorRT (``tensorrt``, datacenter GPUs, Python plugins) is preferred; TensorRT-RTX (``tensorrt_rtx_libs``
+ ``tensorrt_rtx_bindings``, RTX and edge GPUs, builds engines without a GPU) is the fallback.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from ...errors import MissingDependencyError

__all__ = ["BACKENDS", "import_trt", "backend_of", "trt_available"]

BACKENDS = ("tensorrt", "tensorrt-rtx")
_PACKAGES = {"tensorrt": ("tensorrt", "trt"),
             "tensorrt-rtx": ("tensorrt-rtx-cu13-libs and tensorrt-rtx-cu13-bindings", "trt-rtx")}


def _import(backend: str) -> ModuleType:
    if backend == "tensorrt":
        return importlib.import_module("tensorrt")
    importlib.import_module("tensorrt_rtx_libs")  # loads the shared libraries the bindings link against
    return importlib.import_module("tensorrt_rtx_bindings")


def import_trt(backend: str | None = None, *, why: str = "building TensorRT engines") -> ModuleType:
    """The TensorRT module of ``backend`` ("tensorrt" or "tensorrt-rtx"); ``None`` takes the first installed.

    Raises :class:`MissingDependencyError` naming the pip package when it is absent.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown TensorRT backend {backend!r}. Note: expected one of {BACKENDS}")
    errors = []
    for name in (backend,) if backend else BACKENDS:
        try:
            return _import(name)
        except ImportError as e:  # absent, or its libraries do not load
            errors.append(e)
    name = backend or "tensorrt-rtx"  # the family pip can install anywhere
    package, extra = _PACKAGES[name]
    err = MissingDependencyError(package, extra, why)
    if backend is None:
        err.args = (f"{why} needs TensorRT: neither 'tensorrt' nor TensorRT-RTX is installed. Note: install "
                    f"TensorRT-RTX with `pip install 'alibi-export[trt-rtx]'` (tensorrt-rtx-cu13-libs, "
                    f"tensorrt-rtx-cu13-bindings) or the full TensorRT with `pip install 'alibi-export[trt]'`",)
    raise err from errors[-1]


def backend_of(trt: ModuleType) -> str:
    """"tensorrt" or "tensorrt-rtx" for an imported TensorRT module."""
    return "tensorrt-rtx" if "rtx" in trt.__name__ else "tensorrt"


def trt_available(backend: str | None = None) -> bool:
    try:
        import_trt(backend)
    except MissingDependencyError:
        return False
    return True
