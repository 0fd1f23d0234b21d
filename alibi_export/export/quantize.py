"""Quantized CPU exports, by ONNX Runtime's own tools: int8 weights (dynamic quantization) and int4
weights (``MatMulNBits``, blockwise). No quantizer of ours: this module prepares the graph, picks the
tools' options and records what was done in the file's metadata.

Why these choices (measured on 2 CPU cores, BENCHMARKS.md):
- int8 is ``quantize_dynamic`` (weights int8 per channel, activations quantized per call from their own
  range) rather than static QDQ: static scales come from calibration windows at the training length,
  and ALiBi's point is running far past it, where activations are not the ones calibrated; dynamic
  quantization needs no calibration data and measured faster on ONNX Runtime's CPU kernels.
- Only weight products are quantized (``MatMulConstBOnly``): q·kᵀ and p·v keep float32, so the ALiBi
  term m_h·(j − i) (large at 16× the training length) is never rounded to 8 bits.
- The tied LM head (``x @ wte.T``) is untied into its own constant first, so that the tools see a
  weight product (it is a quarter of the shipped model's work per token); the embedding table is
  quantized as well for int4 (``GatherBlockQuantized``), which is what brings the file to ~0.16×.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ExportError

__all__ = ["QUANTIZATIONS", "DEFAULT_BLOCK_SIZE", "PPL_TOLERANCE", "check_quantize_options", "quantize_model"]

log = logging.getLogger(__name__)

QUANTIZATIONS = ("int8", "int4")
DEFAULT_BLOCK_SIZE = 32
# Accuracy gate: perplexity of the quantized file over the fp32 PyTorch model's, at 1x, 4x, 16x train length.
PPL_TOLERANCE = {"int8": 1.02, "int4": 1.08}


def check_quantize_options(quantize: str | None, block_size: int = DEFAULT_BLOCK_SIZE, *, attention: str,
                           dtype: str) -> None:
    """Refuse, in one line, what the quantized forms do not cover (before anything is traced)."""
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {quantize!r}. Note: expected one of {', '.join(QUANTIZATIONS)}")
    if attention != "decomposed":
        raise ExportError(f"--quantize applies to the CPU forms (the default decomposed attention, with or without "
                          f"--kv-cache), not --attention {attention}")
    if dtype != "float32":
        raise ExportError(f"--quantize starts from float32 weights. Note: expected --dtype float32, got {dtype}")
    if quantize == "int4" and (not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1)):
        raise ExportError(f"bad block size {block_size}. Note: expected a power of two >= 16 (default "
                          f"{DEFAULT_BLOCK_SIZE})")


def quantize_model(proto: onnx.ModelProto, quantize: str, *, block_size: int = DEFAULT_BLOCK_SIZE) -> onnx.ModelProto:
    """``proto`` (a float32 export) with its weight products quantized by ONNX Runtime's tools."""
    try:
        import onnxruntime.quantization  # noqa: F401
    except ImportError:  # pragma: no cover - onnxruntime is a core dependency
        from ..errors import MissingDependencyError

        raise MissingDependencyError("onnxruntime", "test", "quantization") from None
    _untie_lm_head(proto)
    logging.disable(logging.WARNING)  # the tools warn about opset/IR upgrades and pre-processing they suggest
    try:
        out = _int8(proto) if quantize == "int8" else _int4(proto, block_size)
    finally:
        logging.disable(logging.NOTSET)
    _sort_with_outer_scope(out.graph)
    log.info("quantized to %s: %d weight products", quantize,
             sum(n.op_type in ("MatMulInteger", "MatMulNBits", "DynamicQuantizeMatMul") for n in out.graph.node))
    return out


def _untie_lm_head(proto: onnx.ModelProto) -> None:
    """Replace ``Transpose(wte.weight)`` feeding the LM head by a constant of its own (in place)."""
    inits = {i.name: i for i in proto.graph.initializer}
    for node in list(proto.graph.node):
        if node.op_type == "Transpose" and len(node.input) == 1 and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            weight = numpy_helper.to_array(inits[node.input[0]])
            if weight.ndim != 2 or perm not in (None, [1, 0]):
                continue
            proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), node.output[0]))
            proto.graph.node.remove(node)


def _outer_names(node: onnx.NodeProto) -> set[str]:
    """Every name ``node`` reads: its inputs and what its subgraphs (If branches) read from outside them."""
    names = {i for i in node.input if i}
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.initializer} | {i.name for i in g.input}
            names |= {x for n in g.node for x in _outer_names(n)} - inner
    return names


def _sort_with_outer_scope(graph: onnx.GraphProto) -> None:
    """Re-sort ``graph``'s nodes (in place, stably) so each comes after what it reads, including the names its
    If branches read from the outer graph. ONNX Runtime's quantizers sort ignoring those: the int8 KV-cache
    export of multi-query Falcon came out with an If before the Mul that makes its key bias (onnx.checker:
    "Nodes in a graph must be topologically sorted")."""
    nodes = list(graph.node)
    made = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    needs = [{made[x] for x in _outer_names(n) if x in made} for n in nodes]
    done, order = set(), []
    while len(order) < len(nodes):
        ready = [i for i in range(len(nodes)) if i not in done and needs[i] <= done]
        if not ready:
            return  # a cycle: leave it to onnx.checker to report
        done.update(ready)
        order += ready
    if order != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[i] for i in order)


def _int8(proto: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .._io import sigterm_as_interrupt

    with sigterm_as_interrupt(), tempfile.TemporaryDirectory() as tmp:  # SIGTERM too removes the copy
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(proto, out, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True})
        return onnx.load(str(out))


def _int4(proto: onnx.ModelProto, block_size: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    # accuracy_level 4: int8 activations in the kernel (ONNX Runtime's fast CPU path for MatMulNBits).
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4,
                                          op_types_to_quantize=("MatMul", "Gather"),
                                          quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer = MatMulNBitsQuantizer(proto, algo_config=config)
    quantizer.process()
    return quantizer.model.model
