"""MPT (``model_type: mpt``): config.json -> ModelConfig, and its tensors renamed as they stream.

The math (transformers' modeling_mpt.py, MosaicML's attention.py for ``alibi_bias_max``): no
biases and LayerNorms without bias; exact (erf) GELU; ``Wqkv`` is q|k|v in order; ``clip_qkv``
clamps that projection; ``softmax_scale`` replaces 1/sqrt(d); MPT's own slope rule with
``alibi_bias_max`` (see alibi.mpt_alibi_slopes). transformers' MptModel builds its bias with the
default ``alibi_bias_max`` of 8 whatever the config says, and ignores ``no_bias``, ``qk_ln``,
``attn_type`` and ``logit_scale``: those it cannot verify are refused here; ``alibi_bias_max`` is
applied as MosaicML's own code applies it (the tests build transformers' reference the same way).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..model import ModelConfig
from ._options import field, not_alibi, refuse, refuse_unless
from .weights import rename

__all__ = ["config_from_hf", "convert", "skip"]

_NAMES = {"wte.weight": "wte.weight", "norm_f.weight": "ln_f.weight", "lm_head.weight": "lm_head.weight"}
_LAYER = {"norm_1.weight": "ln_1.weight", "attn.Wqkv.weight": "attn.qkv.weight",
          "attn.out_proj.weight": "attn.proj.weight", "norm_2.weight": "ln_2.weight",
          "ffn.up_proj.weight": "mlp.0.weight", "ffn.down_proj.weight": "mlp.2.weight"}


def _attn_options(attn: dict) -> dict:
    if not isinstance(attn, dict):
        raise ConfigError(f"config.json field 'attn_config' must be an object, got {attn!r}")
    if attn.get("alibi", True) is not True:
        not_alibi("mpt", "attn_config.alibi is false")
    for name in ("prefix_lm", "qk_ln", "attn_uses_sequence_id"):
        if attn.get(name):
            refuse(f"attn_config.{name}", attn[name], "false")
    refuse_unless(attn, "attn_type", ("multihead_attention",), "attn_config.")
    return dict(clip_qkv=field(attn, "clip_qkv", (int, float), None),
                softmax_scale=field(attn, "softmax_scale", (int, float), None),
                alibi_bias_max=float(field(attn, "alibi_bias_max", (int, float), 8)))


def config_from_hf(data: dict) -> ModelConfig:
    """Train length: ``max_seq_len`` (ALiBi's slopes never read it)."""
    options = _attn_options(data.get("attn_config") or {})
    if data.get("no_bias", True) is not True:
        refuse("no_bias", data["no_bias"], "true (transformers' MPT has no biases)")
    if data.get("logit_scale") is not None:
        refuse("logit_scale", data["logit_scale"], "null")
    refuse_unless(data, "norm_type", ("low_precision_layernorm", "layernorm"))
    ffn = data.get("ffn_config") or {}
    refuse_unless(ffn if isinstance(ffn, dict) else {"ffn_type": ffn}, "ffn_type", ("mptmlp",), "ffn_config.")
    d_model = field(data, "d_model", int)
    train_len = field(data, "max_seq_len", int, 2048)
    eos = data.get("eos_token_id")
    return ModelConfig(
        vocab_size=field(data, "vocab_size", int), n_layer=field(data, "n_layers", int),
        n_head=field(data, "n_heads", int), d_model=d_model, d_ff=field(data, "expansion_ratio", int, 4) * d_model,
        position="alibi", train_len=train_len, max_positions=train_len,
        layer_norm_eps=float(field(data, "layer_norm_epsilon", (int, float), 1e-5)),
        qkv_bias=False, proj_bias=False, mlp_bias=False, ln_bias=False, activation="gelu", alibi_rule="mpt",
        tie_embeddings=field(data, "tie_word_embeddings", bool, True),
        eos_token_id=eos[0] if isinstance(eos, list) and eos else eos, **options)


def convert(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> tuple[str, torch.Tensor] | None:
    ours = rename(name, _NAMES, "blocks", _LAYER)
    return None if ours is None else (ours, tensor)


def skip(name: str, cfg: ModelConfig) -> bool:
    return cfg.tie_embeddings and name.removeprefix("transformer.") == "lm_head.weight"
