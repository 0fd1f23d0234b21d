"""The checkpoints and the evaluation text that travel inside the package (package data).

They are found with :mod:`importlib.resources`, relative to the installed package and never to the
working directory, so an installed wheel runs the main job (``alibi-export onnx --dynamic-len``)
from any folder, exactly as a checkout does.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["SHIPPED_MODELS", "DEFAULT_MODEL_NAME", "shipped_model", "default_model", "default_text"]

SHIPPED_MODELS = ("alibi-small", "sinusoidal-small")
DEFAULT_MODEL_NAME = "alibi-small"
_TEXT = "books-test-excerpt.txt"


def _package_path(*parts: str) -> Path:
    # Wheels install unzipped, so the resource is a real folder that load() and ONNX Runtime can open.
    return Path(str(files(__package__).joinpath(*parts)))


def shipped_model(name: str) -> Path:
    """The folder of the shipped checkpoint ``name`` (one of :data:`SHIPPED_MODELS`)."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"no shipped model {name!r}. Note: expected one of {SHIPPED_MODELS}")
    return _package_path("models", name)


def default_model() -> Path:
    """The checkpoint the main job exports when no MODEL is given (ALiBi, trained at 256 tokens)."""
    return shipped_model(DEFAULT_MODEL_NAME)


def default_text() -> Path:
    """A test-split excerpt of the books corpus the shipped models never saw (see texts/README.md)."""
    return _package_path("texts", _TEXT)
