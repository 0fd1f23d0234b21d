"""Falcon with ``alibi: true`` (``model_type: falcon``, the RW models): config.json -> ModelConfig, tensors renamed.

The math (transformers' modeling_falcon.py): the ALiBi bias is added to q.k *before* the 1/sqrt(d)
scale, and computed in bfloat16 from absolute key positions (see alibi.alibi_bias_bf16); exact
GELU; ``parallel_attn`` (attention and MLP both read the one LayerNorm); ``multi_query`` (one key
and value head: ``query_key_value`` rows are all q heads, then k, then v); ``bias`` on the linear
layers (LayerNorms always have one). Falcon without ALiBi (rotary) and the new decoder architecture
(Falcon-40B/180B) are refused.
"""
from __future__ import annotations

import torch

from ..model import ModelConfig
from ._options import field, not_alibi, refuse, refuse_unless
from .bloom import _LAYER as BLOOM_LAYER
from .weights import rename, split_per_head_qkv

__all__ = ["config_from_hf", "convert", "skip", "DEFAULT_TRAIN_LEN"]

DEFAULT_TRAIN_LEN = 2048  # transformers' default max_position_embeddings

_NAMES = {"word_embeddings.weight": "wte.weight", "ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias",
          "lm_head.weight": "lm_head.weight"}
_LAYER = BLOOM_LAYER  # Falcon-RW keeps BLOOM's per-layer tensor names (and its per-head fused qkv)


def config_from_hf(data: dict) -> ModelConfig:
    """Train length: ``max_position_embeddings`` (2048 where absent)."""
    if data.get("alibi") is not True:
        not_alibi("falcon", "alibi is false: it uses rotary positions")
    if data.get("new_decoder_architecture"):
        refuse("new_decoder_architecture", data["new_decoder_architecture"], "false")
    refuse_unless(data, "activation", ("gelu",))
    refuse_unless(data, "num_ln_in_parallel_attn", (1,))
    hidden = field(data, "hidden_size", int, None) or field(data, "n_embed", int)
    n_head = field(data, "num_attention_heads", int, None) or field(data, "n_head", int)
    multi_query = field(data, "multi_query", bool, True)
    n_kv = field(data, "num_kv_heads", int, n_head)
    if not multi_query and n_kv != n_head:
        refuse("num_kv_heads", n_kv, f"{n_head} (num_attention_heads) without multi_query")
    bias = field(data, "bias", bool, False)
    train_len = field(data, "max_position_embeddings", int, DEFAULT_TRAIN_LEN)
    eos = data.get("eos_token_id")
    return ModelConfig(
        vocab_size=field(data, "vocab_size", int), n_layer=field(data, "num_hidden_layers", int, None)
        or field(data, "n_layer", int), n_head=n_head, d_model=hidden,
        d_ff=field(data, "ffn_hidden_size", int, 4 * hidden), position="alibi", train_len=train_len,
        max_positions=train_len, layer_norm_eps=float(field(data, "layer_norm_epsilon", (int, float), 1e-5)),
        n_kv_head=1 if multi_query else None, qkv_bias=bias, proj_bias=bias, mlp_bias=bias, activation="gelu",
        parallel_attn=field(data, "parallel_attn", bool, True), alibi_scaled=True, alibi_bf16=True,
        tie_embeddings=field(data, "tie_word_embeddings", bool, True),
        eos_token_id=eos[0] if isinstance(eos, list) and eos else eos)


def convert(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> tuple[str, torch.Tensor] | None:
    ours = rename(name, _NAMES, "h", _LAYER)
    if ours is not None and cfg.kv_heads == cfg.n_head and ours.split(".")[-2:-1] == ["qkv"]:
        tensor = split_per_head_qkv(name, tensor, cfg.n_head, cfg.head_dim)  # (heads, 3, head_dim) rows
    return None if ours is None else (ours, tensor)  # multi-query: q heads, k, v rows already in our order


def skip(name: str, cfg: ModelConfig) -> bool:
    return cfg.tie_embeddings and name.removeprefix("transformer.") == "lm_head.weight"
