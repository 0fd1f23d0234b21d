"""Hugging Face ALiBi models (BLOOM, MPT, Falcon-ALiBi) from a local folder: parity with transformers.

Each model is a tiny random one built here from a transformers config (2 layers, hidden 48, heads 6
or 4, vocab 300), with weights drawn large enough that attention is far from uniform, saved with
``save_pretrained`` beside a tiny tokenizer.json. transformers' own forward is the reference.
Variants marked slow cover the remaining option combinations; the fast ones carry the non-default
options (6 heads, post-LN residual, alibi_bias_max 16 with clip_qkv and softmax_scale, multi-query
with parallel attention and no bias).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers")

from alibi_export import load  # noqa: E402
from alibi_export.export.onnx import export_onnx  # noqa: E402
from alibi_export.model import AlibiLM  # noqa: E402
from alibi_export.runtime.generate import GenerationSession  # noqa: E402
from alibi_export.runtime.onnxruntime import create_session  # noqa: E402
from tests.test_cli import assert_one_line_error, run_cli  # noqa: E402
from tests.test_export import assert_no_length_constants  # noqa: E402

LEN = 32  # every tiny model's own length (seq_length, max_seq_len, max_position_embeddings)
FP32_REL = 1e-5  # max |dlogit| / max |logit| in float32 (observed <= 7.6e-7 at 1x, <= 2.7e-6 at 16x)
SLOW = pytest.mark.slow

# variant -> (model_type, transformers config fields beyond the common ones)
VARIANTS = {
    "bloom-6h-postln": ("bloom", dict(n_head=6, apply_residual_connection_post_layernorm=True)),
    "mpt-6h-max16-clip-scale": ("mpt", dict(n_heads=6, attn_config=dict(alibi_bias_max=16, clip_qkv=2.0,
                                                                         softmax_scale=0.3))),
    "falcon-6h-mq-parallel-nobias": ("falcon", dict(num_attention_heads=6, multi_query=True, parallel_attn=True,
                                                    bias=False)),
    "bloom-4h": ("bloom", dict(n_head=4)),
    "mpt-4h": ("mpt", dict(n_heads=4)),
    # slopes 2^-2 ... 2^-32: two below fp16's smallest subnormal (2^-24); d_model 80 for 10 heads of 8
    "mpt-10h-max32": ("mpt", dict(n_heads=10, d_model=80, attn_config=dict(alibi_bias_max=32))),
    "falcon-4h-rw": ("falcon", dict(num_attention_heads=4, multi_query=False, parallel_attn=False, bias=True)),
}
FAST = ["bloom-6h-postln", "mpt-6h-max16-clip-scale", "falcon-6h-mq-parallel-nobias"]
ALL = [v if v in FAST else pytest.param(v, marks=SLOW) for v in VARIANTS]
# Flipping one of these fields must break parity: the negative control of each fast variant.
DISTINGUISHING = {"bloom-6h-postln": dict(residual_post_ln=False, activation="gelu"),
                  "mpt-6h-max16-clip-scale": dict(alibi_bias_max=8.0, clip_qkv=None, softmax_scale=None),
                  "falcon-6h-mq-parallel-nobias": dict(alibi_bf16=False, alibi_scaled=False)}


def _hf_config(kind: str, fields: dict):
    common = dict(vocab_size=300, eos_token_id=0, bos_token_id=0)
    if kind == "bloom":
        return transformers.BloomConfig(hidden_size=48, n_layer=2, seq_length=LEN, **common, **fields)
    if kind == "mpt":
        return transformers.MptConfig(**{"d_model": 48, "n_layers": 2, "max_seq_len": LEN, **common, **fields})
    return transformers.FalconConfig(hidden_size=48, num_hidden_layers=2, alibi=True, max_position_embeddings=LEN,
                                     **common, **fields)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights ~1.5/sqrt(fan_in), embeddings N(0, 1), LayerNorm gains 1 + N(0, 0.2), biases N(0, 0.2):
    scores span several units, so attention is far from uniform and every option moves the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 2:
                p.copy_(noise if "emb" in name or "wte" in name else noise * 1.5 / math.sqrt(p.shape[1]))
            else:
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)


class HfModel:
    """A tiny transformers model, its folder, and the alibi-export checkpoint loaded from it."""

    def __init__(self, variant: str, root, tokenizer):
        kind, fields = VARIANTS[variant]
        self.kind, self.folder = kind, root / variant
        cls = {"bloom": transformers.BloomForCausalLM, "mpt": transformers.MptForCausalLM,
               "falcon": transformers.FalconForCausalLM}[kind]
        self.hf = cls(_hf_config(kind, fields)).eval()
        _randomize(self.hf, seed=sum(map(ord, variant)))
        if kind == "mpt":
            _mpt_bias_max_as_configured(self.hf)
        self.hf.save_pretrained(self.folder)
        tokenizer.save(str(self.folder / "tokenizer.json"))
        self.ckpt = load(self.folder)
        self._exports = {}

    def logits(self, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """transformers' forward, fp32. transformers' MPT cannot run past max_seq_len (its bias is a
        (heads, 1, max_seq_len) tensor); its reference there is the same model with max_seq_len raised
        in its config, which ALiBi's slopes do not read."""
        saved = getattr(self.hf.config, "max_seq_len", None)
        if self.kind == "mpt":
            self.hf.config.max_seq_len = max(saved, ids.shape[1])
        try:
            with torch.no_grad():
                mask = None if attention_mask is None else torch.from_numpy(attention_mask)
                return self.hf(torch.from_numpy(ids), attention_mask=mask).logits.float().numpy()
        finally:
            if self.kind == "mpt":
                self.hf.config.max_seq_len = saved

    def export(self, name: str = "decomposed", **options):
        if name not in self._exports:
            self._exports[name] = export_onnx(self.ckpt, self.folder.parent / f"{self.folder.name}-{name}.onnx",
                                              **options).path
        return self._exports[name]


def _mpt_bias_max_as_configured(hf) -> None:
    """transformers' MptModel builds its bias with alibi_bias_max 8 whatever attn_config says; MosaicML's
    own code (and so the trained models) uses the configured value. The reference here calls transformers'
    own build_mpt_alibi_tensor with the configured value (the negative control shows the difference)."""
    from alibi_export.runtime.transformers_ref import configured_mpt_bias

    configured_mpt_bias(hf)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    root, built = tmp_path_factory.mktemp("hf"), {}

    def get(variant: str) -> HfModel:
        if variant not in built:
            built[variant] = HfModel(variant, root, tiny_tokenizer)
        return built[variant]

    return get


def _ids(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 300, shape)


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# ----------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("variant", ALL)
def test_ort_matches_transformers_at_1x_and_16x(models, variant):
    m = models(variant)
    assert m.ckpt.config.train_len == LEN
    session = create_session(m.export())
    for seed, length in ((1, LEN), (2, 16 * LEN)):
        ids = _ids(seed, (2, length))
        rel = _rel(session.run(None, {"input_ids": ids})[0], m.logits(ids))
        assert rel <= FP32_REL, f"{variant} at {length} tokens (seed {seed}): relative error {rel:.2e}"


@contextlib.contextmanager
def _float64_softmax():
    """transformers' BLOOM and MPT cast their scores to float32 for the softmax (``dtype=torch.float32``,
    ``.float()``) even in a ``.double()`` model, which costs ~1e-5 at 2048 tokens; this undoes both casts
    for float64 tensors only, so ``.double()`` computes the model wholly in float64 (the float64 truth)."""
    softmax, to_float = torch.nn.functional.softmax, torch.Tensor.float

    def softmax64(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)

    torch.nn.functional.softmax = softmax64
    torch.Tensor.float = lambda t, *a, **k: t if t.dtype == torch.float64 else to_float(t, *a, **k)
    try:
        yield
    finally:
        torch.nn.functional.softmax, torch.Tensor.float = softmax, to_float


def _absolute_position_bias(slopes, q_len, k_len, *, past_len=0, **_):
    """m_h * j (transformers' BLOOM/MPT form: softmax ignores the per-query m_h * i) in float32."""
    from alibi_export.alibi import alibi_bias

    rows = (torch.arange(q_len) + past_len).float()
    return alibi_bias(slopes, q_len, k_len, past_len=past_len) + slopes.float()[:, None, None] * rows[None, :, None]


def test_export_vs_float64_beats_transformers_fp32_at_2048(models, monkeypatch):
    """Against the float64 truth (the same transformers model in float64, softmax included) at 2048
    tokens (64x), the fp32 export meets the issue's 1e-5 and is at least 2x closer than transformers'
    own fp32 forward: the fp32-vs-fp32 bar is limited by transformers' rounding. Its bias is m_h * j
    (up to m_h * 2048 in float32 scores, ulp ~1e-4), ours m_h * (j - i) (small where the softmax weight
    is). Measured (seed 10): export 6.9e-7, transformers fp32 8.8e-6. Negative control: our PyTorch
    model with the bias as m_h * j has transformers' error (8.5e-6) and fails the 2x bound."""
    m = models(FAST[0])
    ids = _ids(10, (1, 2048))
    fp32 = m.logits(ids)
    try:
        with _float64_softmax():
            truth = m.hf.double()(torch.from_numpy(ids)).logits.detach().numpy()
    finally:
        m.hf.float()
    theirs = _rel(fp32, truth)
    ours = _rel(create_session(m.export()).run(None, {"input_ids": ids})[0], truth)
    assert ours <= FP32_REL and ours <= theirs / 2, f"export {ours:.2e}, transformers fp32 {theirs:.2e} (seed 10)"
    monkeypatch.setattr("alibi_export.model.alibi_bias", _absolute_position_bias)
    with torch.no_grad():
        control = _rel(m.ckpt.model(torch.from_numpy(ids)).numpy(), truth)
    assert control > theirs / 2, f"the m_h * j control ({control:.2e}) passes the bound: the test cannot tell"


@pytest.mark.parametrize("variant", FAST)
def test_negative_control_one_field_flipped_breaks_parity(models, variant):
    """The comparison is sensitive to every distinguishing option: flip one, parity is lost."""
    m = models(variant)
    ids = _ids(3, (1, 16 * LEN))
    for name, value in DISTINGUISHING[variant].items():
        broken = AlibiLM(dataclasses.replace(m.ckpt.config, **{name: value}))
        broken.load_state_dict(m.ckpt.model.state_dict())
        with torch.no_grad():
            rel = _rel(broken.eval()(torch.from_numpy(ids)).numpy(), m.logits(ids))
        # 10x the parity bar: the parity test would fail on this model (tanh GELU vs erf: 3.6e-4)
        assert rel > 10 * FP32_REL, f"{variant} with {name}={value!r} still matches (relative error {rel:.1e})"


def test_mpt_reference_without_the_configured_bias_max_differs(models):
    """Why the MPT reference is patched: transformers' own forward ignores alibi_bias_max 16."""
    m = models("mpt-6h-max16-clip-scale")
    ids = _ids(4, (1, LEN))
    patched = m.logits(ids)
    del m.hf.transformer.build_mpt_alibi_tensor  # back to the class method (bias max 8)
    try:
        assert _rel(m.logits(ids), patched) > 1e-3
    finally:
        _mpt_bias_max_as_configured(m.hf)


@pytest.mark.parametrize("variant", [FAST[2], pytest.param(FAST[0], marks=SLOW), pytest.param(FAST[1], marks=SLOW)])
def test_plugin_form_runs_its_function_body_in_ort(models, variant):
    m = models(variant)
    proto = onnx.load(m.export("plugin", attention="plugin"))
    nodes = [n for n in proto.graph.node if n.op_type == "AlibiAttention"]
    assert len(nodes) == 2
    if m.kind == "falcon":  # Falcon's bias is not m_h (j - i): the node says so, for a plugin to refuse
        assert {a.name: a.i for a in nodes[0].attribute if a.name == "bias_bf16"} == {"bias_bf16": 1}
    ids = _ids(5, (1, 16 * LEN))
    rel = _rel(create_session(m.export("plugin", attention="plugin")).run(None, {"input_ids": ids})[0],
               m.logits(ids))
    assert rel <= FP32_REL, f"{variant} plugin form: relative error {rel:.2e}"


@pytest.mark.parametrize("variant", [FAST[1], pytest.param(FAST[0], marks=SLOW), pytest.param(FAST[2], marks=SLOW)])
def test_fp16_export_at_16x(models, variant):
    """fp16 weights and I/O, the ALiBi term and softmax in float32 inside attention. These random models'
    logits reach |30|, where an fp16 ulp is 0.03, and every layer adds rounding: the claims are argmax
    agreement (> 99% of positions, as for the shipped model) and a cosine per position > 0.999."""
    m = models(variant)
    ids = _ids(6, (1, 16 * LEN))
    got = create_session(m.export("fp16", dtype="float16")).run(None, {"input_ids": ids})[0].astype(np.float32)
    ref = m.logits(ids)
    assert np.isfinite(got).all()
    agreement = (got.argmax(-1) == ref.argmax(-1)).mean()
    cosine = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert agreement > 0.99, f"argmax agreement {agreement:.4f}"
    assert cosine.min() > 0.999, f"min cosine {cosine.min():.6f}"


FP16_FORMS = {"decomposed": {}, "plugin": dict(attention="plugin"), "onnx": dict(attention="onnx"),
              "kv-cache": dict(kv_cache=True)}


@pytest.mark.parametrize("form", ["decomposed", pytest.param("plugin", marks=SLOW), "kv-cache",
                                  pytest.param("onnx", marks=pytest.mark.gpu)])  # fp16 onnx form: CUDA only
def test_fp16_keeps_alibi_when_slopes_underflow_fp16(models, form):
    """MPT with 10 heads and alibi_bias_max 32 has slopes down to 2^-32; fp16 rounds two of them to 0. The fp16
    export of every form must keep float32 slopes (a zero one would be that head's fact only) and match
    transformers' fp32 forward within the fp16 tolerance (validate.TOLERANCES), at 1x and 8x the training
    length (ONNX Runtime CPU; the onnx form's fp16 Attention op runs on CUDA only, TF32 off). Negative control: the same weights with every slope 0 (built here) must fail the same check,
    which is what the file matched when one underflowing slope switched ALiBi off for the whole graph."""
    from alibi_export.runtime.pytorch import TorchRunner
    from alibi_export.runtime.transformers_ref import TransformersRunner
    from alibi_export.validate import compare, compare_kv_cache

    m = models("mpt-10h-max32")
    slopes = m.ckpt.model.pos.head_slopes()
    assert slopes.dtype == torch.float32 and float(slopes.min()) == 2.0 ** -32
    assert int((slopes.half() == 0).sum()) == 2  # the case: fp16 cannot hold them
    path = m.export(f"fp16-{form}", dtype="float16", **FP16_FORMS[form])
    no_alibi = AlibiLM(m.ckpt.config)
    no_alibi.load_state_dict(m.ckpt.model.state_dict())
    no_alibi.pos.slopes.zero_()
    lengths = [LEN, 8 * LEN]
    if form == "kv-cache":  # prefill, then 8 single-token steps through the cache, against one forward
        real = compare_kv_cache(path, m.ckpt.model, lengths, batch=2, seed=11)
        control = compare_kv_cache(path, no_alibi.eval(), lengths, batch=2, seed=11)
    else:
        provider = "cuda" if form == "onnx" else "cpu"
        real = compare(path, TransformersRunner(m.folder, max_len=8 * LEN), lengths, batch=2, seed=11,
                       provider=provider)
        control = compare(path, TorchRunner(no_alibi), lengths, batch=2, seed=11, provider=provider)
    worst = max(r.max_abs for r in real.lengths)
    assert real, f"{form}: fp16 export vs transformers, max abs {worst:.3g} (tolerance {real.atol}, {real.rtol})"
    assert not control, f"{form}: the export matches the model without ALiBi ({control.lengths})"


@pytest.mark.parametrize("variant", FAST)
def test_no_tensor_depends_on_max_seq_len(models, variant):
    m = models(variant)
    proto = onnx.load(m.export())
    slopes = json.loads({p.key: p.value for p in proto.metadata_props}["alibi_export.slopes"])
    assert_no_length_constants(proto, m.ckpt.model, np.array(slopes, dtype=np.float32))


@pytest.mark.parametrize("variant", FAST)
def test_onnx_attention_form_matches_transformers(models, variant):
    """The onnx form (the standard Attention op with ALiBi folded into extra head dims) of each fast variant:
    multi-query with Falcon's bf16 bias, clip_qkv with softmax_scale, post-LN. ONNX Runtime CPU, fp32. The
    folded m*j is summed in float32 scores, whose rounding grows with the length; at these lengths it stays
    within the default form's bar (observed <= 7.6e-7 at 1x, <= 2.4e-6 at 16x)."""
    m = models(variant)
    session = create_session(m.export("onnx-form", attention="onnx"))
    for seed, length in ((1, LEN), (2, 16 * LEN)):
        ids = _ids(seed, (2, length))
        rel = _rel(session.run(None, {"input_ids": ids})[0], m.logits(ids))
        assert rel <= FP32_REL, f"{variant} onnx form at {length} tokens (seed {seed}): relative error {rel:.2e}"


@pytest.mark.parametrize("variant", FAST)
def test_tensorrt_rtx_builds_the_onnx_form(models, tmp_path, variant):
    """`alibi-export trt` builds each family's onnx-form export into a TensorRT-RTX engine on CPU. It is not
    run: TensorRT-RTX engines need an RTX-class GPU (the lead's GPU run covers execution)."""
    pytest.importorskip("tensorrt_rtx_libs", reason="needs TensorRT-RTX: pip install 'alibi-export[trt-rtx]'")
    from alibi_export.artifacts import read_sidecar
    from alibi_export.runtime.tensorrt import build_engine

    engine = tmp_path / f"{variant}.engine"
    r = build_engine(models(variant).export("onnx-form", attention="onnx"), engine, min_len=1, opt_len=LEN,
                     max_len=16 * LEN, backend="tensorrt-rtx")
    assert r.layer_types["ATTENTION_OUTPUT"] == 2 and engine.stat().st_size > 100_000, r.layer_types
    assert read_sidecar(engine).attention == "native attention"


# ----------------------------------------------------------------------------------------- generation
def _hf_greedy(m: HfModel, prompt: list[int], n: int) -> list[int]:
    hf = m.hf
    if m.kind == "mpt":  # see HfModel.logits
        hf.config.max_seq_len = len(prompt) + n
    try:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    finally:
        if m.kind == "mpt":
            hf.config.max_seq_len = LEN
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant", [FAST[2], pytest.param(FAST[0], marks=SLOW), pytest.param(FAST[1], marks=SLOW)])
def test_kv_cache_greedy_generation_equals_transformers_and_padding_is_invisible(models, variant):
    """32 greedy tokens from the KV-cache export (multi-query: the cache holds one head) equal
    transformers' generate; a left-padded batch gives each prompt the same tokens as alone."""
    m = models(variant)
    session = GenerationSession(m.export("kv", kv_cache=True))
    assert session.new_cache(1)[0].shape()[1] == m.ckpt.config.kv_heads
    prompts = [_ids(7, 9).tolist(), _ids(8, 3 * LEN).tolist(), _ids(9, 2).tolist()]
    alone = [session.generate_ids([p], 32, stop_tokens=[]).token_ids[0] for p in prompts]
    for prompt, got in zip(prompts[:2], alone):
        assert got == _hf_greedy(m, prompt, 32), f"{variant}: prompt of {len(prompt)} tokens"
    together = session.generate_ids(prompts, 32, stop_tokens=[])
    assert together.token_ids == alone
    assert session._stop_ids(None) == {0}  # the config's eos_token_id, not the tokenizer's <|endoftext|>


@pytest.mark.parametrize("variant", [FAST[0], pytest.param(FAST[1], marks=SLOW), pytest.param(FAST[2], marks=SLOW)])
def test_logits_to_keep_gives_the_last_positions_of_transformers(models, variant):
    """--logits-to-keep on each family's head (BLOOM's tied one, MPT's, multi-query Falcon's): 1 gives the last
    position's logits of transformers' forward, 0 every position's. Control: the last position is not the first."""
    m = models(variant)
    session = create_session(m.export("kv-keep", kv_cache=True, logits_to_keep=True))
    ids = _ids(11, (2, LEN))
    ref = m.logits(ids)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((2, i.shape[1], 0, i.shape[3]), np.float32)
    last = session.run(["logits"], {**feeds, "logits_to_keep": np.array(1)})[0]
    every = session.run(["logits"], {**feeds, "logits_to_keep": np.array(0)})[0]
    assert last.shape == (2, 1, ref.shape[-1]) and every.shape == ref.shape
    assert _rel(last, ref[:, -1:]) <= FP32_REL and _rel(every, ref) <= FP32_REL, variant
    assert _rel(last, ref[:, :1]) > 1e-2  # the control: a first-position slice would be told apart


# ----------------------------------------------------------------------------------------- validate --reference
@pytest.mark.parametrize("variant", [FAST[0], FAST[2]])
def test_cli_validate_against_transformers_passes_at_1x_and_16x(models, variant):
    """`validate --reference transformers`: transformers' own forward of the folder (AutoModelForCausalLM,
    local files only; Falcon through sdpa) on Polygraphy's comparison, fp32 tolerance (atol/rtol 1e-3)."""
    m = models(variant)
    proc = run_cli("validate", m.export(), "--model", m.folder, "--reference", "transformers",
                   "--lengths", f"{LEN},{16 * LEN}", "--seed", 11)
    assert proc.returncode == 0 and proc.stderr == "", proc.stdout + proc.stderr  # no loading bar in a pipe
    assert "parity PASS" in proc.stdout and "FAIL" not in proc.stdout, proc.stdout


def test_mpt_transformers_reference_runs_past_max_seq_len(models):
    """MPT in transformers cannot run past max_seq_len: the runner raises it to the longest length (the
    slopes do not read it) and applies the configured alibi_bias_max (16 here); the comparison path is
    validate.compare, as in the CLI."""
    from alibi_export.runtime.transformers_ref import TransformersRunner
    from alibi_export.validate import compare

    m = models(FAST[1])
    result = compare(m.export(), TransformersRunner(m.folder, max_len=16 * LEN), [LEN, 16 * LEN], seed=13)
    assert result, f"seed 13: {result.lengths}"


def test_falcon_transformers_reference_catches_a_doubled_bias(models, monkeypatch):
    """The Falcon reference passes, and the same comparison fails when the reference's ALiBi bias is doubled.

    The broken variant is built here: transformers' own ``build_alibi_tensor`` wrapped to return twice its
    bias (what eager Falcon did before transformers 5.25 fixed it; the control no longer relies on that bug)."""
    from transformers.models.falcon import modeling_falcon

    from alibi_export.runtime.transformers_ref import TransformersRunner
    from alibi_export.validate import compare

    m = models(FAST[2])
    assert compare(m.export(), TransformersRunner(m.folder, max_len=LEN), [LEN], seed=14)
    build = modeling_falcon.build_alibi_tensor  # fails here, loudly, if transformers renames it
    monkeypatch.setattr(modeling_falcon, "build_alibi_tensor", lambda *a, **k: 2 * build(*a, **k))
    assert not compare(m.export(), TransformersRunner(m.folder, max_len=LEN), [LEN], seed=14)


def test_cli_validate_against_transformers_fails_on_another_model(models):
    """Negative control: the Falcon export against the BLOOM folder (same vocabulary) fails with exit 1,
    the message naming the reference."""
    proc = run_cli("validate", models(FAST[2]).export(), "--model", models(FAST[0]).folder,
                   "--reference", "transformers", "--lengths", str(LEN), "--seed", 12)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "parity FAIL" in proc.stdout
    assert "differ from the transformers reference" in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_cli_validate_against_transformers_refuses_own_checkpoint(models, tiny_dir):
    proc = run_cli("validate", models(FAST[0]).export(), "--model", tiny_dir, "--reference", "transformers")
    assert_one_line_error(proc, "needs a Hugging Face model folder")


def test_transformers_reference_without_transformers_names_the_extra(models, monkeypatch):
    from alibi_export.errors import MissingDependencyError
    from alibi_export.runtime.transformers_ref import TransformersRunner

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(MissingDependencyError, match=r"alibi-export\[hf\]"):
        TransformersRunner(models(FAST[0]).folder, max_len=LEN)


# ----------------------------------------------------------------------------------------- formats
def test_sharded_and_legacy_bin_weights_load_the_same_model(models, tmp_path):
    m = models(FAST[2])
    sharded, legacy = tmp_path / "sharded", tmp_path / "legacy"
    m.hf.save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    shutil.copytree(m.folder, legacy, ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save(m.hf.state_dict(), legacy / "pytorch_model.bin")
    shutil.copy(m.folder / "tokenizer.json", sharded / "tokenizer.json")
    want = m.ckpt.model.state_dict()
    for folder in (sharded, legacy):
        got = load(folder).model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), folder.name


# ----------------------------------------------------------------------------------------- bad input
class _WritesSentinel:
    """Unpickling this would create a file: what a malicious pytorch_model.bin does."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _bad_folders(root, base):
    """name -> (folder, expected message); each a copy of ``base`` with one thing wrong."""
    def copy(name, edit=None, config=None):
        folder = root / name
        shutil.copytree(base, folder)
        if config is not None:
            data = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps(config(data)))
        if edit:
            edit(folder)
        return folder

    sentinel = root / "SENTINEL"

    def evil_bin(folder):
        for f in folder.glob("*.safetensors"):
            f.unlink()
        torch.save({"transformer.word_embeddings.weight": _WritesSentinel(sentinel)}, folder / "pytorch_model.bin")

    def falcon(data, **fields):
        return {**data, "model_type": "falcon", "alibi": True, **fields}

    return sentinel, {
        "no-config": (copy("no-config", lambda f: (f / "config.json").unlink()), "config.json is missing"),
        "unknown-type": (copy("unknown-type", config=lambda d: {**d, "model_type": "gpt2"}), "unsupported model_type"),
        "falcon-rotary": (copy("falcon-rotary", config=lambda d: falcon(d, alibi=False)), "not an ALiBi model"),
        "mpt-no-alibi": (copy("mpt-no-alibi", config=lambda d: {"model_type": "mpt", "d_model": 48, "n_heads": 6,
                                                               "n_layers": 2, "vocab_size": 300,
                                                               "attn_config": {"alibi": False}}),
                         "not an ALiBi model"),
        "new-decoder": (copy("new-decoder", config=lambda d: falcon(d, new_decoder_architecture=True)),
                        "new_decoder_architecture"),
        "mpt-qk-ln": (copy("mpt-qk-ln", config=lambda d: {"model_type": "mpt", "d_model": 48, "n_heads": 6,
                                                         "n_layers": 2, "vocab_size": 300,
                                                         "attn_config": {"qk_ln": True}}), "qk_ln"),
        "shape": (copy("shape", config=lambda d: {**d, "vocab_size": 301}), "word_embeddings.weight"),
        "missing-shard": (None, "is missing"),  # filled in by the test (a sharded save)
        "pickle": (copy("pickle", evil_bin), "refused to load"),
        "no-tokenizer": (copy("no-tokenizer", lambda f: (f / "tokenizer.json").unlink()), "no tokenizer.json"),
        "bad-tokenizer": (copy("bad-tokenizer", lambda f: (f / "tokenizer.json").write_text("{not json")),
                          "cannot read tokenizer.json"),
    }


@pytest.fixture(scope="module")
def bad_folders(models, tmp_path_factory):
    m = models(FAST[0])
    root = tmp_path_factory.mktemp("bad")
    sentinel, cases = _bad_folders(root, m.folder)
    sharded = root / "missing-shard"
    m.hf.save_pretrained(sharded, max_shard_size="20KB")
    shutil.copy(m.folder / "tokenizer.json", sharded / "tokenizer.json")
    sorted(sharded.glob("model-*.safetensors"))[1].unlink()
    cases["missing-shard"] = (sharded, cases["missing-shard"][1])
    return sentinel, cases


# Each case is a CLI subprocess (~5 s here): four run by default, the rest with the slow ones.
_BAD_FAST = ("pickle", "missing-shard", "falcon-rotary", "shape")
_BAD = ["no-config", "unknown-type", "falcon-rotary", "mpt-no-alibi", "new-decoder", "mpt-qk-ln", "shape",
        "missing-shard", "pickle", "no-tokenizer", "bad-tokenizer"]


@pytest.mark.parametrize("case", [c if c in _BAD_FAST else pytest.param(c, marks=SLOW) for c in _BAD])
def test_bad_input_gives_one_line_error_and_no_output(bad_folders, tmp_path, case):
    """Through the CLI: one line, exit != 0, nothing written; a .bin's pickle never runs."""
    sentinel, cases = bad_folders
    folder, match = cases[case]
    proc = run_cli("onnx", folder, "--dynamic-len", "-o", tmp_path / "x.onnx", cwd=tmp_path)
    assert_one_line_error(proc, match)
    assert not os.listdir(tmp_path), f"partial output {os.listdir(tmp_path)}"
    assert not sentinel.exists(), "the .bin's pickle ran"
