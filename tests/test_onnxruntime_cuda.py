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
pytestmark = pytest.mark.skipif(not (HAS_CUDA_EP and torch.cuda.is_available()),
                                reason="needs a CUDA GPU and onnxruntime-gpu (CUDAExecutionProvider)")

TRAIN_LEN = 256
LENGTHS = [1, 300, 8 * TRAIN_LEN, 16 * TRAIN_LEN]  # 2048 and 4096: 8x and 16x the training length
# 1000 tokens: the attention function's whole-score path (past 0); the next 1000 (past 1000): its Loop over
# query chunks; then 48 single-token steps through the cache reach 2048 = 8x the training length.
PIECES = [1000, 1000] + [1] * 48


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
def kv_onnx(tmp_path_factory, shipped):
    return export_onnx(shipped, tmp_path_factory.mktemp("kv-cuda") / "kv.onnx", kv_cache=True).path


@pytest.fixture(scope="module")
def kv_onnx_fp16(tmp_path_factory, shipped):
    return export_onnx(shipped, tmp_path_factory.mktemp("kv16-cuda") / "kv16.onnx", kv_cache=True,
                       dtype="float16").path


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


def _incremental(session, ids, pieces):
    logits, cache = session.step_pieces(ids, pieces)
    assert all(v.device_name().lower() == "cuda" for v in cache)  # the cache never left the GPU
    return logits


def _torch_logits(model, ids):
    with torch.inference_mode():
        return model(torch.from_numpy(ids).cuda()).float().cpu().numpy()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_kv_cache_incremental_decoding_on_cuda_to_8x(request, shipped, torch_cuda, dtype):
    from alibi_export.runtime.generate import GenerationSession

    path = request.getfixturevalue("kv_onnx" if dtype == "float32" else "kv_onnx_fp16")
    session = GenerationSession(path, provider="cuda")
    _assert_on_cuda(session.session)
    assert session.device == "cuda"
    ids = np.random.default_rng(2).integers(0, shipped.config.vocab_size, (1, sum(PIECES)))
    incremental = _incremental(session, ids, PIECES)
    full = _incremental(session, ids, [ids.shape[1]])  # one forward, past length 0
    reference = _torch_logits(torch_cuda, ids)
    assert np.isfinite(incremental).all()
    if dtype == "float32":
        assert np.abs(incremental - full).max() < 1e-4, np.abs(incremental - full).max()
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


def test_greedy_generation_on_cuda_matches_pytorch(shipped, kv_onnx, torch_cuda):
    from alibi_export.runtime.generate import GenerationSession
    from tests.conftest import EXCERPT

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
