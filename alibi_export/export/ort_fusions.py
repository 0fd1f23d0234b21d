"""ONNX Runtime's fused transformer operators for the onnx attention form (``--ort-fusions``).

ONNX Runtime's session optimizer fuses almost none of this graph's residual Adds into
SkipLayerNormalization, because each residual sum also feeds the next block. Its Python transformer
optimizer keeps that sum as the fused op's fourth output, and folds the preceding projection bias in
too; it refuses only because its symbolic shape inference knows no opset-23 Attention. The one fact
it would check (both residual inputs are (batch, sequence, d_model)) holds by construction here, so
it runs with shape inference off. The file then holds com.microsoft operators: ONNX Runtime only.
"""
from __future__ import annotations

import collections
import logging

import onnx

from ..errors import ExportError

__all__ = ["fuse_for_onnxruntime", "FUSED_OPS"]

FUSED_OPS = ("SkipLayerNormalization", "BiasGelu")


def fuse_for_onnxruntime(proto: onnx.ModelProto, *, n_head: int, d_model: int) -> tuple[onnx.ModelProto, dict]:
    """``proto`` with LayerNorm + residual Add + bias Add as SkipLayerNormalization and bias + GELU as
    BiasGelu; returns it and the count of each fused op."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("gpt2")
    options.enable_shape_inference = False
    options.enable_attention = False  # the Attention ops are already fused; only the elementwise tails change
    logging.disable(logging.WARNING)  # its modules' loggers warn that the producer is not "pytorch", and so on
    try:
        fused = optimize_model(proto, model_type="gpt2", num_heads=n_head, hidden_size=d_model, opt_level=0,
                               optimization_options=options).model
    finally:
        logging.disable(logging.NOTSET)
    counts = collections.Counter(n.op_type for n in fused.graph.node)
    if not counts["SkipLayerNormalization"]:
        raise ExportError("ONNX Runtime's transformer optimizer fused no SkipLayerNormalization. Note: the "
                          "onnxruntime version installed may lay out its fusions differently; export without "
                          "--ort-fusions")
    if "com.microsoft" not in {o.domain for o in fused.opset_import}:
        fused.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return fused, {op: counts[op] for op in FUSED_OPS}
