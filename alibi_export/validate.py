"""Parity of an exported model with its PyTorch source, on Polygraphy's Comparator.

At each length, both runners see the same fresh random token ids; Polygraphy compares the logits
against per-dtype tolerances. The result carries the numbers; the CLI decides the exit code.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import AlibiExportError
from .progress import progress, runner_label

__all__ = ["LengthResult", "CompareResult", "compare", "compare_kv_cache", "TOLERANCES", "tolerance_of", "GateResult",
           "perplexity_gate", "record_gate", "ExportCheck", "check_export", "lengths_for", "source_checkpoint",
           "KV_STEPS"]

log = logging.getLogger(__name__)

# Logits of the shipped models reach |20|. float32: rounding through a few layers stays near
# 1e-5 absolute. float16: one ulp at |16..32| is 0.0156 and the residual stream adds a few
# roundings per layer, so a few ulps of absolute error is the honest bar.
# The onnx attention form folds m_h*j into the float32 scores, whose rounding then grows with the
# length (an ulp of m*L is 1e-3 at 16k tokens): observed 1.4e-3 at 4k and 7e-3 at 16k on CUDA.
TOLERANCES = {"float32": dict(atol=1e-3, rtol=1e-3), "float16": dict(atol=0.08, rtol=1e-2),
              "float32-folded": dict(atol=1e-2, rtol=1e-3)}


def tolerance_of(metadata) -> dict:
    """The tolerance for an export, from its :class:`~alibi_export.artifacts.OnnxMetadata` (dtype and form).

    A quantized file has none: its logits are not PyTorch's by design, so it is checked by
    :func:`perplexity_gate` instead."""
    if metadata.quantization:
        raise AlibiExportError(f"a {metadata.quantization}-quantized file is not logit-identical to PyTorch: it is "
                               "checked by perplexity. Note: validate it with --text (the perplexity gate)")
    if metadata.dtype == "float32" and metadata.attention == "onnx":
        return TOLERANCES["float32-folded"]
    return TOLERANCES[metadata.dtype]


@dataclass
class LengthResult:
    length: int
    max_abs: float
    max_rel: float  # max |a - b| over max |b|: relative to the logits' scale
    argmax_agreement: float
    passed: bool


@dataclass
class CompareResult:
    lengths: list[LengthResult]
    atol: float
    rtol: float

    def __bool__(self) -> bool:
        return all(r.passed for r in self.lengths)


def compare(onnx_path: str | Path, reference, lengths: list[int], *, batch: int = 1, seed: int | None = None,
            provider: str = "cpu", tolerance: dict | None = None, threads: int | None = None,
            steps: int = 0) -> CompareResult:
    """Compare an export (``.onnx`` file, ``.engine`` or genai folder; see :func:`~alibi_export.runtime.runner_for`)
    with ``reference`` (a TorchRunner or any Polygraphy runner). A KV-cache file decodes the last ``steps``
    tokens of each input one at a time through its cache."""
    from .runtime import artifact_file, fixed_shape, require_gpu, runner_for

    onnx_path = artifact_file(onnx_path)
    shape = fixed_shape(onnx_path)
    if shape is not None and (set(lengths) != {shape[1]} or batch != shape[0]):
        raise AlibiExportError(f"{str(onnx_path)!r} is a fixed-length export of shape (batch {shape[0]}, length "
                               f"{shape[1]}): validate it at that length and batch only")
    if onnx_path.suffix == ".engine":
        require_gpu(f"running the TensorRT engine {str(onnx_path)!r}")
    candidate = runner_for(onnx_path, provider=provider, threads=threads, steps=steps)
    return _compare_runners(onnx_path, reference, candidate, lengths, batch=batch, seed=seed, tolerance=tolerance)


def compare_kv_cache(onnx_path: str | Path, model, lengths: list[int], *, steps: int = 8, batch: int = 1,
                     seed: int | None = None, provider: str = "cpu", tolerance: dict | None = None,
                     threads: int | None = None) -> CompareResult:
    """Parity of a KV-cache export's incremental decoding with one PyTorch forward.

    At each length L, ONNX Runtime prefills L - ``steps`` fresh random tokens, then decodes the last
    ``steps`` one at a time through its cache; the concatenated logits are compared with ``model``
    (an AlibiLM) run on all L tokens at once."""
    from .runtime.pytorch import TorchRunner

    return compare(onnx_path, TorchRunner(model, name="pytorch"), lengths, batch=batch, seed=seed, provider=provider,
                   tolerance=tolerance, threads=threads, steps=steps)


def _compare_runners(onnx_path, reference, candidate, lengths, *, batch, seed, tolerance) -> CompareResult:
    """The one comparison path: both runners on the same fresh random ids, Polygraphy's verdict."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    from .artifacts import model_config_of, read_metadata

    cfg = model_config_of(onnx_path)
    tol = tolerance or tolerance_of(read_metadata(onnx_path))
    rng = np.random.default_rng(seed)
    results = []
    if any(length < 1 for length in lengths):
        raise AlibiExportError(f"lengths must be positive, got {min(lengths)}")
    bar = progress(lengths, desc=f"parity {runner_label(candidate)}", unit="length")
    for length in bar:
        bar.set_postfix_str(f"{length} tokens")
        feed = [{"input_ids": rng.integers(0, cfg.vocab_size, size=(batch, length), dtype=np.int64)}]
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # Polygraphy logs every tensor at INFO, each mismatch at ERROR:
            # the table below says it once
            runs = Comparator.run([reference, candidate], data_loader=feed)
            accuracy = Comparator.compare_accuracy(runs, compare_func=SimpleCompareFunc(**tol), fail_fast=False)
        verdict = next(iter(accuracy[0].values()))[0]["logits"]
        ref = runs[0][1][0]["logits"].astype(np.float32)
        got = runs[1][1][0]["logits"].astype(np.float32)
        max_abs = float(verdict.max_absdiff)
        scale = float(np.abs(ref).max()) or 1.0  # a reference of all-zero logits: the error is absolute
        results.append(LengthResult(length, max_abs, max_abs / scale,
                                    float((ref.argmax(-1) == got.argmax(-1)).mean()), bool(verdict)))
        log.info("length %d: max abs %.3g, argmax %.4f", length, max_abs, results[-1].argmax_agreement)
    return CompareResult(results, **tol)


@dataclass
class GateResult:
    """The accuracy gate of a quantized export: perplexity over the float32 model's, per length.

    ``cpu_kernel_path`` is where this gate ran (:func:`~alibi_export.runtime.onnxruntime.cpu_kernel_path`);
    ``recorded`` is the file's record of the gate its export ran (empty if none): an int8 file's arithmetic
    depends on the CPU's int8 kernel, so the two are only the same check on the same path."""
    rows: list  # PerplexityComparison per length
    tolerance: float  # the largest ratio that passes
    quantization: str
    cpu_kernel_path: str = ""
    recorded: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return all(r.ratio <= self.tolerance for r in self.rows)

    @property
    def recorded_path(self) -> str:
        return self.recorded.get("cpu_kernel_path", "")

    @property
    def path_differs(self) -> bool:
        """The file's gate ran on another int8 kernel path than this one (False when nothing is recorded)."""
        return bool(self.recorded_path) and self.recorded_path != self.cpu_kernel_path

    def record(self) -> dict:
        """What the file records of this gate (ratios rounded, so that a re-export writes the same bytes)."""
        return {"cpu_kernel_path": self.cpu_kernel_path, "tolerance": self.tolerance, "passed": bool(self),
                "rows": [[r.length, round(r.ratio, 6), round(r.argmax_agreement, 6)] for r in self.rows]}


def perplexity_gate(onnx_path: str | Path, model, tokens, lengths: list[int], *, tolerance: float | None = None,
                    provider: str = "cpu", threads: int | None = None) -> GateResult:
    """Perplexity of a quantized ``onnx_path`` against ``model`` (the float32 AlibiLM) on ``tokens`` at each
    length, and their argmax agreement; passes when every ratio is within ``tolerance`` (default: the
    quantization's, see ``PPL_TOLERANCE``). KV-cache files are run as one prefill per window. The result
    carries this machine's int8 kernel path and the file's record of its export's gate."""
    from .artifacts import read_metadata
    from .export.quantize import PPL_TOLERANCE
    from .perplexity import compare_perplexity
    from .runtime import runner_for
    from .runtime.onnxruntime import cpu_kernel_path
    from .runtime.pytorch import TorchRunner

    meta = read_metadata(onnx_path)
    quantization = meta.quantization or meta.dtype
    tolerance = tolerance if tolerance is not None else PPL_TOLERANCE.get(quantization, 1.0 + 1e-4)
    candidate = runner_for(onnx_path, provider=provider, threads=threads)  # a KV-cache file: one prefill per window
    rows = compare_perplexity(candidate, TorchRunner(model, name="pytorch"), tokens, lengths)
    path = cpu_kernel_path() if provider == "cpu" else provider
    return GateResult(rows, tolerance, quantization, path, dict(meta.quantization_gate))


def record_gate(onnx_path: str | Path, gate: GateResult) -> None:
    """Write ``gate`` into the file's metadata (atomically, through the module that owns the file format), so
    that ``validate`` on another machine knows which int8 kernel path the export's gate ran on."""
    from dataclasses import replace

    from .artifacts import read_metadata
    from .export.onnx_file import rewrite_metadata

    meta = replace(read_metadata(onnx_path), quantization_gate=gate.record())
    rewrite_metadata(onnx_path, meta.to_props())


# ----------------------------------------------------------------------------- one check for every kind of export
KV_STEPS = 8  # a KV-cache file's parity decodes this many tokens one at a time through its cache


@dataclass
class ExportCheck:
    """What :func:`check_export` ran and found: exactly one of ``parity`` and ``gate`` is set."""
    kind: str  # "parity", "kv-cache parity" or "perplexity gate"
    parity: CompareResult | None = None
    gate: GateResult | None = None
    perplexity: tuple | None = None  # (export rows, reference rows) of a parity check given tokens

    def __bool__(self) -> bool:
        return bool(self.parity if self.gate is None else self.gate)


def lengths_for(path: str | Path, spec, train_len: int) -> list[int]:
    """The lengths to check an export at: ``spec`` (see :func:`alibi_export.sizes.parse_lengths`) resolved against
    ``train_len``; a fixed-length export runs at its own length only (its default)."""
    from .runtime import artifact_file, fixed_shape
    from .sizes import resolve_lengths

    shape = fixed_shape(artifact_file(path))
    return resolve_lengths(spec, train_len, fixed=shape[1] if shape else None)


def source_checkpoint(artifact: str | Path, candidates=()) -> Path:
    """The checkpoint an export came from: the folder of its recorded name beside the artifact (a genai folder
    counts as the artifact) or in one of ``candidates`` (folders), whose weights have the recorded SHA-256.

    The recorded name must be a plain folder name: an artifact is not trusted to point anywhere else."""
    from ._io import sha256_file
    from .artifacts import read_metadata
    from .checkpoint import WEIGHTS
    from .runtime import artifact_file

    artifact = Path(artifact)
    meta = read_metadata(artifact_file(artifact))
    name = meta.source_name
    if not name or Path(name).name != name or name in (".", ".."):
        raise AlibiExportError(f"{str(artifact)!r} records a source checkpoint {name!r} that is not a plain folder "
                               "name: it is not followed. Note: pass the checkpoint folder as MODEL")
    for folder in (artifact.parent / name, *(Path(c) / name for c in candidates)):
        if (folder / WEIGHTS).is_file() and sha256_file(folder / WEIGHTS) == meta.source_sha256:
            return folder
    raise AlibiExportError(f"the checkpoint {name!r} that {str(artifact)!r} was exported from is neither beside it "
                           "nor shipped. Note: pass the checkpoint folder as MODEL")


def check_export(path: str | Path, reference, lengths: list[int], *, tokens=None, batch: int | None = None,
                 seed: int | None = None, provider: str = "cpu", tolerance: dict | None = None,
                 ppl_tolerance: float | None = None, threads: int | None = None) -> ExportCheck:
    """The check that fits an export, chosen by its metadata: a quantized file goes through
    :func:`perplexity_gate` on ``tokens`` (its logits are not the reference's by design); a KV-cache file is
    compared through its cache (prefill, then :data:`KV_STEPS` tokens one at a time); any other file on its
    logits, at each of ``lengths``, and with ``tokens`` also on perplexity.

    ``path``: an ``.onnx`` file, an ``.engine`` or an onnxruntime-genai folder. ``reference``: the float32
    AlibiLM, or (logit checks only) any Polygraphy runner, e.g. transformers' forward. ``batch`` defaults to
    1 (a fixed-length file: its own batch)."""
    import math

    import torch

    from .artifacts import read_metadata
    from .perplexity import perplexity
    from .runtime import artifact_file, fixed_shape, runner_for
    from .runtime.pytorch import TorchRunner

    file = artifact_file(path)
    meta = read_metadata(file)
    if ppl_tolerance is not None and not (math.isfinite(ppl_tolerance) and ppl_tolerance > 0):
        raise AlibiExportError(f"the perplexity tolerance must be a positive finite ratio, got {ppl_tolerance}")
    if meta.quantization:
        if not isinstance(reference, torch.nn.Module):
            raise AlibiExportError("a quantized file is checked by perplexity against this project's model of the "
                                   "checkpoint. Note: drop --reference transformers")
        if tokens is None:
            raise AlibiExportError("a quantized export is checked by perplexity. Note: pass a text")
        gate = perplexity_gate(file, reference, tokens, lengths, tolerance=ppl_tolerance, provider=provider,
                               threads=threads)
        return ExportCheck("perplexity gate", gate=gate)
    shape = fixed_shape(file)
    batch = batch or (shape[0] if shape else 1)
    runner = TorchRunner(reference, name="pytorch") if isinstance(reference, torch.nn.Module) else reference
    steps = KV_STEPS if meta.kv_cache else 0
    parity = compare(file, runner, lengths, batch=batch, seed=seed, provider=provider, tolerance=tolerance,
                     threads=threads, steps=steps)
    ppl = None
    if tokens is not None:
        ppl = (perplexity(runner_for(file, provider=provider, threads=threads), tokens, lengths),
               perplexity(runner, tokens, lengths))
    return ExportCheck("kv-cache parity" if meta.kv_cache else "parity", parity=parity, perplexity=ppl)
