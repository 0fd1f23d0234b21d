"""The project's checkpoint format: one folder of safetensors + config.json + tokenizer.json.

A folder whose config.json names a Hugging Face ``model_type`` (bloom, mpt, falcon) loads through
:mod:`alibi_export.hf` instead; both give the same :class:`Checkpoint`.

Nothing here unpickles: weights are safetensors, configs JSON, so a checkpoint from
anywhere can be loaded without running its code (a Hugging Face folder's legacy
``pytorch_model.bin`` goes through ``torch.load(weights_only=True)`` only).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ._io import atomic_files, sha256_file
from .errors import CheckpointError, ConfigError
from .model import AlibiLM, ModelConfig

__all__ = ["Checkpoint", "load", "save", "WEIGHTS", "CONFIG", "TOKENIZER"]

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


@dataclass
class Checkpoint:
    model: AlibiLM
    tokenizer: object  # a tokenizers.Tokenizer
    path: Path
    sha256: str  # of the weights file, recorded in exported ONNX metadata

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def _read_json(path: Path) -> dict:
    try:
        return json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint: {CONFIG} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt {CONFIG} in {str(path)!r}: {e}") from None


def _read_config(path: Path, data: dict | None = None) -> ModelConfig:
    """This project's config.json, or a Hugging Face one (it names a ``model_type``), as a ModelConfig."""
    from .hf import config_of, is_hf_config

    data = _read_json(path) if data is None else data
    if is_hf_config(data):
        return config_of(data, repr(str(path)))
    try:
        return ModelConfig.from_dict(data)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"invalid {CONFIG} in {str(path)!r}: {e}") from None


def _read_tokenizer(path: Path, config: ModelConfig):
    from tokenizers import Tokenizer

    if not (path / TOKENIZER).is_file():
        raise CheckpointError(f"{str(path)!r} has no {TOKENIZER}. Note: the tokenizer travels with every export")
    try:
        tokenizer = Tokenizer.from_file(str(path / TOKENIZER))
    except Exception as e:  # tokenizers raises a bare Exception for missing or corrupt files
        raise CheckpointError(f"cannot read {TOKENIZER} in {str(path)!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, more than the "
                              f"model's vocab_size {config.vocab_size}")
    top = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)  # ids need not be contiguous
    if top >= config.vocab_size:
        raise CheckpointError(f"the tokenizer in {str(path)!r} has token id {top}, outside the model's vocab_size "
                              f"{config.vocab_size}. Note: the tokenizer does not belong to these weights")
    return tokenizer


def load(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Checkpoint:
    """Load a checkpoint folder written by :func:`save` (or by ``alibi-export train``), or a local
    Hugging Face BLOOM, MPT or Falcon-ALiBi folder (see :mod:`alibi_export.hf`)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} not found. Note: expected a folder with "
                              f"{WEIGHTS}, {CONFIG} and {TOKENIZER}")
    data = _read_json(path)
    config = _read_config(path, data)
    from .hf import is_hf_config, load_model

    if is_hf_config(data):
        tokenizer = _read_tokenizer(path, config)  # before the weights: the cheap failure first
        model, sha256 = load_model(path, data, config)
    else:
        model, sha256 = _load_own_weights(path, config, device)
        tokenizer = _read_tokenizer(path, config)
    model.to(device=device, dtype=dtype).eval()
    return Checkpoint(model, tokenizer, path, sha256)


def _load_own_weights(path: Path, config: ModelConfig, device: str) -> tuple[AlibiLM, str]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{str(path)!r} is not a checkpoint: {WEIGHTS} is missing")
    try:
        state = load_file(weights, device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt weights {str(weights)!r}: {e}") from None
    model = AlibiLM(config)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"weights in {str(weights)!r} do not match config.json. "
                              f"Note: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"weight {name!r} has shape {tuple(tensor.shape)}. "
                                  f"Note: config.json expects {tuple(expected[name].shape)}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return model, sha256_file(weights)


def save(model: AlibiLM, tokenizer, directory: str | Path, *, dtype: torch.dtype = torch.float32) -> None:
    """Write weights, config and tokenizer into ``directory`` as one set (each under a temporary name first).

    Files of an earlier checkpoint of this tool are replaced; any other file of those names is refused."""
    from safetensors.torch import save_file

    directory = Path(directory)
    targets = [directory / WEIGHTS, directory / TOKENIZER, directory / CONFIG]
    if any(t.exists() for t in targets):
        try:
            _read_config(directory)
        except CheckpointError:
            raise CheckpointError(f"{str(directory)!r} holds files that are not an alibi-export checkpoint: "
                                  "refusing to replace them. Note: save into a new or empty folder") from None
    directory.mkdir(parents=True, exist_ok=True)
    # Tied embeddings share storage; safetensors refuses shared tensors, so clone each.
    state = {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_files(targets) as (weights, tok, config):
        save_file(state, str(weights), metadata={"format": "pt"})
        tokenizer.save(str(tok))
        config.write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
