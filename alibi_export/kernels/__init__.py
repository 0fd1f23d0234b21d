"""Fused GPU kernels (Triton). Importing this package never imports triton.

``alibi_attention`` and ``launch_alibi_attention`` load :mod:`.triton_alibi` on first call; without
triton (or without an NVIDIA GPU build of it) they raise :class:`TritonUnavailableError`, an
``ImportError``.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..errors import MissingDependencyError

__all__ = ["alibi_attention", "launch_alibi_attention", "triton_available",
           "TritonUnavailableError"]


class TritonUnavailableError(MissingDependencyError):
    """Triton could not be imported; the fused kernels need it and an NVIDIA GPU."""

    def __init__(self, cause: BaseException | None = None):
        msg = ("The fused ALiBi attention kernel needs Triton and an NVIDIA GPU. Note: pip install "
               "triton (or `pip install 'alibi-export[gpu]'`); needs an NVIDIA GPU with CUDA")
        if cause is not None:
            msg += f" (import failed: {cause!r})"
        ImportError.__init__(self, msg)


_impl: Any = None


def _load() -> Any:
    global _impl
    if _impl is None:
        try:
            _impl = importlib.import_module(".triton_alibi", __name__)
        except ImportError as e:  # triton missing or broken
            raise TritonUnavailableError(e) from e
    return _impl


def triton_available() -> bool:
    """True when triton imports (it says nothing about a GPU being present)."""
    try:
        _load()
    except TritonUnavailableError:
        return False
    return True


def alibi_attention(q, k, v, slopes, *, causal: bool = True, scale: float | None = None,
                    past_len: int | None = None, out=None):
    """Fused ALiBi attention, see :func:`alibi_export.kernels.triton_alibi.alibi_attention`."""
    return _load().alibi_attention(q, k, v, slopes, causal=causal, scale=scale,
                                   past_len=past_len, out=out)


def launch_alibi_attention(q_ptr: int, k_ptr: int, v_ptr: int, out_ptr: int, slopes_ptr: int,
                           **kwargs) -> None:
    """Raw-pointer launch, see :func:`alibi_export.kernels.triton_alibi.launch_alibi_attention`."""
    return _load().launch_alibi_attention(q_ptr, k_ptr, v_ptr, out_ptr, slopes_ptr, **kwargs)
