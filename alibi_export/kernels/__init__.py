"""Fused GPU kernels (Triton). Importing this package never imports triton.

``alibi_attention`` and ``launch_alibi_attention`` load :mod:`.triton_alibi` (and, when autograd
records, :mod:`.triton_alibi_bwd` for the backward) on first call; without
triton (or without an NVIDIA GPU build of it) they raise :class:`TritonUnavailableError`, an
``ImportError``.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch

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


_modules: dict[str, Any] = {}


def _load(name: str = ".triton_alibi") -> Any:
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(name, __name__)
        except ImportError as e:  # triton missing or broken
            raise TritonUnavailableError(e) from e
    return _modules[name]


def triton_available() -> bool:
    """True when triton imports (it says nothing about a GPU being present)."""
    try:
        _load()
    except TritonUnavailableError:
        return False
    return True


def alibi_attention(q, k, v, slopes, *, causal: bool = True, scale: float | None = None,
                    past_len: int | None = None, out=None, window: bool = False):
    """Fused ALiBi attention, see :func:`alibi_export.kernels.triton_alibi.alibi_attention`.

    When autograd records (grad mode on, an input requires grad, no ``out``) it runs the
    differentiable form, :func:`alibi_export.kernels.triton_alibi_bwd.alibi_attention_train`.
    ``window``: the forward's ALiBi window, opt-in (see triton_alibi._launch_prefill)."""
    needs_grad = torch.is_grad_enabled() and any(
        getattr(t, "requires_grad", False) for t in (q, k, v))
    if needs_grad and out is None:
        return _load(".triton_alibi_bwd").alibi_attention_train(
            q, k, v, slopes, causal=causal, scale=scale, past_len=past_len, window=window)
    return _load().alibi_attention(q, k, v, slopes, causal=causal, scale=scale,
                                   past_len=past_len, out=out, window=window)


def launch_alibi_attention(q_ptr: int, k_ptr: int, v_ptr: int, out_ptr: int, slopes_ptr: int,
                           **kwargs) -> None:
    """Raw-pointer launch, see :func:`alibi_export.kernels.triton_alibi.launch_alibi_attention`."""
    return _load().launch_alibi_attention(q_ptr, k_ptr, v_ptr, out_ptr, slopes_ptr, **kwargs)
