"""A Hugging Face folder's weights, read lazily tensor by tensor and copied into the model as they stream.

Formats: ``model.safetensors``; shards listed by ``model.safetensors.index.json``; legacy
``pytorch_model.bin`` (or its index), read only with ``torch.load(weights_only=True)``, which
refuses any pickle that holds more than tensors and plain containers. Each safetensors shard is
opened with ``safe_open`` and read one tensor at a time, so the peak memory of a load is the model
itself plus one tensor. Every tensor is checked against the shape the config implies, and every
parameter of the model must be filled, each failure in one line that names the tensor.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..errors import CheckpointError

__all__ = ["weight_files", "stored_elements", "check_parameter_count", "iter_tensors", "load_into", "sha256_files",
           "rename", "split_per_head_qkv"]

_SAFETENSORS, _SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
_BIN, _BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


def weight_files(path: Path) -> list[Path]:
    """The weight files of ``path``, safetensors first; a shard the index names must exist."""
    for index_name, single in ((_SAFE_INDEX, _SAFETENSORS), (_BIN_INDEX, _BIN)):
        index = path / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"corrupt {index_name} in {str(path)!r}: {e!r}") from None
            if any(Path(n).name != n for n in names):  # a shard outside the folder is never read
                raise CheckpointError(f"{index_name} in {str(path)!r} names a shard outside the folder")
            files = [path / n for n in names]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"shard {missing[0]!r} named in {index_name} is missing from {str(path)!r}")
            return files
        if (path / single).is_file():
            return [path / single]
    raise CheckpointError(f"no weights in {str(path)!r}. Note: expected {_SAFETENSORS}, {_SAFE_INDEX} with its "
                          f"shards, or a legacy {_BIN}")


def stored_elements(files: list[Path]) -> int:
    """An upper bound on the number of tensor elements ``files`` hold, without reading any tensor: the
    safetensors headers' shapes; for a pickled file, its size in bytes over 2 (no weight is narrower than
    16 bits here)."""
    from safetensors import SafetensorError, safe_open

    total = 0
    for f in files:
        if f.suffix != ".safetensors":
            total += f.stat().st_size // 2
            continue
        try:
            with safe_open(str(f), framework="pt") as shard:
                for name in shard.keys():
                    n = 1
                    for d in shard.get_slice(name).get_shape():
                        n *= d
                    total += n
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"corrupt weights {str(f)!r}: {e}") from None
    return total


_SMALL = 64 << 20  # parameters (256 MiB in float32): a mismatch below this is named tensor by tensor instead


def check_parameter_count(config, available: int, where: str) -> None:
    """Refuse a config whose model has more parameters than the weight files hold (each must be filled from
    them), before the model is allocated: the bound for folders whose tensor names are not this project's.
    A model small enough to build harmlessly is left to the per-tensor check, whose message names the tensor."""
    from ..model import parameter_count

    need = parameter_count(config)
    if need > available and need > _SMALL:
        raise CheckpointError(f"config.json in {where} describes a model of {need:,} parameters, but the weights "
                              f"hold at most {available:,}. Note: the config does not belong to these weights")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one shard open at a time and one tensor read at a time."""
    for f in files:
        if f.suffix == ".safetensors":
            yield from _safetensors(f)
        else:
            yield from _pickled(f)


def _safetensors(f: Path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(f), framework="pt") as shard:
            for name in shard.keys():
                yield name, shard.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt weights {str(f)!r}: {e}") from None


def _pickled(f: Path):
    import pickle

    try:  # weights_only: tensors, dicts, lists and numbers only; never arbitrary objects
        try:  # mmap: tensors stay on disk until copied into the model (zip-format files, torch >= 1.6)
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(f, map_location="cpu", weights_only=True)  # an older, non-zip file
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"refused to load {str(f)!r}: it is not a plain tensor file "
                              f"({str(e).splitlines()[0][:160]}). Note: convert it to safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(f)!r} does not hold a state dict of tensors")
    yield from state.items()


def rename(name: str, names: dict[str, str], layer_prefix: str, layer_names: dict[str, str]) -> str | None:
    """Our parameter name for a checkpoint name (``transformer.`` prefix optional), or None if unknown.

    ``names`` maps whole names; ``layer_names`` maps what follows ``{layer_prefix}.{i}.``."""
    name = name.removeprefix("transformer.")
    if name in names:
        return names[name]
    match = re.fullmatch(rf"{re.escape(layer_prefix)}\.(\d+)\.(.+)", name)
    if match and match.group(2) in layer_names:
        return f"blocks.{match.group(1)}.{layer_names[match.group(2)]}"
    return None


def split_per_head_qkv(name: str, tensor: torch.Tensor, n_head: int, head_dim: int) -> torch.Tensor:
    """A fused q|k|v laid out per head, (heads, 3, head_dim) rows (BLOOM, Falcon without multi-query),
    reordered to this project's layout: all q rows, then all k, then all v."""
    if tensor.shape[0] != 3 * n_head * head_dim:
        raise CheckpointError(f"weight {name!r} has shape {tuple(tensor.shape)}. Note: config.json expects "
                              f"{3 * n_head * head_dim} rows (3 x {n_head} heads x {head_dim})")
    rest = tensor.shape[1:]
    return tensor.reshape(n_head, 3, head_dim, *rest).transpose(0, 1).reshape(3 * n_head * head_dim, *rest)


Convert = Callable[[str, torch.Tensor], "tuple[str, torch.Tensor] | None"]


def load_into(model: torch.nn.Module, files: list[Path], convert: Convert, *, skip: Callable[[str], bool]) -> None:
    """Stream every tensor of ``files`` through ``convert`` into ``model``'s parameters, in place.

    ``convert(name, tensor)`` gives (our name, tensor) or None for a name it does not know; ``skip(name)``
    says which checkpoint tensors are deliberately ignored (a tied head's copy, rotary buffers)."""
    params = dict(model.state_dict(keep_vars=True))
    filled: set[str] = set()
    for name, tensor in iter_tensors(files):
        if skip(name):
            continue
        converted = convert(name, tensor)
        if converted is None or converted[0] not in params:
            raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint. Note: config.json does not "
                                  "describe it")
        ours, value = converted
        target = params[ours]
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"weight {name!r} has shape {tuple(value.shape)}. Note: config.json expects "
                                  f"{tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value.to(torch.float32))
        filled.add(ours)
        del tensor, value
    missing = sorted(set(params) - filled)
    if missing:
        raise CheckpointError(f"the checkpoint has no tensor for {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def sha256_files(files: list[Path]) -> str:
    """One SHA-256 over the weight files' names and bytes, in order: the source recorded in exports."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
