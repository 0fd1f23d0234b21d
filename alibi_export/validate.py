"""Parity of an exported model with its PyTorch source, on Polygraphy's Comparator.

At each length, both runners see the same fresh random token ids; Polygraphy compares the logits
against per-dtype tolerances. The result carries the numbers; the CLI decides the exit code.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import AlibiExportError
from .progress import progress, runner_label

__all__ = ["LengthResult", "CompareResult", "compare", "compare_kv_cache", "TOLERANCES", "tolerance_of", "GateResult",
           "perplexity_gate", "record_gate"]

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
            provider: str = "cpu", tolerance: dict | None = None, threads: int | None = None) -> CompareResult:
    """Compare ``onnx_path`` (an ``.onnx`` file in ONNX Runtime or an ``.engine`` in TensorRT) with
    ``reference`` (a TorchRunner or any Polygraphy runner)."""
    from .artifacts import read_metadata
    from .runtime import make_runner

    fixed = not read_metadata(onnx_path).dynamic_len
    if fixed and len(set(lengths)) > 1:
        raise AlibiExportError(f"{str(onnx_path)!r} is a fixed-length export: validate it at its own length only")
    candidate = make_runner(onnx_path, provider=provider, threads=threads)  # ONNX Runtime, or TensorRT
    return _compare_runners(onnx_path, reference, candidate, lengths, batch=batch, seed=seed, tolerance=tolerance)


def compare_kv_cache(onnx_path: str | Path, model, lengths: list[int], *, steps: int = 8, batch: int = 1,
                     seed: int | None = None, provider: str = "cpu", tolerance: dict | None = None,
                     threads: int | None = None) -> CompareResult:
    """Parity of a KV-cache export's incremental decoding with one PyTorch forward.

    At each length L, ONNX Runtime prefills L - ``steps`` fresh random tokens, then decodes the last
    ``steps`` one at a time through its cache; the concatenated logits are compared with ``model``
    (an AlibiLM) run on all L tokens at once."""
    from .runtime.generate import GenerationSession
    from .runtime.pytorch import TorchRunner

    session = GenerationSession(onnx_path, provider=provider, threads=threads)
    return _compare_runners(onnx_path, TorchRunner(model, name="pytorch"), _incremental_runner(session, steps),
                            lengths, batch=batch, seed=seed, tolerance=tolerance)


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
        with G_LOGGER.verbosity(G_LOGGER.ERROR):  # Polygraphy logs every tensor at INFO
            runs = Comparator.run([reference, candidate], data_loader=feed)
            accuracy = Comparator.compare_accuracy(runs, compare_func=SimpleCompareFunc(**tol), fail_fast=False)
        verdict = next(iter(accuracy[0].values()))[0]["logits"]
        ref = runs[0][1][0]["logits"].astype(np.float32)
        got = runs[1][1][0]["logits"].astype(np.float32)
        max_abs = float(verdict.max_absdiff)
        results.append(LengthResult(length, max_abs, max_abs / float(np.abs(ref).max()),
                                    float((ref.argmax(-1) == got.argmax(-1)).mean()), bool(verdict)))
        log.info("length %d: max abs %.3g, argmax %.4f", length, max_abs, results[-1].argmax_agreement)
    return CompareResult(results, **tol)


def _incremental_runner(session, steps: int):
    """A Polygraphy runner whose logits come from prefill + ``steps`` single-token decoding steps."""
    from collections import OrderedDict

    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class IncrementalRunner(BaseRunner):
        def __init__(self):
            super().__init__(name="onnxruntime-kv-cache", prefix="kv-cache-runner")

        def activate_impl(self):
            pass

        def get_input_metadata_impl(self):
            return TensorMetadata().add("input_ids", dtype=np.int64, shape=["batch", "sequence"])

        def infer_impl(self, feed_dict):
            ids = np.asarray(feed_dict["input_ids"])
            prefill = max(1, ids.shape[1] - steps)
            start = time.perf_counter()
            logits, _ = session.step_pieces(ids, [prefill] + [1] * (ids.shape[1] - prefill))
            self.inference_time = time.perf_counter() - start  # Polygraphy sums it per runner
            return OrderedDict(logits=logits)

        def deactivate_impl(self):
            pass

    return IncrementalRunner()


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
    from .runtime import make_runner
    from .runtime.generate import GenerationSession
    from .runtime.onnxruntime import cpu_kernel_path
    from .runtime.pytorch import TorchRunner

    meta = read_metadata(onnx_path)
    quantization = meta.quantization or meta.dtype
    tolerance = tolerance if tolerance is not None else PPL_TOLERANCE.get(quantization, 1.0 + 1e-4)
    if meta.kv_cache:
        candidate = _incremental_runner(GenerationSession(onnx_path, provider=provider, threads=threads), 0)
    else:
        candidate = make_runner(onnx_path, provider=provider, threads=threads)
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
