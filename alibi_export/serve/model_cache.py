"""The shipped model as a KV-cache export, made once per user in a cache folder (never the working directory).

The folder is ``$XDG_CACHE_HOME/alibi-export`` (``~/.cache/alibi-export`` without it); the file name
carries the export's form, the tool's version and the shipped weights' SHA-256, so a new form, release or new
weights export afresh and an old file is never mistaken for the current one. The form is ``--kv-cache
--logits-to-keep``: a prefill computes its last position's logits only. The export is written under a temporary
name and renamed (``export_onnx`` does so), so a killed export leaves no file that looks finished.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["cache_dir", "shipped_kv_export"]

_FORM = "kv-last"  # --kv-cache --logits-to-keep (the folders of before, "-kv-", held the file without the input)

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "alibi-export"


def shipped_kv_export() -> Path:
    """The path of the shipped model's KV-cache export, exporting it first if this version has not yet."""
    from importlib.metadata import PackageNotFoundError, version

    from .._io import sha256_file
    from ..checkpoint import WEIGHTS
    from ..shipped import DEFAULT_MODEL_NAME, default_model

    try:
        tool = version("alibi-export")
    except PackageNotFoundError:
        tool = "0+unknown"
    digest = sha256_file(default_model() / WEIGHTS)[:16]
    folder = cache_dir() / f"{DEFAULT_MODEL_NAME}-{_FORM}-{tool}-{digest}"
    path = folder / f"{DEFAULT_MODEL_NAME}.onnx"
    if path.is_file():
        return path
    from ..checkpoint import load
    from ..export.onnx import export_onnx

    folder.mkdir(parents=True, exist_ok=True)
    log.warning("exporting the shipped model once into %s", folder)
    # atomic: a temporary name, then renamed
    export_onnx(load(default_model()), path, kv_cache=True, logits_to_keep=True)
    return path
