"""Hugging Face ALiBi models (BLOOM, MPT, Falcon with ``alibi: true``) from a local folder, no transformers.

One module per family (:mod:`.bloom`, :mod:`.mpt`, :mod:`.falcon`), each with two jobs only: map
``config.json`` to a :class:`~alibi_export.model.ModelConfig` (refusing every option it does not
implement, in one line that names it) and rename or split each tensor as it streams from the
shards. :mod:`.weights` reads the shards lazily and checks every tensor against the model the config
describes. Nothing here imports transformers; transformers' modeling files are the tests' reference.
"""
from __future__ import annotations

from types import ModuleType

from ..errors import CheckpointError

__all__ = ["ARCHITECTURES", "architecture", "is_hf_config"]

ARCHITECTURES = ("bloom", "mpt", "falcon")


def is_hf_config(data: dict) -> bool:
    """A config.json written by transformers names its ``model_type``; this project's own never does."""
    return isinstance(data, dict) and "model_type" in data


def architecture(data: dict, where: str) -> ModuleType:
    """The family module for ``data["model_type"]``; any other type is refused in one line."""
    model_type = data.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"unsupported model_type {model_type!r} in {where}. Note: expected one of "
                              f"{ARCHITECTURES} (the Hugging Face ALiBi families)")
    from importlib import import_module

    return import_module(f".{model_type}", __name__)


def config_of(data: dict, where: str):
    """The ModelConfig of a Hugging Face config.json (``where`` names it in errors)."""
    from ..errors import ConfigError

    family = architecture(data, where)
    try:
        return family.config_from_hf(data)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"invalid config.json in {where}: {e}") from None


def load_model(path, data: dict, config):
    """(model, sha256 of the weight files): an AlibiLM filled from the folder's shards, one tensor at a time."""
    from pathlib import Path

    from ..model import AlibiLM
    from .weights import load_into, sha256_files, weight_files

    from .weights import check_parameter_count, stored_elements

    family = architecture(data, str(path))
    files = weight_files(Path(path))
    check_parameter_count(config, stored_elements(files), repr(str(path)))  # before anything is allocated
    model = AlibiLM(config)
    load_into(model, files, lambda n, t: family.convert(n, t, config), skip=lambda n: family.skip(n, config))
    return model, sha256_files(files)
