"""Perplexity across evaluation lengths, with any runner (ONNX Runtime or PyTorch).

The paper's protocol: split the token stream into non-overlapping windows of L tokens and score
every token given the earlier tokens of its window. With a stride, windows of L tokens advance by
``stride`` and only their last ``stride`` tokens are scored, so each token sees up to L-1 others.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ._io import atomic_path, check_replaceable, check_writable_dir, sha256_file
from .errors import DataError
from .progress import progress, runner_label

__all__ = ["PerplexityRow", "PerplexityComparison", "perplexity", "compare_perplexity", "evaluate_model", "write_json",
           "plot_perplexity", "check_outputs", "config_of", "common_train_len", "labels_for"]


@dataclass
class PerplexityRow:
    length: int
    ppl: float
    tokens: int  # tokens scored
    windows: int


@dataclass
class PerplexityComparison:
    """A candidate (a quantized file) against a reference (the float32 model) on the same windows."""
    length: int
    ppl: float  # the candidate's
    ppl_reference: float
    argmax_agreement: float  # share of scored positions where both predict the same next token

    @property
    def ratio(self) -> float:
        return self.ppl / self.ppl_reference


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed negative log-likelihood of ``targets`` under ``logits`` (L, V).

    Per-token terms in float32 (log-softmax over a few thousand logits loses ~1e-6 relative),
    summed in float64 so that long texts do not accumulate rounding."""
    import torch

    nll = torch.nn.functional.cross_entropy(torch.from_numpy(np.asarray(logits, dtype=np.float32)),
                                            torch.from_numpy(np.asarray(targets, dtype=np.int64)), reduction="none")
    return float(nll.double().sum())


def _windows(n_tokens: int, length: int, stride: int | None):
    """(start, first scored offset) per window; each window spans tokens [start, start + length]."""
    if stride is None:
        for start in range(0, n_tokens - length, length):
            yield start, 0
        return
    start = 0
    while start + length < n_tokens:
        yield start, 0 if start == 0 else length - stride
        start += stride


def _check(tokens: np.ndarray, lengths: list[int], stride: int | None) -> None:
    for length in lengths:
        if length < 1:
            raise DataError(f"evaluation lengths must be positive, got {length}")
        if len(tokens) < length + 1:
            raise DataError(f"text too short: {len(tokens)} tokens, but length {length} needs at least "
                            f"{length + 1}")
        if stride is not None and not 1 <= stride <= length:
            raise DataError(f"stride must be between 1 and the length ({length}), got {stride}")


def perplexity(runner, tokens: np.ndarray, lengths: list[int], *, stride: int | None = None,
               max_tokens: int | None = None) -> list[PerplexityRow]:
    """Perplexity of ``tokens`` at each evaluation length; ``runner`` is any Polygraphy runner."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    _check(tokens, lengths, stride)
    rows = []
    plan = [(length, list(_windows(len(tokens), length, stride))) for length in lengths]
    bar = progress(desc=f"perplexity {runner_label(runner)}", total=sum(len(w) for _, w in plan), unit="window")
    with runner, bar:
        for length, starts in plan:
            bar.set_postfix_str(f"{length} tokens")
            total, count = 0.0, 0
            for start, first in starts:
                window = tokens[start: start + length + 1]
                logits = runner.infer({"input_ids": window[None, :-1]})["logits"][0]  # (length, V)
                total += _nll(logits[first:], window[1 + first:])
                count += length - first
                bar.update(1)
            rows.append(PerplexityRow(length, math.exp(total / count), count, len(starts)))
    return rows


def compare_perplexity(candidate, reference, tokens: np.ndarray, lengths: list[int]) -> list[PerplexityComparison]:
    """Both runners on the same non-overlapping windows of ``tokens`` at each length: perplexities and
    argmax agreement (the accuracy gate of quantized exports, whose logits are not the reference's)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    _check(tokens, lengths, None)
    rows = []
    with candidate, reference:
        for length in lengths:
            nll, nll_ref, agree, count = 0.0, 0.0, 0, 0
            for start, _ in _windows(len(tokens), length, None):
                window = tokens[start: start + length + 1]
                feed = {"input_ids": window[None, :-1]}
                got, ref = candidate.infer(feed)["logits"][0], reference.infer(feed)["logits"][0]  # (length, V)
                nll += _nll(got, window[1:])
                nll_ref += _nll(ref, window[1:])
                agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
                count += length
            rows.append(PerplexityComparison(length, math.exp(nll / count), math.exp(nll_ref / count), agree / count))
    return rows


def evaluate_model(model: str | Path, text: str | Path, lengths: list[int], *, stride: int | None = None,
                   max_tokens: int | None = None, provider: str = "cpu",
                   kv_window: int | None = None) -> list[PerplexityRow]:
    """Perplexity of an export (``.onnx``, ``.engine`` or onnxruntime-genai folder; see
    :func:`~alibi_export.runtime.runner_for`) or a checkpoint folder (PyTorch) on a text file; with
    ``kv_window`` W each token sees only its last W tokens of its window (a rolling KV window)."""
    from .data import encode_text, read_text
    from .runtime import artifact_file, fixed_shape, is_genai_folder, require_gpu, runner_for

    text = read_text(text)  # a missing or unreadable text fails before any model loads
    if Path(model).suffix == ".engine":
        from .artifacts import read_sidecar

        read_sidecar(model)  # a missing or mismatched sidecar first
        require_gpu(f"running the TensorRT engine {str(model)!r}")
    if not Path(model).is_dir() or is_genai_folder(model):
        shape = fixed_shape(artifact_file(model))
        if shape is not None and (shape[0] != 1 or set(lengths) != {shape[1]}):
            raise DataError(f"{str(model)!r} is a fixed-length export of shape (batch {shape[0]}, length {shape[1]}): "
                            f"it is evaluated at length {shape[1]} and batch 1 only. Note: pass --lengths "
                            f"{shape[1]}, or export with a dynamic length (the default)")
    tokenizer, vocab_size = _tokenizer_of(model)
    tokens = encode_text(tokenizer, text)
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise DataError(f"the tokenizer of {str(model)!r} gives token id {int(tokens.max())}, outside the model's "
                        f"vocabulary of {vocab_size}. Note: the tokenizer does not belong to this model")
    runner = runner_for(model, provider=provider, kv_window=kv_window)
    return perplexity(runner, tokens, lengths, stride=stride, max_tokens=max_tokens)


def _tokenizer_of(model: str | Path):
    """(tokenizer, vocab size) of an export or a checkpoint folder, without loading any weights."""
    from .runtime import artifact_file, is_genai_folder

    path = Path(model)
    if path.is_dir() and not is_genai_folder(path):
        from .checkpoint import _read_config, _read_tokenizer

        config = _read_config(path)
        return _read_tokenizer(path, config), config.vocab_size
    from .artifacts import model_config_of, tokenizer_of

    path = artifact_file(path)
    return tokenizer_of(path), model_config_of(path).vocab_size


def config_of(model: str | Path):
    """The ModelConfig of an export or a checkpoint folder, read without loading any weights (its training length
    is what length multiples such as 4x multiply)."""
    from .runtime import artifact_file, is_genai_folder

    path = Path(model)
    if path.is_dir() and not is_genai_folder(path):
        from .checkpoint import checked_config

        return checked_config(path)
    from .artifacts import model_config_of

    return model_config_of(artifact_file(path))


def common_train_len(configs, spec) -> int:
    """The training length that multiples in ``spec`` (None: the default multiples) refer to, for models that
    are compared at the same lengths: refused when the models were trained at different lengths."""
    train_lens = sorted({c.train_len for c in configs})
    if (spec is None or any(isinstance(x, str) for x in spec)) and len(train_lens) > 1:
        raise DataError(f"the models were trained at different lengths ({', '.join(map(str, train_lens))}), so "
                        "multiples of the training length differ between them. Note: give --lengths in tokens")
    return configs[0].train_len


def labels_for(models) -> list[str]:
    """One distinct label per model for tables, JSON and plots: the file or folder name, or where two share a
    name, the path as given (and a counter for a path given twice)."""
    names = [Path(m).name or str(m) for m in models]
    labels = [n if names.count(n) == 1 else str(m) for n, m in zip(names, models)]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


_PRODUCER = "alibi-export"


def _json_is_ours(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("producer") == _PRODUCER
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return False


def _png_is_ours(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.info.get("Software") == _PRODUCER
    except Exception:  # PIL raises many types for files that are not images
        return False


def check_outputs(json_path: str | Path | None, plot_path: str | Path | None, *, kind: str = "perplexity") -> None:
    """Refuse, before any work, to replace a JSON or PNG file this tool did not write, an empty path, and one
    path given for both."""
    for path, what in ((json_path, "--json"), (plot_path, "--plot")):
        if path is not None and not str(path).strip():
            raise DataError(f"{what} is an empty path. Note: expected a file name")
    if json_path is not None and plot_path is not None and Path(json_path).resolve() == Path(plot_path).resolve():
        raise DataError(f"--json and --plot name the same file {str(json_path)!r}. Note: give two paths")
    if json_path is not None:
        check_writable_dir(Path(json_path).parent)
        check_replaceable(json_path, _json_is_ours, f"{kind} JSON")
    if plot_path is not None:
        check_writable_dir(Path(plot_path).parent)
        check_replaceable(plot_path, _png_is_ours, f"{kind} plot")


def write_json(results: dict[str, list[PerplexityRow]], path: str | Path, *, text: str | Path | None = None,
               **extra) -> None:
    """``text``, the evaluated file, is recorded by its name and SHA-256: never by its path, which would put
    a local path into a file meant to be shared, and which would not say what was evaluated."""
    check_outputs(path, None)
    if text is not None:
        extra = {"text": Path(text).name, "text_sha256": sha256_file(text), **extra}
    payload = {"producer": _PRODUCER, **extra,
               "results": {label: [asdict(r) for r in rows] for label, rows in results.items()}}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def plot_perplexity(results: dict[str, list[PerplexityRow]], path: str | Path, *, train_len: int | None = None,
                    title: str = "Perplexity against evaluation length") -> None:
    """The paper's Figure 1: perplexity (log scale) against evaluation length, one line per model."""
    import matplotlib

    check_outputs(None, path)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, rows in results.items():
        ax.plot([r.length for r in rows], [r.ppl for r in rows], marker="o", label=label)
    if train_len:
        ax.axvline(train_len, color="grey", linestyle="--", linewidth=1, label=f"training length {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": _PRODUCER})
    plt.close(fig)
