"""The project's checkpoint format: one folder of safetensors + config.json + tokenizer.json.

Nothing here unpickles: weights are safetensors, configs JSON, so a checkpoint from
anywhere can be loaded without running its code.
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


def _read_config(path: Path) -> ModelConfig:
    try:
        data = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint: {CONFIG} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt {CONFIG} in {str(path)!r}: {e}") from None
    try:
        return ModelConfig.from_dict(data)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"invalid {CONFIG} in {str(path)!r}: {e}") from None


def load(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Checkpoint:
    """Load a checkpoint folder written by :func:`save` (or by ``alibi-export train``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} not found. Note: expected a folder with "
                              f"{WEIGHTS}, {CONFIG} and {TOKENIZER}")
    config = _read_config(path)
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
    model.to(device=device, dtype=dtype).eval()
    try:
        tokenizer = Tokenizer.from_file(str(path / TOKENIZER))
    except Exception as e:  # tokenizers raises a bare Exception for missing or corrupt files
        raise CheckpointError(f"cannot read {TOKENIZER} in {str(path)!r}: {e}") from None
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, more than the "
                              f"model's vocab_size {config.vocab_size}")
    return Checkpoint(model, tokenizer, path, sha256_file(weights))


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
