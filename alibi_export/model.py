"""A small decoder-only transformer LM whose position method is one swappable strategy.

Read top to bottom in the order data flows: config, position methods, attention, block, LM.
ALiBi is the point of the project; ``sinusoidal``, ``rotary``, ``learned`` and ``t5`` are the
paper's comparison set, kept so that extrapolation can be measured against them.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .alibi import SLOPE_RULES, alibi_bias, alibi_bias_bf16, slopes_for, token_positions
from .errors import ConfigError

__all__ = ["ModelConfig", "AlibiLM", "POSITION_METHODS", "ATTENTION_IMPLS", "key_padding_mask", "KEY_MASK_VALUE",
           "parameter_count", "PAPER_EMBED_SCALE", "default_embed_scale", "embed_scale_of"]

log = logging.getLogger(__name__)

POSITION_METHODS = ("alibi", "sinusoidal", "rotary", "learned", "t5")
ATTENTION_IMPLS = ("auto", "eager", "sdpa", "triton")
ACTIVATIONS = ("gelu", "gelu_tanh")
# The paper's (fairseq's) recipe for ModelConfig.embed_scale: token embeddings times sqrt(d_model).
PAPER_EMBED_SCALE = "sqrt-d"


def default_embed_scale(position: str) -> str | float:
    """What a new `train` run uses: the paper's recipe where unit-amplitude position vectors are added to the
    token embeddings (sinusoidal: without it the positions outweigh the tokens ~35 to 1), 1 elsewhere. On an
    H200 (issue 22) the fairseq embeddings that fix sinusoidal cost ALiBi 75.9 against 60.0 test perplexity,
    so the others keep the recipe they were measured with; tools/fair_baselines.py trains one shared recipe
    (written into its JSON) and an ALiBi x 1 control."""
    return PAPER_EMBED_SCALE if position == "sinusoidal" else 1.0


def embed_scale_of(recipe: str | float, d_model: int) -> float:
    """``PAPER_EMBED_SCALE`` -> sqrt(d_model); a number (1: the recipe of models trained before the field) -> itself."""
    if recipe == PAPER_EMBED_SCALE:
        return math.sqrt(d_model)
    try:
        value = float(recipe)
    except (TypeError, ValueError):
        raise ConfigError(f"embed scale must be {PAPER_EMBED_SCALE!r} or a positive number, got {recipe!r}") from None
    if not 0 < value < math.inf:
        raise ConfigError(f"embed scale must be {PAPER_EMBED_SCALE!r} or a positive number, got {recipe!r}")
    return value


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 8
    d_model: int = 256
    d_ff: int = 768
    position: str = "alibi"
    train_len: int = 256
    max_positions: int = 256  # only the `learned` method has a maximum length
    t5_num_buckets: int = 32
    t5_max_distance: int = 128
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    # The fields below describe the Hugging Face ALiBi families (BLOOM, MPT, Falcon); their defaults are
    # this project's own architecture, so configs written before they existed load unchanged.
    n_kv_head: int | None = None  # None: n_head; 1: multi-query attention (Falcon's multi_query)
    qkv_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    ln_bias: bool = True
    activation: str = "gelu"  # "gelu" (erf) or "gelu_tanh" (BLOOM's and GPT-2's tanh approximation)
    embed_layernorm: bool = False  # BLOOM's word_embeddings_layernorm
    residual_post_ln: bool = False  # BLOOM's apply_residual_connection_post_layernorm
    parallel_attn: bool = False  # Falcon: x + attn(ln(x)) + mlp(ln(x)), one LayerNorm per block
    clip_qkv: float | None = None  # MPT: clamp the fused q, k, v projection to [-clip_qkv, clip_qkv]
    softmax_scale: float | None = None  # MPT: the q.k scale; None: 1/sqrt(head_dim)
    alibi_rule: str = "paper"  # "paper" (BLOOM, Falcon) or "mpt"; see alibi.slopes_for
    alibi_bias_max: float = 8.0  # MPT's alibi_bias_max; the paper's rule is 8
    alibi_scaled: bool = False  # Falcon: the bias is added before the softmax scale, so it is scaled too
    alibi_bf16: bool = False  # Falcon: the bias is bf16(m * j) from absolute key positions; see alibi_bias_bf16
    tie_embeddings: bool = True  # False: a separate lm_head weight
    eos_token_id: int | None = None  # generation stops here (None: the tokenizer's <|endoftext|>)
    # The factor on the token embeddings before the position method adds its vectors. 1 (the default) is
    # what every config written before this field existed computes, the shipped models included; `train`
    # writes sqrt(d_model), the paper's (fairseq's) recipe, for sinusoidal models (default_embed_scale): their
    # unit-amplitude position vectors otherwise outweigh N(0, 0.02) token embeddings ~35 to 1 after the first
    # LayerNorm.
    embed_scale: float = 1.0

    def __post_init__(self):
        if self.position not in POSITION_METHODS:
            raise ConfigError(f"unknown position method {self.position!r}. Note: expected one of {POSITION_METHODS}")
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "train_len", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.position == "rotary" and (self.d_model // self.n_head) % 2:
            raise ConfigError("rotary needs an even head dimension")
        self._check_variants()

    def _check_variants(self):
        """The Hugging Face fields: each value in range, and no two that contradict each other."""
        if self.n_kv_head not in (None, 1, self.n_head):
            raise ConfigError(f"n_kv_head must be 1 (multi-query) or n_head ({self.n_head}), got {self.n_kv_head!r}. "
                              "Note: grouped-query attention is not implemented")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}. Note: expected one of {ACTIVATIONS}")
        if self.alibi_rule not in SLOPE_RULES:
            raise ConfigError(f"unknown alibi_rule {self.alibi_rule!r}. Note: expected one of {SLOPE_RULES}")
        for name in ("clip_qkv", "softmax_scale", "alibi_bias_max", "embed_scale"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or
                                      not 0 < value < math.inf):
                raise ConfigError(f"config field {name!r} must be a positive number, got {value!r}")
        if self.alibi_rule == "paper" and self.alibi_bias_max != 8:
            raise ConfigError(f"alibi_bias_max {self.alibi_bias_max} needs alibi_rule 'mpt'. Note: the paper's "
                              "slopes have a maximum of 8")
        alibi_fields = [n for n, default in (("alibi_rule", "paper"), ("alibi_bias_max", 8.0), ("alibi_scaled", False),
                                             ("alibi_bf16", False)) if getattr(self, n) != default]
        if alibi_fields and self.position != "alibi":
            raise ConfigError(f"{alibi_fields[0]} applies to ALiBi only, but position is {self.position!r}")
        if self.parallel_attn and self.residual_post_ln:
            raise ConfigError("parallel_attn and residual_post_ln contradict each other. Note: a parallel block "
                              "has no post-attention LayerNorm")
        if self.eos_token_id is not None and not (isinstance(self.eos_token_id, int) and
                                                  0 <= self.eos_token_id < self.vocab_size):
            raise ConfigError(f"eos_token_id must be a token id below vocab_size {self.vocab_size}, "
                              f"got {self.eos_token_id!r}")

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_head, or 1 for multi-query attention."""
        return self.n_kv_head or self.n_head

    @property
    def attn_scale(self) -> float:
        """The factor on q.k (and, with alibi_scaled, on the ALiBi bias)."""
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}. Note: expected a subset of {sorted(known)}")
        return cls(**data)


# ----------------------------------------------------------------------------- position methods
class PositionMethod(nn.Module):
    """Identity strategy: each hook returns its input unchanged, subclasses override one."""

    # Whether the fused kernel (and the TensorRT plugin) can compute the bias from head_slopes() alone.
    fused_kernel_ok = True

    def __init__(self, cfg: "ModelConfig"):
        super().__init__()

    def head_slopes(self) -> torch.Tensor | None:
        """(H,) ALiBi slopes, or None: what a fused kernel needs instead of a dense bias."""
        return None

    def embed(self, x: torch.Tensor, past_len: int) -> torch.Tensor:
        return x

    def rotate(self, q: torch.Tensor, k: torch.Tensor, past_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def bias(self, q_len: int, k_len: int, past_len: int, key_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Additive (H, q_len, k_len) bias including the causal mask, or None for plain causal.

        ``key_mask`` (B, 1, 1, k_len), see :func:`key_padding_mask`, is for methods whose bias depends on
        each row's padding (ALiBi counts positions over real tokens); they return (B, H, q_len, k_len)."""
        return None


class Alibi(PositionMethod):
    """m_h (j - i), slopes by the config's rule; Falcon's variant scales it and rounds it in bfloat16."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        slopes = torch.tensor(slopes_for(cfg.alibi_rule, cfg.n_head, cfg.alibi_bias_max), dtype=torch.float32)
        self.register_buffer("slopes", slopes, persistent=False)
        # Falcon adds the bias before the softmax scale: (qk + b) * s, i.e. effective slopes m_h * s.
        self.bias_scale = cfg.attn_scale if cfg.alibi_scaled else 1.0
        self.bf16 = cfg.alibi_bf16
        self.fused_kernel_ok = not self.bf16

    def _apply(self, fn, recurse=True):
        """Moves the slopes to the module's new device but keeps them float32 whatever its dtype: MPT's
        slopes reach 2^-32 (alibi_bias_max 32), below fp16's smallest subnormal, so ``.half()`` would
        round a head's slope to 0 and silently drop its bias (the bias is computed in float32 anyway)."""
        slopes = self.slopes
        super()._apply(fn, recurse)
        self.slopes = slopes.to(device=self.slopes.device, dtype=torch.float32)
        return self

    def head_slopes(self):
        """Effective slopes (the bias scale folded in); None for the bf16 form, which no kernel implements."""
        if self.bf16:
            return None
        return self.slopes if self.bias_scale == 1.0 else self.slopes * self.bias_scale

    def bias(self, q_len, k_len, past_len, key_mask=None):
        # A padded batch: each row's tokens sit at their positions among its real tokens (token_positions).
        positions = None if key_mask is None else token_positions(key_mask[:, 0, 0, :] >= 0)  # (B, k)
        if not self.bf16:
            return alibi_bias(self.head_slopes(), q_len, k_len, past_len=past_len, positions=positions)
        k_pos = torch.arange(k_len, device=self.slopes.device)
        q_pos = torch.arange(q_len, device=self.slopes.device) + past_len
        future = k_pos[None, :] > q_pos[:, None]  # (q, k)
        bias = alibi_bias_bf16(self.slopes, k_pos if positions is None else positions) * self.bias_scale
        return bias.masked_fill(future, float("-inf"))  # (H, q, k) or (B, H, q, k)


class Sinusoidal(PositionMethod):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        inv_freq = torch.exp(torch.arange(0, cfg.d_model, 2) * (-math.log(10000.0) / cfg.d_model))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def embed(self, x, past_len):
        pos = torch.arange(x.shape[1], device=x.device, dtype=torch.float32) + past_len
        angles = pos[:, None] * self.inv_freq[None, :]  # (L, d/2)
        pe = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)  # (L, d), sin/cos interleaved
        return x + pe.to(x.dtype)


class Learned(PositionMethod):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.d_model)

    def embed(self, x, past_len):
        end = past_len + x.shape[1]
        if not torch.compiler.is_compiling() and end > self.wpe.num_embeddings:
            raise ValueError(
                f"learned positions stop at {self.wpe.num_embeddings} tokens, got {end}. "
                "Note: only alibi, rotary, t5 and sinusoidal models run past their maximum length"
            )
        return x + self.wpe(torch.arange(past_len, end, device=x.device))


class Rotary(PositionMethod):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        d = cfg.head_dim
        self.register_buffer("inv_freq", 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d)), persistent=False)

    def rotate(self, q, k, past_len):
        k_pos = torch.arange(k.shape[2], device=k.device, dtype=torch.float32)
        angles = k_pos[:, None] * self.inv_freq[None, :]  # (Lk, D/2)
        cos, sin = torch.cat((angles.cos(),) * 2, -1), torch.cat((angles.sin(),) * 2, -1)  # (Lk, D)

        def apply(x, c, s):
            x1, x2 = x.chunk(2, dim=-1)
            return (x * c + torch.cat((-x2, x1), dim=-1) * s).to(x.dtype)

        q_len = q.shape[2]
        return apply(q, cos[-q_len:], sin[-q_len:]), apply(k, cos, sin)


class T5Bias(PositionMethod):
    """Learned bias per head and per bucket of the (causal) relative distance, shared by all layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.num_buckets, self.max_distance = cfg.t5_num_buckets, cfg.t5_max_distance
        self.rel_bias = nn.Embedding(self.num_buckets, cfg.n_head)

    fused_kernel_ok = False  # a learned bias per bucket, not a function of slopes

    def _bucket(self, distance: torch.Tensor) -> torch.Tensor:
        # distance = i - j >= 0; half the buckets are exact, the rest log-spaced up to max_distance.
        exact = self.num_buckets // 2
        log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(self.max_distance / exact)
        large = (exact + log_ratio * (self.num_buckets - exact)).long().clamp(max=self.num_buckets - 1)
        return torch.where(distance < exact, distance, large)

    def bias(self, q_len, k_len, past_len, key_mask=None):
        q_pos = torch.arange(q_len, device=self.rel_bias.weight.device) + past_len
        k_pos = torch.arange(k_len, device=self.rel_bias.weight.device)
        distance = q_pos[:, None] - k_pos[None, :]  # (q, k)
        values = self.rel_bias(self._bucket(distance.clamp(min=0))).permute(2, 0, 1)  # (H, q, k)
        return values.masked_fill(distance[None] < 0, float("-inf"))


_POSITION_CLASSES = {"alibi": Alibi, "sinusoidal": Sinusoidal, "rotary": Rotary, "learned": Learned, "t5": T5Bias}


# ----------------------------------------------------------------------------- attention
# Above this many score elements (H x q x k) the eager and SDPA paths run query chunk by query chunk,
# so that a 16k-token forward on CPU holds O(L) rather than O(L^2) floats; later keys are skipped.
CHUNK_SCORES = 1 << 26
# Additive value for padded keys: finite, so that a query row whose keys are all padding (left padding)
# still softmaxes to finite numbers instead of NaN, and large enough to outweigh any ALiBi term (m*L).
KEY_MASK_VALUE = -1e9


def key_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, Lk) 1/0 -> additive float32 (B, 1, 1, Lk): 0 for real keys, KEY_MASK_VALUE for padding."""
    return ((1 - attention_mask.to(torch.float32)) * KEY_MASK_VALUE)[:, None, None, :]


def _chunked(attend):
    def wrapper(q, k, v, pos, past_len, key_mask=None):
        heads, q_len, k_len = q.shape[1], q.shape[2], k.shape[2]
        if not isinstance(q_len, int) or heads * q_len * k_len <= CHUNK_SCORES:
            return attend(q, k, v, pos, past_len, key_mask)
        step = max(1, CHUNK_SCORES // (heads * k_len))
        outs = []
        for start in range(0, q_len, step):
            end = min(start + step, q_len)
            kend = k_len - q_len + end  # the last key the chunk's last query may see
            mask = None if key_mask is None else key_mask[..., :kend]
            outs.append(attend(q[:, :, start:end], k[:, :, :kend], v[:, :, :kend], pos, past_len + start, mask))
        return torch.cat(outs, dim=2)  # (B, H, q_len, D)

    wrapper.__name__ = attend.__name__
    return wrapper


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, 1, L, D) multi-query keys or values -> (B, heads, L, D) views, for kernels that do not broadcast."""
    return t if t.shape[1] == heads else t.expand(t.shape[0], heads, *t.shape[2:])


@_chunked
def attend_eager(q, k, v, pos: PositionMethod, past_len: int, key_mask: torch.Tensor | None = None):
    """The explicit math: the reference every other implementation is tested against.

    ``key_mask``: optional additive float (B, 1, 1, Lk) from :func:`key_padding_mask`. Multi-query
    keys and values (B, 1, Lk, D) broadcast over the query heads in both products."""
    q_len, k_len = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])  # (B, H, q, k)
    bias = pos.bias(q_len, k_len, past_len, key_mask)
    if bias is None:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
        scores = scores.masked_fill(~causal, float("-inf"))
    else:
        scores = scores + bias.float()  # the bias is not scaled by 1/sqrt(d)
    if key_mask is not None:
        scores = scores + key_mask.float()
    return (scores.softmax(-1).to(v.dtype)) @ v


@_chunked
def attend_sdpa(q, k, v, pos: PositionMethod, past_len: int, key_mask: torch.Tensor | None = None):
    """PyTorch's fastest portable path: a fused kernel with the bias passed as a float mask."""
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    bias = pos.bias(q.shape[2], k.shape[2], past_len, key_mask)
    if key_mask is not None:
        if bias is None:
            bias = alibi_bias(torch.zeros(1, device=q.device), q.shape[2], k.shape[2], past_len=past_len)
        # Summed in float32, then kept finite in q's dtype: -1e9 is -inf in fp16, and an all -inf row is NaN.
        mask = (bias.float() + key_mask.float()).clamp(min=torch.finfo(q.dtype).min)  # (B, H, q, k)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
    if bias is None and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if bias is None:
        visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
        bias = torch.zeros(visible.shape, device=q.device).masked_fill(~visible, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


def attend_triton(q, k, v, pos: PositionMethod, past_len: int, key_mask: torch.Tensor | None = None):
    """The fused kernel computes the ALiBi term from the slopes; it never builds an L x L bias.

    It has no key mask: padded batches take SDPA."""
    if (key_mask is not None or not pos.fused_kernel_ok or q.device.type != "cuda"
            or q.dtype not in (torch.float16, torch.bfloat16)):
        return attend_sdpa(q, k, v, pos, past_len, key_mask)
    from .kernels import alibi_attention

    slopes = pos.head_slopes()
    if slopes is None:  # absolute or rotary positions: plain causal attention is ALiBi with zero slopes
        slopes = torch.zeros(q.shape[1], device=q.device)
    return alibi_attention(q, k, v, slopes, causal=True, past_len=past_len)  # multi-query k, v as they are


def attend_auto(q, k, v, pos: PositionMethod, past_len: int, key_mask: torch.Tensor | None = None):
    """The default: the fused kernel on CUDA in fp16/bf16 when Triton is there, SDPA otherwise.

    The kernel has a backward, so training on CUDA (under bf16 autocast) runs it too. The model has
    no attention dropout (``dropout`` acts on the embeddings and residual branches), so training
    with dropout > 0 runs the kernel as well. Training inputs the kernel cannot take (fp32, another
    head size, a GPU before sm_80, no Triton) fall back to SDPA and say so once."""
    if key_mask is None and q.is_cuda and pos.fused_kernel_ok:
        why_not = _fused_unsupported(q)
        if why_not is None:
            return attend_triton(q, k, v, pos, past_len)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            _warn_once(f"training attention falls back to SDPA with a materialized bias: the fused "
                       f"ALiBi kernel does not support {why_not}")
    return attend_sdpa(q, k, v, pos, past_len, key_mask)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def _fused_unsupported(q: torch.Tensor) -> str | None:
    """Why the fused kernel cannot run these CUDA inputs, or None when it can."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (it runs float16 and bfloat16: train under autocast)"
    if q.shape[-1] not in (16, 32, 64, 128):
        return f"head_dim {q.shape[-1]} (it runs 16, 32, 64, 128)"
    major, minor = torch.cuda.get_device_capability(q.device)
    if major < 8:
        return f"{torch.cuda.get_device_name(q.device)} (sm_{major}{minor}; it needs sm_80 or newer)"
    from .kernels import triton_available

    if not triton_available():
        return "this install (triton is not importable: pip install triton)"
    return None


_ATTEND = {"auto": attend_auto, "eager": attend_eager, "sdpa": attend_sdpa, "triton": attend_triton}


class CausalSelfAttention(nn.Module):
    """One fused q|k|v projection (q: n_head heads, k and v: kv_heads), attention, output projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * self.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.proj_bias)
        self.clip_qkv = cfg.clip_qkv
        # Every attend scales q.k by 1/sqrt(head_dim); a model with its own scale (MPT's softmax_scale)
        # rescales the queries once instead, so the attends (and the exported nodes) keep one form.
        self.q_gain = None if cfg.softmax_scale is None else cfg.softmax_scale * math.sqrt(cfg.head_dim)
        self.attend = attend_auto  # swapped by AlibiLM.set_attention and, during export, by the exporter

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, L, n_head * head_dim), k and v (B, L, kv_heads * head_dim): clipped (MPT) and q rescaled to the
        1/sqrt(head_dim) every attend applies. Exporters that own the whole block (a fused op) start here too."""
        C, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        qkv = self.qkv(x)  # (B, L, C + 2 kv)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        # slices, not split(): opset 17's Split has no num_outputs attribute
        q, k, v = qkv[..., :C], qkv[..., C:C + kv], qkv[..., C + kv:]
        return (q if self.q_gain is None else q * self.q_gain), k, v

    def forward(self, x, pos: PositionMethod, past: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_mask: torch.Tensor | None = None):
        if getattr(self.attend, "owns_block", False):
            # An exporter's attention that takes the whole block: its own projections and cache (ONNX Attention).
            return self.attend(self, x, pos, past, key_mask)
        B, L, C = x.shape
        q, k, v = self.project(x)
        q = q.view(B, L, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k, v = (t.view(B, L, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))  # (B, Hkv, L, D)
        past_len = 0
        if past is not None:
            past_len = past[0].shape[2]
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)  # (B, Hkv, past+L, D)
        present = (k, v)
        q, k = pos.rotate(q, k, past_len)
        # Only padded batches pass a key mask, so attends without that parameter keep working.
        y = self.attend(q, k, v, pos, past_len) if key_mask is None else self.attend(q, k, v, pos, past_len, key_mask)
        return self.proj(y.transpose(1, 2).reshape(B, L, C)), present


def _layer_norm(cfg: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.ln_bias)


class Block(nn.Module):
    """Pre-LayerNorm block; BLOOM's residual from the LayerNorm output and Falcon's parallel form as options."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = _layer_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = None if cfg.parallel_attn else _layer_norm(cfg)  # a parallel block has one LayerNorm
        act = nn.GELU(approximate="tanh" if cfg.activation == "gelu_tanh" else "none")
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias), act,
                                 nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias))
        self.drop = nn.Dropout(cfg.dropout)
        self.residual_post_ln = cfg.residual_post_ln

    def forward(self, x, pos, past=None, key_mask=None):
        h = self.ln_1(x)
        a, present = self.attn(h, pos, past, key_mask)
        if self.ln_2 is None:  # Falcon's parallel attention: both branches read ln_1(x)
            return x + (self.drop(self.mlp(h)) + self.drop(a)), present
        x = (h if self.residual_post_ln else x) + self.drop(a)
        h = self.ln_2(x)
        return (h if self.residual_post_ln else x) + self.drop(self.mlp(h)), present


class AlibiLM(nn.Module):
    """Pre-LayerNorm decoder-only LM, with tied input/output embeddings unless the config says otherwise."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.ln_emb = _layer_norm(cfg) if cfg.embed_layernorm else None  # BLOOM's word_embeddings_layernorm
        self.pos = _POSITION_CLASSES[cfg.position](cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = _layer_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):  # GPT-2's residual scaling
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_attention(self, impl: str) -> "AlibiLM":
        if impl not in _ATTEND:
            raise ValueError(f"unknown attention implementation {impl!r}. Note: expected one of {ATTENTION_IMPLS}")
        for block in self.blocks:
            block.attn.attend = _ATTEND[impl]
        return self

    def forward(self, input_ids: torch.Tensor, past_key_values=None, attention_mask: torch.Tensor | None = None, *,
                past_len: int | torch.SymInt | None = None):
        """Logits (B, L, V); with ``past_key_values`` (one (k, v) per layer) also the new cache.

        ``attention_mask`` (B, past_len + L), 1 for real tokens and 0 for padding, masks padded keys, and
        ALiBi counts each row's positions over its real tokens only (``alibi.token_positions``). So a
        padded row gives the same logits as the row alone, whether padded on the left or on the right
        with its generated tokens after the padding (onnxruntime-genai's batches); absolute position
        methods do not have that property. ``past_len``: the cached length, where the cache tensors are
        preallocated buffers longer than it (the static-cache export, export.kv_buffer); default their length."""
        if past_len is None:
            past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if self.training and self.config.dropout > 0 and input_ids.is_cuda:
            _warn_once(f"dropout {self.config.dropout:g} acts on the embeddings and residual branches only: "
                       "attention probabilities get no dropout, and training attention stays on the fused kernel")
        key_mask = None
        if attention_mask is not None:
            if not torch.compiler.is_compiling() and tuple(attention_mask.shape) != (input_ids.shape[0],
                                                                                     past_len + input_ids.shape[1]):
                raise ValueError(f"attention_mask must have shape (batch, past + sequence) = ({input_ids.shape[0]}, "
                                 f"{past_len + input_ids.shape[1]}), got {tuple(attention_mask.shape)}")
            key_mask = key_padding_mask(attention_mask)  # (B, 1, 1, past + L)
        x = self.wte(input_ids)  # (B, L, d)
        if self.config.embed_scale != 1.0:  # no extra node in the graphs of models trained without it
            x = x * self.config.embed_scale
        x = self.pos.embed(x, past_len)
        if self.ln_emb is not None:
            x = self.ln_emb(x)
        x = self.drop(x)
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, self.pos, None if past_key_values is None else past_key_values[i], key_mask)
            presents.append(present)
        head = self.wte.weight if self.lm_head is None else self.lm_head.weight
        logits = self.ln_f(x) @ head.T  # (B, L, V)
        return logits if past_key_values is None else (logits, presents)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def parameter_count(config: ModelConfig) -> int:
    """The number of parameters a model of ``config`` has, computed from meta models of one and two layers
    (no memory, and no time that grows with a hostile n_layer)."""
    def count(n_layer: int) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in AlibiLM(ModelConfig.from_dict({**config.to_dict(), "n_layer": n_layer}))
                       .parameters())

    one, two = count(1), count(2)
    return one + (config.n_layer - 1) * (two - one)
