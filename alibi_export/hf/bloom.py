"""BLOOM (``model_type: bloom``): config.json -> ModelConfig, and its tensors renamed as they stream.

The math (transformers' modeling_bloom.py): a LayerNorm on the word embeddings; the fused
``query_key_value`` laid out per head as (heads, 3, head_dim); tanh-approximate GELU; biases and
LayerNorm biases everywhere; the paper's slopes, the bias added after the 1/sqrt(d) scale; with
``apply_residual_connection_post_layernorm`` the residual taken from the LayerNorm output.
"""
from __future__ import annotations

import torch

from ..model import ModelConfig
from ._options import field
from .weights import rename, split_per_head_qkv

__all__ = ["config_from_hf", "convert", "skip", "DEFAULT_TRAIN_LEN"]

DEFAULT_TRAIN_LEN = 2048  # BLOOM was trained at 2048 tokens; configs rarely say so (seq_length)

_NAMES = {"word_embeddings.weight": "wte.weight", "word_embeddings_layernorm.weight": "ln_emb.weight",
          "word_embeddings_layernorm.bias": "ln_emb.bias", "ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias",
          "lm_head.weight": "lm_head.weight"}
_LAYER = {"input_layernorm.weight": "ln_1.weight", "input_layernorm.bias": "ln_1.bias",
          "self_attention.query_key_value.weight": "attn.qkv.weight",
          "self_attention.query_key_value.bias": "attn.qkv.bias",
          "self_attention.dense.weight": "attn.proj.weight", "self_attention.dense.bias": "attn.proj.bias",
          "post_attention_layernorm.weight": "ln_2.weight", "post_attention_layernorm.bias": "ln_2.bias",
          "mlp.dense_h_to_4h.weight": "mlp.0.weight", "mlp.dense_h_to_4h.bias": "mlp.0.bias",
          "mlp.dense_4h_to_h.weight": "mlp.2.weight", "mlp.dense_4h_to_h.bias": "mlp.2.bias"}


def config_from_hf(data: dict) -> ModelConfig:
    """``pretraining_tp`` and ``slow_but_exact`` only split the same products into slices: same math."""
    hidden = field(data, "hidden_size", int, None) or field(data, "n_embed", int)
    train_len = field(data, "seq_length", int, DEFAULT_TRAIN_LEN)
    eos = data.get("eos_token_id")
    return ModelConfig(
        vocab_size=field(data, "vocab_size", int), n_layer=field(data, "n_layer", int, None)
        or field(data, "num_hidden_layers", int), n_head=field(data, "n_head", int, None)
        or field(data, "num_attention_heads", int), d_model=hidden, d_ff=4 * hidden, position="alibi",
        train_len=train_len, max_positions=train_len,
        layer_norm_eps=float(field(data, "layer_norm_epsilon", (int, float), 1e-5)),
        activation="gelu_tanh", embed_layernorm=True,
        residual_post_ln=field(data, "apply_residual_connection_post_layernorm", bool, False),
        tie_embeddings=field(data, "tie_word_embeddings", bool, True),
        eos_token_id=eos[0] if isinstance(eos, list) and eos else eos)


def convert(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> tuple[str, torch.Tensor] | None:
    ours = rename(name, _NAMES, "h", _LAYER)
    if ours is not None and ours.split(".")[-2:-1] == ["qkv"]:  # (heads, 3, head_dim) rows
        tensor = split_per_head_qkv(name, tensor, cfg.n_head, cfg.head_dim)
    return None if ours is None else (ours, tensor)


def skip(name: str, cfg: ModelConfig) -> bool:
    """A tied head's stored copy is the embedding again."""
    return cfg.tie_embeddings and name.removeprefix("transformer.") == "lm_head.weight"
