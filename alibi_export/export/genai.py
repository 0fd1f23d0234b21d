"""The onnxruntime-genai model folder: ``model.onnx`` (a KV-cache export), ``genai_config.json``,
``tokenizer.json`` and ``tokenizer_config.json``, which ``onnxruntime_genai.Model(folder)`` loads.

Written for onnxruntime-genai 0.18 (``GENAI_VERSIONS``); every field below is one that version reads
(its ``src/config.cpp``), nothing of ours. Why these settings:

- ``model.type`` is ``"decoder"``: genai's generic decoder-only model (``DecoderOnly_Model``, the same
  class as "llama", "phi", "qwen2", ... without a family name that is not true of this model). It
  feeds ``input_ids``, ``attention_mask`` and, per layer, ``past_key_values.%d.key|value`` and reads
  ``logits`` and ``present.%d.key|value``: exactly the KV-cache export's names. ``position_ids`` is
  fed only when the graph has such an input; ALiBi needs none. (``"gpt2"`` is a different class,
  ``Gpt_Model``, whose cache is one combined ``past_%d`` tensor per layer (2, batch, heads, past,
  head size), named by ``past_names``: with our separate key/value inputs it fails "Model input was
  not found".)
- ``search.past_present_share_buffer`` is false: with it true, genai allocates each past as one
  (batch, heads, max_length, head size) buffer that the graph must update in place (as
  GroupQueryAttention does); our graph concatenates past and new keys into a longer ``present``.
- ``decoder.head_size`` is the width of the cache: head_dim, or head_dim + 8 for the ``onnx``
  attention form, whose cache carries the folded ALiBi columns (genai only uses it to shape the
  empty past of the prefill); ``num_key_value_heads`` is 1 for multi-query models (Falcon).
- ``context_length`` and ``search.max_length`` are 16x the training length, the longest this
  project validates (ALiBi has no hard limit; ``set_search_options(max_length=...)`` raises it).
- ``pad_token_id`` is the end-of-text id. genai pads a batch's prompts on the right and keeps that
  padding, masked, between each prompt and its generated tokens; the export counts ALiBi positions over
  real tokens (alibi.token_positions), so the padding changes no token.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from .._io import (check_writable_dir, exchange, interrupts_deferred, remove_stale, sigterm_as_interrupt, stale,
                   temp_name)
from ..errors import ExportError

__all__ = ["GENAI_VERSIONS", "GENAI_FILES", "MODEL_TYPE", "genai_config", "tokenizer_config", "export_genai"]

log = logging.getLogger(__name__)

GENAI_VERSIONS = ">=0.18,<0.19"  # also pinned in pyproject.toml's `genai` extra
GENAI_FILES = ("model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json")
MODEL_TYPE = "decoder"
_EOS = "<|endoftext|>"
_EXTRAPOLATION = 16  # context length = this x the training length


def genai_config(config, *, eos_token_id: int, head_size: int) -> dict:
    """``genai_config.json`` for a KV-cache export of a model with ModelConfig ``config``."""
    context = _EXTRAPOLATION * config.train_len
    decoder = {
        "filename": "model.onnx",
        "session_options": {"provider_options": []},
        "head_size": head_size, "hidden_size": config.d_model, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads, "num_hidden_layers": config.n_layer,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
    }
    model = {"type": MODEL_TYPE, "vocab_size": config.vocab_size, "context_length": context,
             "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": eos_token_id,
             "decoder": decoder}
    search = {"do_sample": False, "num_beams": 1, "max_length": context, "min_length": 0,
              "past_present_share_buffer": False}
    return {"model": model, "search": search}


def tokenizer_config(eos_token: str = _EOS) -> dict:
    """``tokenizer_config.json``: the fields onnxruntime-extensions' tokenizer reads, for a byte-level BPE
    (GPT-2 style) whose special token is the end-of-text token, added to no prompt."""
    return {"tokenizer_class": "GPT2Tokenizer", "bos_token": eos_token, "eos_token": eos_token, "unk_token": eos_token,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}


def export_genai(checkpoint, out_dir: str | Path, *, check=None, **export_options):
    """Write ``out_dir`` as an onnxruntime-genai folder; returns the model's ExportResult.

    ``export_options`` go to :func:`alibi_export.export.onnx.export_onnx` (``kv_cache=True`` and
    ``dynamic_len=True`` are required). The folder is built beside ``out_dir`` and renamed into place; an
    existing ``out_dir`` is replaced only if it is empty or a folder this function wrote. ``check(folder)`` runs
    on the complete staged folder before it takes ``out_dir``'s place: a folder that fails it replaces nothing."""
    from .onnx import export_onnx

    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    cfg = checkpoint.config
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else checkpoint.tokenizer.token_to_id(_EOS)
    if eos is None:
        raise ExportError(f"a genai folder needs an end-of-text token. Note: expected eos_token_id in the config "
                          f"or {_EOS!r} in the vocabulary")
    if not export_options.get("kv_cache"):
        raise ExportError("a genai folder holds the KV-cache decoder. Note: add --kv-cache --dynamic-len")
    if export_options.get("logits_to_keep"):
        raise ExportError("onnxruntime-genai feeds no logits_to_keep input. Note: drop --logits-to-keep")
    with _staged_folder(out_dir) as tmp:
        result = export_onnx(checkpoint, tmp / "model.onnx", **export_options)
        from .attention_op import extra_dims

        width = cfg.head_dim + (extra_dims(cfg) if result.attention == "onnx" else 0)  # the cache's last dim
        config = genai_config(cfg, eos_token_id=eos, head_size=width)
        (tmp / "genai_config.json").write_text(json.dumps(config, indent=2) + "\n")
        eos_token = checkpoint.tokenizer.id_to_token(eos)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(eos_token), indent=2) + "\n")
        checkpoint.tokenizer.save(str(tmp / "tokenizer.json"))
        if check is not None:
            check(tmp)
    result.path = out_dir / "model.onnx"
    log.info("wrote onnxruntime-genai folder %s", out_dir)
    return result


@contextlib.contextmanager
def _staged_folder(out_dir: Path):
    """Yield a new folder beside ``out_dir``; if the block succeeds it takes ``out_dir``'s place.

    At every instant ``out_dir`` is the old complete folder or the new one: the two are swapped in one
    step (renameat2's RENAME_EXCHANGE) and only then is the old one, checked to be ours, removed. Where
    the file system cannot swap, the old folder is moved aside (``.NAME.old.PID.XXXXXXXX.tmp``) and the
    new one renamed in; a kill between the two is repaired by the next export, which moves the old one
    back. Staging folders of dead processes are removed first."""
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    with sigterm_as_interrupt():
        _recover(out_dir)
        tmp = temp_name(out_dir)  # named before it exists: the finally always knows it
        try:
            os.mkdir(tmp, 0o700)
            yield tmp
            os.chmod(tmp, 0o755)  # temporaries are private; outputs are ordinary folders
            if out_dir.exists():
                _check_replaceable(out_dir)  # again: it may have changed during the export
                if exchange(tmp, out_dir):  # tmp now holds the old folder, removed below
                    return
                old = temp_name(parent / f"{out_dir.name}.old")
                with interrupts_deferred():  # no interrupt between the two renames (a kill is repaired later)
                    os.replace(out_dir, old)
                    os.replace(tmp, out_dir)
                shutil.rmtree(old)  # only files this tool wrote (checked above)
            else:
                os.replace(tmp, out_dir)
        finally:
            with interrupts_deferred():
                shutil.rmtree(tmp, ignore_errors=True)  # our staging folder, or the old folder swapped out


def _recover(out_dir: Path) -> None:
    """Undo what an export killed mid-switch left: if ``out_dir`` is missing, move the old folder that a
    dead process had moved aside back in; then remove dead processes' staging and moved-aside folders."""
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    aside = stale(parent, f"{out_dir.name}.old")
    if not out_dir.exists() and not out_dir.is_symlink() and aside:
        newest = max(aside, key=lambda p: p.stat().st_mtime_ns)
        os.replace(newest, out_dir)
        log.warning("restored %s, which an interrupted export had moved aside", out_dir)
    remove_stale(parent, [out_dir.name, f"{out_dir.name}.old"])


def _check_replaceable(out_dir: Path) -> None:
    """An existing folder is replaced only if it is empty or holds nothing but a folder of ours: the four
    files, and the data files that its own model.onnx refers to (a file merely named like one is not ours)."""
    check_writable_dir(out_dir.parent if str(out_dir.parent) else Path("."))
    if out_dir.is_symlink():  # replacing it would move the link, and removing "the old folder" would follow it
        raise ExportError(f"{str(out_dir)!r} is a symbolic link. Note: pass the folder itself, or a new path")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{str(out_dir)!r} exists and is not a folder. Note: a genai export writes a folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    from .onnx_file import data_files_of

    model = out_dir / "model.onnx"
    ours = _written_by_us(model)
    recorded = {p.name for p in data_files_of(model)} if ours else set()
    names = {p.name for p in out_dir.iterdir()}
    foreign = sorted(names - set(GENAI_FILES) - recorded)
    if not ours or foreign:
        detail = f" (it holds {', '.join(foreign[:3])}, which no export of ours recorded)" if ours else ""
        raise ExportError(f"output folder {str(out_dir)!r} is not empty and was not written by alibi-export"
                          f"{detail}. Note: pass a new or empty folder, or move those files away")


def _written_by_us(path: Path) -> bool:
    from .onnx_file import written_by_alibi_export

    return not path.is_symlink() and path.is_file() and written_by_alibi_export(path)
