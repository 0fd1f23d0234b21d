"""Sizes a user gives: evaluation lengths, and the upper bound every size is checked against before anything
is allocated.

Lengths mean the same in every command (``onnx``, ``validate``, ``ppl``): a comma-separated list whose items are
token counts (``1024``) or multiples of the model's training length (``4x``); the default is the training
length x 1, 2, 4, 8, 16, the range the paper's extrapolation claim covers.

A size that would need more memory than the machine has is refused up front with what it would need: a length
of 10^8 tokens otherwise allocates gigabytes of random ids and logits before failing deep inside a runtime.
"""
from __future__ import annotations

import os
import re

from .errors import AlibiExportError

__all__ = ["DEFAULT_MULTIPLES", "parse_lengths", "resolve_lengths", "physical_memory", "check_fits",
           "evaluation_bytes", "check_evaluation_fits", "MAX_VOCAB_SIZE"]

DEFAULT_MULTIPLES = (1, 2, 4, 8, 16)
MAX_VOCAB_SIZE = 1 << 20  # 1,048,576: four times the largest vocabularies in use; the tokenizer trainer aborts far above
_ITEM = re.compile(r"\s*(\d+)\s*(x?)\s*")


def parse_lengths(text: str) -> tuple[int | str, ...]:
    """``"256,4x"`` -> ``(256, "4x")``: positive token counts and positive multiples of the training length."""
    items = []
    for part in str(text).split(","):
        m = _ITEM.fullmatch(part)
        if not m or int(m.group(1)) < 1:
            raise AlibiExportError(f"bad lengths {text!r}. Note: expected comma-separated positive integers (token "
                                   "counts) or multiples of the training length such as 4x, e.g. 256,1024 or 1x,4x,16x")
        items.append(f"{int(m.group(1))}x" if m.group(2) else int(m.group(1)))
    return tuple(items)


def resolve_lengths(spec, train_len: int | None, *, fixed: int | None = None) -> list[int]:
    """Token counts for ``spec`` (what :func:`parse_lengths` gives; None: the default multiples). For a
    fixed-length graph of length ``fixed`` the default is that length, and any other length is refused."""
    if fixed is not None:
        lengths = [fixed] if spec is None else resolve_lengths(spec, train_len)
        if set(lengths) != {fixed}:
            raise AlibiExportError(f"a fixed-length export runs at its own length ({fixed}) only, not "
                                   f"{','.join(map(str, lengths))}. Note: drop --lengths, or use a dynamic-length "
                                   "export (the default of `onnx`)")
        return lengths
    spec = tuple(f"{m}x" for m in DEFAULT_MULTIPLES) if spec is None else spec
    out = []
    for item in spec:
        if isinstance(item, str):
            if not train_len:
                raise AlibiExportError(f"length {item} is a multiple of the training length, which is not known "
                                       "here. Note: give lengths in tokens")
            out.append(int(item[:-1]) * train_len)
        else:
            out.append(int(item))
    return out


def physical_memory() -> int:
    """Bytes of RAM on this machine (the bound: a size that needs more cannot run here, with or without swap)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound from here
        return 1 << 62


def _gb(n: float) -> str:
    return f"{n / 1e9:,.0f} GB" if n >= 10e9 else f"{n / 1e9:.1f} GB"


def check_fits(nbytes: int, what: str, note: str) -> None:
    """Refuse ``what`` in one line when it needs more than this machine's memory."""
    have = physical_memory()
    if nbytes > have:
        raise AlibiExportError(f"{what} would need about {_gb(nbytes)} of memory, more than this machine's "
                               f"{_gb(have)}. Note: {note}")


def evaluation_bytes(config, length: int, batch: int = 1) -> int:
    """A lower estimate of the peak memory of running ``config``'s model on (batch, length) tokens and comparing
    it with a reference: logits of both runners and their differences (6 float32 copies of batch x length x
    vocab), and the activations of one layer (16 float32 vectors of d_model per token)."""
    return batch * length * (24 * config.vocab_size + 64 * config.d_model + 8)


def check_evaluation_fits(config, lengths, batch: int = 1, what: str = "evaluating") -> None:
    longest = max(lengths)
    check_fits(evaluation_bytes(config, longest, batch),
               f"{what} at length {longest:,}" + (f" and batch {batch:,}" if batch > 1 else ""),
               "choose shorter lengths or a smaller batch")
