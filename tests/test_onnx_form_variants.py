"""The onnx attention form (standard Attention op, ALiBi folded into extra head dims) for every variant
the Hugging Face families need: multi-query, no biases, MPT's slopes / softmax_scale / clip_qkv, Falcon's
scaled (bias before the softmax scale) and bf16 bias, parallel attention, BLOOM's embedding LayerNorm,
post-LN residual and tanh GELU. ONNX Runtime CPU, fp32, against the same model in PyTorch.

Tolerance: validate's ``float32-folded`` (atol 1e-2, rtol 1e-3), as for the shipped model in this form:
the folded m_h * j is summed in float32 scores whose rounding grows with the length. Each claim has a
negative control: the same export against a reference without the feature fails, so the feature is
really exercised (a form that ignored it would fail the positive check).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from alibi_export import AlibiLM, ModelConfig, load, save
from alibi_export.export.attention_op import extra_dims
from alibi_export.export.onnx import export_onnx
from alibi_export.runtime.generate import GenerationSession, _left_pad
from alibi_export.runtime.pytorch import TorchRunner
from alibi_export.validate import TOLERANCES, compare, compare_kv_cache

TRAIN_LEN = 32
LENGTHS = [7, 16 * TRAIN_LEN]  # 1 token past a chunk boundary, and 16x the training length
VARIANTS = {
    "multi-query": dict(n_kv_head=1),
    "no-bias": dict(qkv_bias=False, proj_bias=False, mlp_bias=False, ln_bias=False),
    # MPT: its slope rule with alibi_bias_max != 8, its own softmax scale, clip_qkv, no biases.
    "mpt": dict(alibi_rule="mpt", alibi_bias_max=16.0, softmax_scale=0.3, clip_qkv=0.6, qkv_bias=False,
                proj_bias=False, mlp_bias=False, ln_bias=False),
    # Falcon: bias added before the softmax scale, parallel attention, multi-query.
    "falcon-scaled-mqa": dict(alibi_scaled=True, parallel_attn=True, n_kv_head=1),
    # Falcon-RW's exact bias: bf16(m_h * j) from absolute key positions, scaled.
    "falcon-bf16": dict(alibi_scaled=True, alibi_bf16=True, parallel_attn=True),
    # ... with multi-query keys: the one key head carries every query head's bias column.
    "falcon-bf16-mqa": dict(alibi_scaled=True, alibi_bf16=True, parallel_attn=True, n_kv_head=1),
    "bloom": dict(embed_layernorm=True, residual_post_ln=True, activation="gelu_tanh"),
}


def _model(cfg_fields: dict) -> AlibiLM:
    """6 heads (not a power of two); weights wide enough that attention is far from uniform."""
    cfg = ModelConfig(vocab_size=300, n_layer=2, n_head=6, d_model=48, d_ff=96, train_len=TRAIN_LEN,
                      max_positions=TRAIN_LEN, **cfg_fields)
    torch.manual_seed(0)
    model = AlibiLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for name, fields in VARIANTS.items():
        save(_model(fields), tiny_tokenizer, root / name)
        out[name] = load(root / name)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp("variant-exports")
    return {name: export_onnx(ck, root / f"{name}.onnx", attention="onnx").path for name, ck in checkpoints.items()}


def _without(ck, **fields) -> AlibiLM:
    """The same weights in a model whose config lacks a feature: the negative controls' reference."""
    from dataclasses import replace

    model = AlibiLM(replace(ck.config, **fields))
    model.load_state_dict(ck.model.state_dict())
    return model.eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_onnx_form_matches_pytorch(checkpoints, exports, name):
    seed = 1234
    result = compare(exports[name], TorchRunner(checkpoints[name].model), LENGTHS, seed=seed)
    assert (result.atol, result.rtol) == (TOLERANCES["float32-folded"]["atol"], TOLERANCES["float32-folded"]["rtol"])
    assert result, (name, seed, [(r.length, r.max_abs, r.max_rel) for r in result.lengths])


@pytest.mark.parametrize("name,missing", [
    ("mpt", dict(clip_qkv=None)),  # the clip is applied (to the projections)
    ("mpt", dict(softmax_scale=None)),
    ("mpt", dict(alibi_rule="paper", alibi_bias_max=8.0)),
    ("falcon-scaled-mqa", dict(alibi_scaled=False)),
    ("falcon-bf16", dict(alibi_bf16=False)),  # the bf16 rounding, not just the scaled slopes
    ("falcon-bf16-mqa", dict(alibi_bf16=False)),
])
def test_negative_control_reference_without_the_feature_fails(checkpoints, exports, name, missing):
    result = compare(exports[name], TorchRunner(_without(checkpoints[name], **missing)), [16 * TRAIN_LEN], seed=1234)
    assert not result, (name, missing, [(r.length, r.max_abs) for r in result.lengths])


def test_negative_control_clipping_the_alibi_columns_fails(checkpoints, tmp_path, monkeypatch):
    """clip_qkv must not reach the appended ALiBi columns (key positions reach 255, query columns m*256)."""
    import alibi_export.export.attention_op as op

    real = op._clip_bounds

    def clip_everything(cfg, H, KV, dtype):
        return tuple(torch.where(torch.isinf(b), b.new_tensor(cfg.clip_qkv), b) for b in real(cfg, H, KV, dtype))

    monkeypatch.setattr(op, "_clip_bounds", clip_everything)
    ck = checkpoints["mpt"]
    path = export_onnx(ck, tmp_path / "broken.onnx", attention="onnx").path
    assert not compare(path, TorchRunner(ck.model), [16 * TRAIN_LEN], seed=1234)


@pytest.mark.parametrize("name", ["falcon-scaled-mqa", "falcon-bf16-mqa"])
def test_onnx_form_kv_cache_decodes_like_one_forward(checkpoints, tmp_path, name):
    """Prefill then 8 single-token steps through the cache (one head for multi-query, head_dim + extra_dims wide)."""
    ck = checkpoints[name]
    path = export_onnx(ck, tmp_path / "kv.onnx", attention="onnx", kv_cache=True).path
    session = GenerationSession(path)
    assert session.cache_width == ck.config.head_dim + extra_dims(ck.config)
    result = compare_kv_cache(path, ck.model, [40, 16 * TRAIN_LEN], seed=7)
    assert result, (name, [(r.length, r.max_abs) for r in result.lengths])
    # A left-padded batch equals each prompt alone (Falcon's bf16 positions count from the first real token).
    rng = np.random.default_rng(7)
    rows = [rng.integers(0, 300, n).tolist() for n in (5, 40, 23)]
    ids, mask = _left_pad(rows)
    batched, _ = session.step(ids, mask, session.new_cache(len(rows)))
    for i, row in enumerate(rows):
        alone, _ = session.step(np.array([row]), np.ones((1, len(row)), np.int64), session.new_cache(1))
        # float32, 2 layers, logits |x| < 30: a few float32 roundings of the same sums in another order.
        assert np.abs(batched[i, ids.shape[1] - len(row):] - alone[0]).max() < 1e-4, (name, i)


def test_wide_bf16_multi_query_cache_width():
    """n_head bias columns + the padding column, rounded up to a multiple of 8; 8 for every other config."""
    from dataclasses import replace

    cfg = _model(VARIANTS["falcon-bf16-mqa"]).config
    assert extra_dims(cfg) == 8 and extra_dims(replace(cfg, n_head=12)) == 16
    assert extra_dims(replace(cfg, n_head=12, n_kv_head=None)) == 8  # one bias column per key head


@pytest.mark.parametrize("name", ["bloom", "mpt", "falcon-scaled-mqa", "falcon-bf16-mqa"])
def test_tensorrt_rtx_builds_each_variant(exports, tmp_path, name):
    """`alibi-export trt` on each variant's onnx form: TensorRT-RTX builds engines on CPU (it cannot run
    them here: its engines need an RTX-class GPU). One native attention layer per block."""
    pytest.importorskip("tensorrt_rtx_libs", reason="needs TensorRT-RTX: pip install 'alibi-export[trt-rtx]'")
    from alibi_export.artifacts import read_sidecar
    from alibi_export.runtime.tensorrt import build_engine

    engine = tmp_path / f"{name}.engine"
    r = build_engine(exports[name], engine, min_len=1, opt_len=TRAIN_LEN, max_len=16 * TRAIN_LEN,
                     backend="tensorrt-rtx")
    assert engine.stat().st_size > 100_000 and r.layer_types["ATTENTION_OUTPUT"] == 2, r.layer_types
    assert read_sidecar(engine).attention == "native attention"
