"""The project's checkpoint format: one folder of safetensors + config.json + tokenizer.json.

A folder whose config.json names a Hugging Face ``model_type`` (bloom, mpt, falcon) loads through
:mod:`alibi_export.hf` instead; both give the same :class:`Checkpoint`.

Nothing here unpickles: weights are safetensors, configs JSON, so a checkpoint from
anywhere can be loaded without running its code (a Hugging Face folder's legacy
``pytorch_model.bin`` goes through ``torch.load(weights_only=True)`` only).

config.json is not trusted before the weights: its sizes are checked against the shapes in the
safetensors header (read without the data) before any model is built, so a config that claims a
billion layers or a 10^8-token vocabulary is refused in one line instead of allocating gigabytes.

A training run's folder (see :func:`write_set`) keeps each save in its own ``step-*`` folder and switches
one symbolic link, ``current``, to it in one rename, so a kill at any moment leaves the previous complete
set or the new one; the folder's top-level files are links through ``current``. Its ``trainer_state.json``
records the SHA-256 of every other file of the set, checked on every load. A folder of plain files (the
shipped models, :func:`save`, Hugging Face folders) loads as before.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ._io import (atomic_files, interrupts_deferred, process_alive, remove_stale, sha256_file, sigterm_as_interrupt,
                  temp_name)
from .errors import CheckpointError, ConfigError
from .model import AlibiLM, ModelConfig

__all__ = ["Checkpoint", "load", "save", "WEIGHTS", "CONFIG", "TOKENIZER", "OPTIMIZER", "STATE", "CURRENT",
           "current_set", "verify_set", "write_set", "set_folders", "remove_stale_sets", "weight_shapes",
           "check_config_against_weights"]

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
OPTIMIZER = "optimizer.safetensors"  # a training run's AdamW state
STATE = "trainer_state.json"  # a training run's record: its step, config, and the SHA-256 of the other files
CURRENT = "current"  # the link that names a training folder's current set
_SET = re.compile(r"step-\d+\.(\d+)\.[a-z0-9_]{8}")  # a set folder: its step, the writing process, a random tag


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
    files = current_set(path)  # the folder itself, or a training run's current set
    data = _read_json(files)
    config = _read_config(files, data)
    from .hf import is_hf_config, load_model

    if is_hf_config(data):
        tokenizer = _read_tokenizer(files, config)  # before the weights: the cheap failure first
        model, sha256 = load_model(files, data, config)
    else:
        hashes = verify_set(files, skip=(OPTIMIZER,))
        model, sha256 = _load_own_weights(files, config, device, hashes.get(WEIGHTS))
        tokenizer = _read_tokenizer(files, config)
    model.to(device=device, dtype=dtype).eval()
    return Checkpoint(model, tokenizer, path, sha256)


def current_set(folder: str | Path) -> Path:
    """The folder that holds ``folder``'s files: the set ``current`` links to, or ``folder`` itself.

    The link must name a set folder beside it (a plain name of this tool's pattern), never another path."""
    folder = Path(folder)
    link = folder / CURRENT
    if not link.is_symlink():
        return folder
    target = os.readlink(link)
    if not _SET.fullmatch(target) or not (folder / target).is_dir():
        raise CheckpointError(f"{str(link)!r} points to {target!r}, not to a checkpoint set beside it. "
                              f"Note: expected a link to a step-* folder of {str(folder)!r}")
    return folder / target


def verify_set(files: Path, *, skip: Sequence[str] = ()) -> dict[str, str]:
    """Check the SHA-256 of each file that ``trainer_state.json`` records (those present in ``skip`` aside);
    returns the hashes checked. A folder without that record (shipped models, :func:`save`) has nothing to
    check. A file that differs means a set mixed by an interrupted write, or a file changed since."""
    try:
        recorded = json.loads((files / STATE).read_text()).get("files")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"corrupt {STATE} in {str(files)!r}: {e}") from None
    if recorded is None:
        return {}
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise CheckpointError(f"corrupt {STATE} in {str(files)!r}: 'files' is not a map of names to SHA-256s")
    hashes, bad = {}, []
    for name, expected in recorded.items():
        if name in skip:
            continue
        if name not in _SET_FILES:
            raise CheckpointError(f"{STATE} in {str(files)!r} records an unknown file {name!r}")
        try:
            hashes[name] = sha256_file(files / name)
        except FileNotFoundError:
            bad.append(f"{name} (missing)")
            continue
        if hashes[name] != expected:
            bad.append(name)
    if bad:
        raise CheckpointError(f"checkpoint {str(files)!r} does not match its {STATE}: {', '.join(bad)} "
                              "differ from the recorded SHA-256. Note: an interrupted save or a changed file; "
                              "use another checkpoint")
    return hashes


_SET_FILES = (WEIGHTS, CONFIG, TOKENIZER, OPTIMIZER)


def set_folders(folder: Path) -> list[Path]:
    """The set folders (``step-*``) in a training folder."""
    try:
        return sorted(p for p in folder.iterdir() if _SET.fullmatch(p.name) and not p.is_symlink())
    except OSError:
        return []


def _alive_set(p: Path) -> bool:
    return process_alive(int(_SET.fullmatch(p.name).group(1)))


def write_set(folder: str | Path, step: int, names: Sequence[str], write: Callable[[dict[str, Path]], None]) -> Path:
    """Write one checkpoint set into ``folder``: ``write`` fills a new ``step-*`` folder (given the path of
    each of ``names``), then the ``current`` link is switched to it in one rename, then the top-level links
    are made (once) and the previous set removed. Files that were top-level plain files of this tool's
    earlier versions are replaced by the links. Returns the new set's folder.

    A kill at any point leaves ``current`` on a complete set: the old one or the new one. Set folders and
    temporaries of processes that are gone are removed by the next write."""
    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    with sigterm_as_interrupt():
        remove_stale_sets(folder)
        previous = os.readlink(folder / CURRENT) if (folder / CURRENT).is_symlink() else None
        staging = temp_name(folder / f"step-{step:06d}")  # named before it exists: the finally always knows it
        new = None
        try:
            os.mkdir(staging, 0o700)
            write({n: staging / n for n in names})
            for f in staging.iterdir():
                os.chmod(f, 0o644)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            os.chmod(staging, 0o755)
            new = folder / f"step-{step:06d}.{os.getpid()}.{staging.name.rsplit('.', 2)[-2]}"
            with interrupts_deferred():  # once begun, the switch and its bookkeeping run to their end
                os.rename(staging, new)
                _link(folder / CURRENT, new.name)  # the switch
                for n in _SET_FILES + (STATE,):
                    top = folder / n
                    if n in names:
                        if not (top.is_symlink() and os.readlink(top) == f"{CURRENT}/{n}"):
                            _link(top, f"{CURRENT}/{n}")
                    elif top.is_symlink() or top.is_file():
                        top.unlink()  # a file of an earlier set that this one lacks (the optimizer state)
                if previous is not None and previous != new.name and _SET.fullmatch(previous):
                    shutil.rmtree(folder / previous, ignore_errors=True)  # one set is left, the current one
            return new
        finally:  # on an interrupt or an error too: what did not become the current set goes
            with interrupts_deferred():
                shutil.rmtree(staging, ignore_errors=True)  # gone already if renamed
                if new is not None and new.exists() and not _points_to(folder / CURRENT, new.name):
                    shutil.rmtree(new, ignore_errors=True)  # complete, but the switch failed


def _points_to(link: Path, name: str) -> bool:
    try:
        return os.readlink(link) == name
    except OSError:
        return False


def _link(path: Path, target: str) -> None:
    """Point the symbolic link ``path`` at ``target`` in one rename (over whatever ``path`` was)."""
    tmp = temp_name(path)
    try:
        os.symlink(target, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_sets(folder: Path) -> list[Path]:
    """Remove what interrupted writes of dead processes left in a training folder: staging folders, link
    temporaries, and set folders that ``current`` does not name. Returns what was removed."""
    current = os.readlink(folder / CURRENT) if (folder / CURRENT).is_symlink() else None
    removed = remove_stale(folder, [CURRENT, *_SET_FILES, STATE]) + remove_stale(folder, [r"step-\d+"], regex=True)
    for p in set_folders(folder):
        if p.name != current and not _alive_set(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def weight_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in a safetensors file, from its header only (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt weights {str(weights)!r}: {e}") from None


_BLOCK = re.compile(r"blocks\.(\d+)\.")


def check_config_against_weights(config: ModelConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Refuse a config whose model differs from the weights' shapes, before the model is allocated.

    The number of layers is read from the tensor names (a model of config.n_layer layers is built on the
    meta device, which allocates nothing, only once that number matches); every other size of the model
    shows in some tensor's shape."""
    layers = {int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))}
    contiguous = layers == set(range(len(layers)))  # sized by the header, never by the config
    if not contiguous or len(layers) != config.n_layer:
        found = f"{len(layers)} layers" if contiguous else f"layers {sorted(layers)[:8]}"
        raise CheckpointError(f"config.json in {where} says n_layer {config.n_layer}, but the weights hold "
                              f"{found}. Note: the config does not belong to these weights")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AlibiLM(config).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"weights in {where} do not match config.json. "
                              f"Note: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, shape in shapes.items():
        if shape != expected[name]:
            raise CheckpointError(f"weight {name!r} has shape {shape}. Note: config.json expects {expected[name]}")


def checked_config(path: str | Path) -> ModelConfig:
    """The config of a checkpoint folder, checked against its weights' header (our own format) without loading
    them: what sizes a run before the model loads (the CLI's memory bounds) must not trust a config that lies."""
    files = current_set(Path(path))
    data = _read_json(files)
    config = _read_config(files, data)
    from .hf import is_hf_config

    if not is_hf_config(data) and (files / WEIGHTS).is_file():
        check_config_against_weights(config, weight_shapes(files / WEIGHTS), str(path))
    return config


def _load_own_weights(path: Path, config: ModelConfig, device: str,
                      sha256: str | None = None) -> tuple[AlibiLM, str]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{str(path)!r} is not a checkpoint: {WEIGHTS} is missing")
    check_config_against_weights(config, weight_shapes(weights), repr(str(path)))
    try:
        state = load_file(weights, device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt weights {str(weights)!r}: {e}") from None
    model = AlibiLM(config)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return model, sha256 or sha256_file(weights)


def save(model: AlibiLM, tokenizer, directory: str | Path, *, dtype: torch.dtype = torch.float32) -> None:
    """Write weights, config and tokenizer into ``directory`` as one set (each under a temporary name first).

    Files of an earlier checkpoint of this tool are replaced; any other file of those names is refused."""
    from safetensors.torch import save_file

    directory = Path(directory)
    targets = [directory / WEIGHTS, directory / TOKENIZER, directory / CONFIG]
    if (directory / CURRENT).is_symlink():
        raise CheckpointError(f"{str(directory)!r} is a training run's folder: refusing to write into it. "
                              "Note: save into a new or empty folder")
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
