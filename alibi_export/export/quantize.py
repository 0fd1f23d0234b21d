"""Quantized CPU exports, by ONNX Runtime's own tools: int8 and int4 weights, both blockwise
(``MatMulNBits``, 8 and 4 bits). No quantizer of ours: this module prepares the graph, picks the tools'
options and records what was done in the file's metadata.

Why these choices (measured on 2 CPU cores, BENCHMARKS.md):
- int8 is 8-bit ``MatMulNBits`` (symmetric weights per block of 32 along K, ``accuracy_level`` 4: the
  kernel quantizes the activations to int8 per block of 32, ``max|x| / 127``), not ``quantize_dynamic``
  (issue 19). ``quantize_dynamic`` multiplies u8 activations (0..255) by int8 weights: ONNX Runtime's AVX2
  kernel, and its AVX-512BW kernel on CPUs without VNNI, add each pair of products into int16 with
  saturation (VPMADDUBSW; 2 x 255 x 127 = 64,770 > 32,767), while VNNI and AMX accumulate int32. So a file
  gated on a VNNI machine lost accuracy on an AVX2 server: perplexity over float32 1.28-1.31 on a BLOOM
  post-LN model, 1.03-1.11 MPT, 1.04-1.044 Falcon multi-query (the gate is 1.02). Here the operands are
  bounded by |a| <= 127 and |w - 128| <= 128 (weight codes centred on their zero point), so a pair is at
  most 2 x 127 x 128 = 32,512 < 32,767: a path that sums pairs in int16 cannot saturate, and the VNNI paths
  (AVX-VNNI, AVX-512 VNNI) sum in int32. On this AVX2 CPU the kernel's output equals the exact integer
  product (tests/test_quantize.py emulates the arithmetic on the file's weights and real activations and
  compares ONNX Runtime's kernel with it). Not measured: the
  AVX-512BW kernel of CPUs without VNNI (Skylake-SP); what the gate recorded (below) is what says so there.
  Measured with tools/compare_int8_recipes.py on AVX2, ratio at 1x/4x(/16x) over float32 PyTorch:

      recipe (ONNX Runtime tool)           alibi-small             BLOOM post-LN   MPT           Falcon MQA
      quantize_dynamic int8 (u8s8)         1.0009 1.0015 1.0002    1.277 1.310     1.025 1.109   1.036 1.044
      + reduce_range (7-bit weights)       1.0010 1.0025 1.0016    1.048 1.052     0.972 0.964   1.018 1.017
      quantize_dynamic uint8 (U8U8)        1.0008 1.0016 1.0014    0.981 0.997     0.990 1.026   1.010 1.030
      MatMulNBits 8-bit, level 4 (chosen)  1.0005 1.0007 1.0004    1.003 0.993     1.000 1.015   0.989 1.013

  7-bit weights and U8U8 cannot saturate either, but lose more than the gate allows on the tiny random
  Hugging Face models (whose fp32 perplexity is ~1e8: quantization noise moves it a few percent); blocks
  of 32 keep the weights' and activations' scales local, which is what keeps those within 1.02. The
  argmax agreement with float32 is 98.3-98.6% on the shipped model (u8s8: 95.8-95.9%). The price on
  that AVX2 CPU: the shipped model's forward at 512 tokens takes 1.05-1.21x float32's time (u8s8:
  0.76-0.91x), a decoding step 0.72-0.92x (u8s8: 0.67-0.90x); the file is 0.58x float32's (u8s8: 0.55x).
- The gate's arithmetic is the CPU's: the export records the int8 kernel path its gate ran on
  (``runtime.onnxruntime.cpu_kernel_path``) with the ratios, and ``validate`` on another machine prints
  both paths and re-runs the gate there.
- Blockwise weight-only quantization needs no calibration data (static QDQ would be calibrated at the
  training length, and ALiBi's point is running far past it).
- Only weight products are quantized: q·kᵀ and p·v keep float32, so the ALiBi term m_h·(j − i) (large
  at 16× the training length) is never rounded to 8 bits.
- The tied LM head (``x @ wte.T``) is untied into its own constant first, so that the tools see a
  weight product (it is a quarter of the shipped model's work per token). The LM head is 8-bit in both
  recipes (int4 keeps it there, as llama.cpp's q4_0 keeps its output table at 6 bits: see ``_int4``), and a
  tied embedding reads the head's own 8-bit blocks (one table, see ``_embedding_from_head``), as llama.cpp
  does with its tied table. An untied embedding is a 4-bit ``GatherBlockQuantized`` for int4 (ONNX
  Runtime's tool offers that for 4 bits only) and float32 for int8.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ExportError

__all__ = ["QUANTIZATIONS", "DEFAULT_BLOCK_SIZE", "PPL_TOLERANCE", "INT8_ACCURACY_LEVEL", "check_quantize_options",
           "quantize_model"]

log = logging.getLogger(__name__)

QUANTIZATIONS = ("int8", "int4")
DEFAULT_BLOCK_SIZE = 32
# Accuracy gate: perplexity of the quantized file over the fp32 PyTorch model's, at 1x, 4x, 16x train length.
PPL_TOLERANCE = {"int8": 1.02, "int4": 1.08}
# int8's MatMulNBits accuracy level: 4 = int8 activations per block in the kernel, 0 = float32 products.
INT8_ACCURACY_LEVEL = 4


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
    if (not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1)):
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
        out = (_int8 if quantize == "int8" else _int4)(proto, block_size)
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


def _int8(proto: onnx.ModelProto, block_size: int) -> onnx.ModelProto:
    """8-bit ``MatMulNBits`` (the module's docstring says why not ``quantize_dynamic``'s u8 x s8 products), the
    embedding table read from the LM head's 8-bit blocks where the two were tied."""
    out = _nbits(proto, 8, block_size, INT8_ACCURACY_LEVEL, op_types=("MatMul",), quant_axes=(("MatMul", 0),))
    _embedding_from_head(out)
    return out


def _embedding_from_head(proto: onnx.ModelProto) -> int:
    """Each float embedding Gather whose table the 8-bit LM head holds, to within one quantization step, reads
    the head's blocks instead (``GatherBlockQuantized``, 8 bits, the same zero point 128): the file keeps one
    int8 table where it kept a float32 one plus the head's int8 copy, as llama.cpp's q8_0 keeps its tied
    ``token_embd`` (issue 23: the BLOOM of d 1024 and 32k tokens went from 1.7x q8_0's size to 1.1x). ONNX
    Runtime's tool quantizes a Gather to 4 bits only, so the blocks are the tool's, shared, not re-made. The
    Gather's output is (ids..., blocks, block) and a Reshape joins the last two axes. A table that is not the
    head's (an untied model), or whose width is not a whole number of blocks, stays float32. Returns the count
    of Gathers rewritten."""
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in graph.input}
    heads = [n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] in inits and n.input[2] in inits
             and _attr(n, "bits") == 8]
    done = 0
    for gather in [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits]:
        table = inits[gather.input[0]]
        if table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2 or _attr(gather, "axis", 0) != 0 \
                or gather.input[1] not in ranks:
            continue
        rows, width = table.dims
        for head in heads:
            block = _attr(head, "block_size")
            if (_attr(head, "N"), _attr(head, "K")) != (rows, width) or width % block or len(head.input) > 3:
                continue
            codes = numpy_helper.to_array(inits[head.input[1]])  # (rows, width / block, block) uint8
            scales = numpy_helper.to_array(inits[head.input[2]]).reshape(rows, width // block, 1)
            weights = numpy_helper.to_array(table).reshape(rows, width // block, block)
            # Within one step: the tool's scale maps a block's largest magnitude to -128, so the opposite sign
            # clamps at 127 (a rounding error up to one step there, half a step elsewhere).
            if np.any(np.abs((codes.astype(np.float32) - 128) * scales - weights) > 1.001 * np.abs(scales) + 1e-12):
                continue  # not this head's table
            name = head.input[1] + "_gather_scales"
            graph.initializer.extend([numpy_helper.from_array(scales, name), numpy_helper.from_array(
                np.array([0] * ranks[gather.input[1]] + [width], dtype=np.int64), name + "_shape")])
            blocks = gather.output[0] + "_blocks"
            at = list(graph.node).index(gather)
            graph.node.remove(gather)
            graph.node.insert(at, onnx.helper.make_node("Reshape", [blocks, name + "_shape"], [gather.output[0]],
                                                        name=(gather.name or blocks) + "_join"))
            graph.node.insert(at, onnx.helper.make_node(
                "GatherBlockQuantized", [head.input[1], gather.input[1], name], [blocks], domain="com.microsoft",
                name=(gather.name or blocks) + "_Q8", gather_axis=0, quantize_axis=2, block_size=block, bits=8))
            if not any(table.name in _outer_names(n) for n in graph.node):
                graph.initializer.remove(table)
            done += 1
            break
    if done and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return done


def _attr(node: onnx.NodeProto, name: str, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _int4(proto: onnx.ModelProto, block_size: int) -> onnx.ModelProto:
    """4-bit blocks for the layers' products; the LM head keeps 8 bits (int8's blocks), and a tied
    embedding reads the head's blocks. The head writes the logits directly, so its error is not averaged
    away by any later layer: with it at 4 bits, the logits error on a BLOOM of d 1024 was 0.73 against
    llama.cpp q4_0's 0.52, which keeps its output table at 6 bits (Q6_K) for the same reason (issue 23).
    Where the embedding is not the head's table it stays a 4-bit ``GatherBlockQuantized``, as before."""
    heads = _lm_heads(proto)
    tied = {g.name for g in proto.graph.node if g.op_type == "Gather" and any(h[1] == g.input[0] for h in heads)}
    # accuracy_level 4: int8 activations in the kernel (ONNX Runtime's fast CPU path for MatMulNBits).
    out = _nbits(proto, 4, block_size, 4, op_types=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)),
                 exclude=[h[0] for h in heads] + sorted(tied))
    if heads:
        out = _nbits(out, 8, block_size, 4, op_types=("MatMul",), quant_axes=(("MatMul", 0),),
                     include=[h[0] for h in heads])
        _embedding_from_head(out)
    return out


def _lm_heads(proto: onnx.ModelProto) -> list[tuple[str, str | None]]:
    """(node name, tied table's name or None) of each product that writes a graph output's logits: a constant
    MatMul whose output width is a float embedding table's row count (the vocabulary). Tied when its weight is
    that table transposed (``_untie_lm_head`` made it a constant of its own)."""
    inits = {i.name: i for i in proto.graph.initializer}
    tables = {i.name: i for i in inits.values() if len(i.dims) == 2 and i.data_type == onnx.TensorProto.FLOAT
              and any(n.op_type == "Gather" and n.input[0] == i.name for n in proto.graph.node)}
    heads = []
    for node in proto.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or len(weight.dims) != 2 or not node.name:
            continue
        for table in tables.values():
            if tuple(table.dims) == tuple(weight.dims)[::-1]:
                same = np.array_equal(numpy_helper.to_array(table).T, numpy_helper.to_array(weight))
                heads.append((node.name, table.name if same else None))
                break
    return heads


def _nbits(proto: onnx.ModelProto, bits: int, block_size: int, accuracy_level: int, *, op_types,
           quant_axes, exclude=(), include=None) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                                          bits=bits, op_types_to_quantize=op_types, quant_axes=quant_axes)
    quantizer = MatMulNBitsQuantizer(proto, nodes_to_exclude=list(exclude), nodes_to_include=include,
                                     algo_config=config)
    quantizer.process()
    return quantizer.model.model
