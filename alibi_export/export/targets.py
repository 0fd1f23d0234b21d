"""``--target``: the export options this project measured best for each runtime, in one table.

Explicit options override a target's; an explicit option the target's runtime cannot run is refused in
one line. The measurements behind each row are in BENCHMARKS.md:
- cpu: the decomposed form (memory-linear attention on ONNX Runtime's CPU kernels; the onnx form's CPU
  Attention kernel materializes the scores), float32 weights quantized to int8 (8-bit MatMulNBits,
  accurate on every x86 kernel path: perplexity within 1.001x of PyTorch's, 0.58x the file; on an AVX2
  CPU without VNNI its decoding step is 0.72-0.92x float32's time but its forward at 512 tokens is
  1.05-1.21x: docs/int8.md).
- cuda: the onnx form (ONNX Runtime's fused flash attention) with its fused LayerNorm/GELU tails, fp16.
- tensorrt-rtx: the onnx form (parsed to TensorRT's native attention; the decomposed form's Loop does not
  build and the file must stay free of ONNX Runtime's fused operators).
- genai: an onnxruntime-genai folder of the KV-cache decoder with int4 weights (MatMulNBits), the
  fastest decode measured on CPU.
"""
from __future__ import annotations

from ..errors import ExportError

__all__ = ["TARGETS", "resolve_target"]

TARGETS: dict[str, dict] = {
    "cpu": dict(dynamic_len=True, attention="decomposed", dtype="float32", quantize="int8"),
    "cuda": dict(dynamic_len=True, attention="onnx", ort_fusions=True, dtype="float16", quantize=None),
    "tensorrt-rtx": dict(dynamic_len=True, attention="onnx", ort_fusions=False, quantize=None),
    "genai": dict(dynamic_len=True, kv_cache=True, genai=True, attention="decomposed", dtype="float32",
                  quantize="int4"),
}

# (option, predicate on its explicit value, why the target's runtime cannot take it)
_REFUSED = {
    "cuda": [("quantize", bool, "quantized exports use ONNX Runtime's CPU operators")],
    "tensorrt-rtx": [("quantize", bool, "quantized exports use ONNX Runtime's CPU operators"),
                     ("ort_fusions", bool, "TensorRT cannot parse ONNX Runtime's fused operators"),
                     ("attention", lambda a: a != "onnx", "TensorRT-RTX builds only the onnx attention form")],
    "genai": [("kv_cache", lambda v: not v, "onnxruntime-genai runs the KV-cache decoder"),
              ("genai", lambda v: not v, "the genai target writes an onnxruntime-genai folder")],
    "cpu": [("genai", bool, "use --target genai for an onnxruntime-genai folder")],
}
_FLAGS = {"dynamic_len": "--dynamic-len", "kv_cache": "--kv-cache", "genai": "--genai", "ort_fusions": "--ort-fusions"}


def resolve_target(target: str, options: dict, explicit: set[str]) -> tuple[dict, str]:
    """``options`` (every export option, as parsed) with ``target``'s choices applied except where the
    option's name is in ``explicit`` (given by the user), and a one-line description of the choice. A
    target's quantization that an explicit option rules out (float16, another attention form) is dropped."""
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}. Note: expected one of {', '.join(TARGETS)}")
    given = {k: options[k] for k in explicit if k in options}
    for option, refused, why in _REFUSED.get(target, []):
        if option in given and refused(given[option]):
            raise ExportError(f"--target {target} contradicts {_flag(option, given[option])}: {why}")
    if given.get("dynamic_len") is False:
        raise ExportError(f"--target {target} contradicts --fixed-len: targets export one file for any length")
    resolved = {**options, **TARGETS[target], **given}
    if "quantize" not in given and (resolved["attention"] != "decomposed" or resolved["dtype"] == "float16"):
        resolved["quantize"] = None
    shown = [k for k in resolved if (k in TARGETS[target] or k in given) and resolved[k] not in (None, False)]
    chosen = " ".join(_flag(k, resolved[k]) for k in shown)
    overridden = f" ({', '.join(_flag(k, v) for k, v in given.items())} given explicitly)" if given else ""
    return resolved, f"target {target}: {chosen}{overridden}"


def _flag(option: str, value) -> str:
    if option in _FLAGS:
        return _FLAGS[option] if value else f"--no-{_FLAGS[option][2:]}" if option != "dynamic_len" else "--fixed-len"
    return f"--{option.replace('_', '-')} {value}"
