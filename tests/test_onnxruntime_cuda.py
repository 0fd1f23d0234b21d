"""ONNX Runtime on CUDAExecutionProvider (TF32 off): parity with PyTorch for the default, fp16 and KV-cache
exports, and generation through GenerationSession's IO-binding path with the cache kept on the GPU.

Skipped unless onnxruntime has CUDAExecutionProvider (onnxruntime-gpu) and torch sees a CUDA GPU. CI has
neither; these run on the GPU machine (see issue 5).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from alibi_export.export.onnx import export_onnx
from alibi_export.runtime.pytorch import TorchRunner
from alibi_export.validate import TOLERANCES, compare

ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime-gpu (CUDAExecutionProvider) and a CUDA GPU")
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (HAS_CUDA_EP and torch.cuda.is_available()),
                                                  reason="needs a CUDA GPU and onnxruntime-gpu (CUDAExecutionProvider)")]

TRAIN_LEN = 256
LENGTHS = [1, 300, 8 * TRAIN_LEN, 16 * TRAIN_LEN]  # 2048 and 4096: 8x and 16x the training length
# 1000 tokens: the attention function's whole-score path (past 0); the next 1000 (past 1000): its Loop over
# query chunks; then 48 single-token steps through the cache reach 2048 = 8x the training length.
PIECES = [1000, 1000] + [1] * 48
# KV-cache export forms: the default; the standard Attention op with ALiBi folded into extra head dims (the
# fused CUDA path); that with ONNX Runtime's fusions, the serving configuration the GPU benchmark times
KV_FORMS = {"decomposed": {}, "onnx": dict(attention="onnx"), "onnx-fused": dict(attention="onnx", ort_fusions=True)}


@pytest.fixture(scope="module", autouse=True)
def _cuda_libraries():
    """onnxruntime-gpu finds cuDNN/cuBLAS from the nvidia-* wheels that torch also uses."""
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # torch has loaded them already in most installs
            pass


@pytest.fixture(scope="module")
def torch_cuda(shipped):
    """The shipped model in float32 on the GPU, explicit (eager) attention: the reference."""
    return copy.deepcopy(shipped.model).cuda().eval().set_attention("eager")


@pytest.fixture(scope="module")
def kv_export(tmp_path_factory, shipped):
    """(form, dtype) -> that KV-cache export of the shipped model, made once per module."""
    made = {}

    def get(form: str, dtype: str = "float32"):
        if (form, dtype) not in made:
            out = tmp_path_factory.mktemp("kv") / f"kv-{form}-{dtype}.onnx"
            made[form, dtype] = export_onnx(shipped, out, kv_cache=True, dtype=dtype, **KV_FORMS[form]).path
        return made[form, dtype]

    return get


def _assert_on_cuda(session):
    assert session.get_providers()[0] == "CUDAExecutionProvider", session.get_providers()
    assert session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0"


def test_session_runs_on_cuda_without_tf32(shipped_onnx):
    from alibi_export.runtime.onnxruntime import create_session

    _assert_on_cuda(create_session(shipped_onnx, provider="cuda"))


def test_default_export_parity_on_cuda(shipped_onnx, torch_cuda):
    result = compare(shipped_onnx, TorchRunner(torch_cuda), LENGTHS, provider="cuda", seed=0)
    assert result, [(r.length, r.max_abs) for r in result.lengths]
    assert all(r.max_abs < 1e-3 and r.argmax_agreement == 1.0 for r in result.lengths), result.lengths


def test_fp16_export_parity_on_cuda(shipped_onnx_fp16, torch_cuda):
    """fp16 weights and I/O on the GPU against the float32 reference; tolerance TOLERANCES["float16"]."""
    result = compare(shipped_onnx_fp16, TorchRunner(torch_cuda), LENGTHS, provider="cuda", seed=1)
    assert result.atol == TOLERANCES["float16"]["atol"]
    assert result, [(r.length, r.max_abs) for r in result.lengths]
    assert all(r.argmax_agreement > 0.99 for r in result.lengths), result.lengths


@pytest.mark.parametrize("ort_fusions", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_onnx_attention_form_parity_on_cuda_to_64x(tmp_path, shipped, torch_cuda, dtype, ort_fusions):
    """The folded-ALiBi Attention op at 16,384 tokens (64x training), no KV cache, against float32 PyTorch;
    also with ONNX Runtime's fused LayerNorm tails."""
    path = export_onnx(shipped, tmp_path / "op.onnx", attention="onnx", dtype=dtype, ort_fusions=ort_fusions).path
    # fp32: the folded term m_h*j is summed into float32 scores, so their rounding grows with the length: an
    # ulp of m*L is 9.8e-4 at 16k tokens (m = 1/2). Observed on the H100: max |dlogit| 1.4e-3 at 4096 and
    # 7.0e-3 at 16384, within TOLERANCES["float32-folded"], which validate picks from the file's metadata.
    # fp16: TOLERANCES["float16"], as for every export.
    result = compare(path, TorchRunner(torch_cuda), LENGTHS + [64 * TRAIN_LEN], provider="cuda", seed=4)
    assert result.atol == (TOLERANCES["float32-folded"] if dtype == "float32" else TOLERANCES["float16"])["atol"]
    assert result, [(r.length, r.max_abs) for r in result.lengths]
    # near-ties within the error above flip the argmax: 2 of 16,384 positions in fp32 on the H100
    assert all(r.argmax_agreement > (0.999 if dtype == "float32" else 0.99) for r in result.lengths), result.lengths


def _incremental(session, ids, pieces):
    logits, cache = session.step_pieces(ids, pieces)
    assert all(v.device_name().lower() == "cuda" for v in cache)  # the cache never left the GPU
    return logits


def _torch_logits(model, ids):
    with torch.inference_mode():
        return model(torch.from_numpy(ids).cuda()).float().cpu().numpy()


@pytest.mark.parametrize("form", list(KV_FORMS))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_kv_cache_incremental_decoding_on_cuda_to_8x(kv_export, shipped, torch_cuda, dtype, form):
    from alibi_export.runtime.generate import GenerationSession

    path = kv_export(form, dtype)
    session = GenerationSession(path, provider="cuda")
    _assert_on_cuda(session.session)
    assert session.device == "cuda"
    ids = np.random.default_rng(2).integers(0, shipped.config.vocab_size, (1, sum(PIECES)))
    incremental = _incremental(session, ids, PIECES)
    full = _incremental(session, ids, [ids.shape[1]])  # one forward, past length 0
    reference = _torch_logits(torch_cuda, ids)
    assert np.isfinite(incremental).all()
    if dtype == "float32":
        # The onnx form sums m*j (up to ~1000 here) into the fp32 scores: an ulp of 1e-4 on top of the math's.
        assert np.abs(incremental - full).max() < (1e-4 if form == "decomposed" else 1e-3)
        assert np.abs(incremental - reference).max() < 1e-3, np.abs(incremental - reference).max()
        assert (incremental.argmax(-1) == reference.argmax(-1)).all()
    else:
        np.testing.assert_allclose(incremental, full, **TOLERANCES["float16"])
        np.testing.assert_allclose(incremental, reference, **TOLERANCES["float16"])
        assert (incremental.argmax(-1) == reference.argmax(-1)).mean() > 0.99


def _torch_greedy(model, prompt: list[int], n: int) -> list[int]:
    cfg, device = model.config, next(model.parameters()).device
    empty = [(torch.zeros(1, cfg.n_head, 0, cfg.head_dim, device=device),) * 2 for _ in range(cfg.n_layer)]
    out = []
    with torch.inference_mode():
        logits, cache = model(torch.tensor([prompt], device=device), past_key_values=empty)
        for _ in range(n):
            out.append(int(logits[0, -1].argmax()))
            logits, cache = model(torch.tensor([[out[-1]]], device=device), past_key_values=cache)
    return out


@pytest.mark.parametrize("form", list(KV_FORMS))
def test_greedy_generation_on_cuda_matches_pytorch(kv_export, shipped, torch_cuda, form):
    from alibi_export.runtime.generate import GenerationSession
    from tests.conftest import EXCERPT

    kv_onnx = kv_export(form)
    session = GenerationSession(kv_onnx, provider="cuda")
    rng = np.random.default_rng(3)
    text = EXCERPT.read_text()
    start = int(rng.integers(0, len(text) - 2000))
    prompts = [session.tokenizer.encode(text[start:start + 1500]).ids,  # real text
               rng.integers(0, shipped.config.vocab_size, 50).tolist()]  # random ids
    result = session.generate_ids(prompts, 32, stop_tokens=[])  # batched: left padding on the GPU too
    for prompt, got in zip(prompts, result.token_ids):
        assert got == _torch_greedy(shipped.model, prompt, 32)  # PyTorch on CPU, float32
        assert got == _torch_greedy(torch_cuda, prompt, 32)  # and on the GPU
    cpu = GenerationSession(kv_onnx, provider="cpu").generate_ids(prompts, 32, stop_tokens=[])
    assert cpu.token_ids == result.token_ids
    assert result.steps == 31 and result.tokens_per_s > 0
    texts = session.generate(["It was a dark night", "The old house"], 16, stop_tokens=[]).texts
    assert all(isinstance(t, str) and t for t in texts)


@pytest.mark.parametrize("form", list(KV_FORMS))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_right_padded_batch_with_a_hole_on_cuda(kv_export, shipped, dtype, form):
    """onnxruntime-genai's batch layout on the GPU: prompts padded on the right, six tokens after the padding
    through the cache; each row's logits are the row's alone (positions counted over real tokens)."""
    from alibi_export.runtime.generate import GenerationSession

    session = GenerationSession(kv_export(form, dtype), provider="cuda")
    rng = np.random.default_rng(4)
    lengths, new = (5, 700, 230), 6
    width, vocab = max(lengths), shipped.config.vocab_size
    rows = [rng.integers(0, vocab, n).tolist() for n in lengths]
    steps = rng.integers(0, vocab, (len(rows), new))
    ids, mask = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width + new), np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    mask[:, width:] = 1
    prefill, cache = session.step(ids, mask[:, :width], session.new_cache(len(rows)))
    after, _ = session.step(steps, mask, cache)
    for i, row in enumerate(rows):
        alone, _ = session.step(np.array([row + steps[i].tolist()]), np.ones((1, len(row) + new), np.int64),
                                session.new_cache(1))
        got = np.concatenate([prefill[i, len(row) - 1:len(row)], after[i]])
        want = alone[0, len(row) - 1:]
        if dtype == "float32":  # the onnx form's folded m*j (j up to ~700): 1e-3, as in the tests above
            assert np.abs(got - want).max() < (1e-4 if form == "decomposed" else 1e-3), np.abs(got - want).max()
        else:
            np.testing.assert_allclose(got, want, **TOLERANCES["float16"])
