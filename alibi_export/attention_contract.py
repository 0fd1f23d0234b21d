"""The custom attention node's contract: what the exporter emits and what a runtime must implement.

The exporter (:mod:`alibi_export.export`) writes these nodes, ONNX Runtime runs their function bodies and
the TensorRT plugin (:mod:`alibi_export.runtime.tensorrt.plugin`) registers itself under the same name,
namespace and version. Both sides import this module, so neither imports the other.
"""
from __future__ import annotations

__all__ = ["DOMAIN", "OP_TYPE", "MASKED_OP_TYPE", "OP_VERSION", "ATTRIBUTES", "BF16_ATTRIBUTES"]

DOMAIN = "alibi_export"  # the ONNX domain of the node, and the TensorRT plugin's namespace
OP_TYPE = "AlibiAttention"  # (q, k, v) -> out, each (batch, heads, length, head_dim)
# (q, k, v, key_mask, key_pos) -> out: the KV-cache decoder's form. key_mask (B, 1, 1, Lk) is additive (0 or a
# large negative value for padding); key_pos (B, 1, 1, Lk) is each key's position among its row's real tokens
# (alibi.token_positions), computed once per graph and shared by every layer.
MASKED_OP_TYPE = "AlibiAttentionMasked"
OP_VERSION = 1
# The node's attributes, in the order the plugin's fields are declared: ints num_heads, head_dim, causal;
# floats slopes (one per head; all zero for plain causal attention) and scale (1 / sqrt(head_dim)).
ATTRIBUTES = ("num_heads", "head_dim", "slopes", "scale", "causal")
# Falcon's bf16 bias only (its node carries the raw slopes): ints bias_bf16 = 1, floats bias_scale. The
# plugin does not compute that bias and refuses such a node.
BF16_ATTRIBUTES = ("bias_scale", "bias_bf16")
