"""Text to token streams, and a byte-level BPE tokenizer trained locally (nothing downloaded)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = ["train_tokenizer", "encode_text", "read_text", "corpus_split"]

DOC_SEPARATOR = "= = = <doc> = = ="
SPECIAL_TOKENS = ["<|endoftext|>"]


def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"text file {str(path)!r} not found") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise DataError(f"cannot read {str(path)!r} as UTF-8 text: {e}") from None
    return text.replace(DOC_SEPARATOR, SPECIAL_TOKENS[0])


def corpus_split(corpus: str | Path, split: str) -> Path:
    """``corpus`` is a folder with train.txt / valid.txt / test.txt (as in shared/data)."""
    path = Path(corpus) / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"corpus {str(corpus)!r} has no {split}.txt. Note: expected train.txt, valid.txt, test.txt")
    return path


def train_tokenizer(files: list[str | Path], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [read_text(f) for f in files]
    tokenizer.train_from_iterator((line for t in texts for line in t.splitlines(keepends=True)), trainer)
    return tokenizer


def encode_text(tokenizer, text: str, *, chunk_chars: int = 1 << 16) -> np.ndarray:
    """The whole text as one token stream (the paper evaluates on the concatenated stream)."""
    lines = text.splitlines(keepends=True)
    chunks, current, size = [], [], 0
    for line in lines:  # split on line boundaries so no token straddles two chunks
        current.append(line)
        size += len(line)
        if size >= chunk_chars:
            chunks.append("".join(current))
            current, size = [], 0
    if current:
        chunks.append("".join(current))
    ids = [np.asarray(e.ids, dtype=np.int32) for e in tokenizer.encode_batch(chunks)]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
