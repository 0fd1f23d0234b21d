"""The serving engine on CUDAExecutionProvider: the cache's joins and leaves run on the GPU (DeviceOps, and the
fixed slots' torch copies for a static-cache export) and change no result.

Skipped unless onnxruntime has CUDAExecutionProvider and torch sees a CUDA GPU (the GPU machine; CI has
neither). The CPU twins of these tests are in tests/test_serve.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime-gpu (CUDAExecutionProvider) and a CUDA GPU")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not ("CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()),
    reason="needs a CUDA GPU and onnxruntime-gpu (CUDAExecutionProvider)")]


@pytest.fixture(scope="module")
def onnx_form(tmp_path_factory, shipped):
    """The shipped model as the `onnx` attention form's KV-cache export (the GPU's form; its cached keys carry
    the padding mark, so the holes' filler matters), float32 and float16."""
    from alibi_export.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("serve-cuda")
    return {dtype: export_onnx(shipped, out / f"kv-{dtype}.onnx", kv_cache=True, attention="onnx",
                               dtype=dtype).path for dtype in ("float32", "float16")}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_device_ops_on_cuda_lay_the_cache_out_as_the_host_would(onnx_form, dtype, rng):
    """Copies only, so exact in any dtype; the control puts the holes on the right."""
    from onnxruntime import OrtValue

    from alibi_export.runtime.generate import GenerationSession
    from alibi_export.serve.batch_cache import DeviceOps

    session = GenerationSession(onnx_form[dtype], provider="cuda")
    ops, t = DeviceOps(session, 2), session.cache_dtype
    heads, d = session.config.kv_heads, session.cache_width
    gpu = lambda xs: [OrtValue.ortvalue_from_numpy(x, "cuda", 0) for x in xs]  # noqa: E731
    holes = [rng.standard_normal((1, heads, 1, d)).astype(t) for _ in range(2)]
    for wa, wb in ((5, 9), (9, 5)):  # the running rows narrower, then the joining ones
        a = [rng.standard_normal((3, heads, wa, d)).astype(t) for _ in range(2)]
        b = [rng.standard_normal((2, heads, wb, d)).astype(t) for _ in range(2)]
        merged = ops.merge(gpu(a), gpu(b), gpu(holes), 9)
        assert merged[0].device_name() == "cuda"
        for m, x, y, h in zip([v.numpy() for v in merged], a, b, holes):
            fill = lambda z: np.broadcast_to(h, (len(z), heads, 9 - z.shape[2], d))  # noqa: E731
            left = [np.concatenate([fill(z), z], axis=2) for z in (x, y)]
            assert np.array_equal(m, np.concatenate(left, axis=0))
            right = [np.concatenate([z, fill(z)], axis=2) for z in (x, y)]
            assert not np.array_equal(m, np.concatenate(right, axis=0))  # the control
    kept = ops.keep(merged, [4, 0, 2], 3)
    for k, m in zip(kept, merged):
        assert np.array_equal(k.numpy(), m.numpy()[[4, 0, 2]][:, :, 3:])
    logits = rng.standard_normal((2, 7, 11)).astype(t)
    last = ops.last_logits(OrtValue.ortvalue_from_numpy(logits, "cuda", 0))
    assert last.dtype == np.float32 and np.array_equal(last, logits[:, -1].astype(np.float32))


def test_engine_on_cuda_equals_each_prompt_alone(onnx_form, rng):
    """float32, TF32 off: requests joining and leaving at staggered iterations give each prompt's greedy text
    alone; zero-filled holes (the control) are attended and change it."""
    from alibi_export.runtime.generate import GenerationSession
    from alibi_export.serve.engine import Engine, EngineConfig

    session = GenerationSession(onnx_form["float32"], provider="cuda")
    n = 8
    prompts = [rng.integers(0, session.config.vocab_size, int(k)).tolist() for k in rng.integers(1, 100, n)]
    max_tokens = rng.integers(1, 24, n).tolist()
    joins = np.sort(rng.integers(0, 30, n)).tolist()
    alone = [session.generate_ids([p], m).texts[0] for p, m in zip(prompts, max_tokens)]
    engine = Engine(session, EngineConfig(max_batch=6, prefill_chunk=64))
    got = _run_schedule(engine, prompts, max_tokens, joins)
    assert [got[i].text for i in range(n)] == alone
    assert engine.steps < sum(max_tokens)  # decoded together
    zero = Engine(session, EngineConfig(max_batch=6, prefill_chunk=64))
    zero.cache.holes = [np.zeros_like(h) for h in zero.cache.holes]
    got = _run_schedule(zero, prompts, max_tokens, joins)
    assert [got[i].text for i in range(n)] != alone


def _run_schedule(engine, prompts, max_tokens, joins, budget=2000):
    """Submit prompt i (greedy) before iteration joins[i]; iterate until all finish: {i: Finished}."""
    from alibi_export.serve.engine import Finished, SamplingParams

    results = {}
    for it in range(budget):
        for i, (p, at) in enumerate(zip(prompts, joins)):
            if at == it:
                engine.submit(p, SamplingParams(max_tokens=max_tokens[i], temperature=0),
                              lambda event, i=i: isinstance(event, Finished) and results.__setitem__(i, event))
        if len(results) == len(prompts):
            return results
        engine.iterate()
    raise AssertionError(f"only {len(results)} of {len(prompts)} requests finished in {budget} iterations")


@pytest.fixture(scope="module")
def static_form(tmp_path_factory, shipped):
    """The shipped model as a --static-cache export in the folded form (--attention onnx, whose slots fill their
    masked columns with the padding entry on the GPU), float32 (exact comparisons). The default static form is
    refused on CUDA (tests/test_kv_buffer.py): its first prefill stopped inside onnxruntime-gpu 1.31.1."""
    from alibi_export.export.onnx import export_onnx

    return export_onnx(shipped, tmp_path_factory.mktemp("serve-cuda-static") / "kv-static-folded.onnx",
                       kv_cache=True, static_cache=256, attention="onnx").path


def test_slots_on_cuda_equal_each_prompt_alone(static_form, rng, monkeypatch):
    """Fixed slots on the GPU: the buffers are torch tensors on the device, bound by address, and the joins,
    moves and packs are torch copies synchronized before ONNX Runtime's next run. Slots of 124 columns force
    packs and moves; each greedy text equals the prompt alone through GenerationSession on CUDA. Control: a
    join copied one column off changes the tokens, and so do masked columns left unfilled.
    (ONNX Runtime 1.31 has no float32 GroupQueryAttention CUDA kernel, so it runs that node on the CPU with
    copies around it: this checks results, not speed.)"""
    from alibi_export.runtime.generate import GenerationSession
    from alibi_export.serve import slot_cache
    from alibi_export.serve.engine import Engine, EngineConfig

    session = GenerationSession(static_form, provider="cuda")
    n = 12  # as the CPU twin (tests/test_serve.py): 12 to 23 tokens each, so the rows fill 124 columns
    prompts = [rng.integers(0, session.config.vocab_size, int(k)).tolist() for k in rng.integers(1, 100, n)]
    max_tokens = rng.integers(12, 24, n).tolist()
    joins = np.sort(rng.integers(0, 30, n)).tolist()
    alone = [session.generate_ids([p], m).texts[0] for p, m in zip(prompts, max_tokens)]
    config = EngineConfig(max_batch=4, prefill_chunk=16, max_tokens_in_flight=4 * 124)
    engine = Engine(session, config)
    assert engine.cache.buffers[0].is_cuda
    got = _run_schedule(engine, prompts, max_tokens, joins)
    assert [got[i].text for i in range(n)] == alone
    assert engine.cache.packs > 0 and engine.cache.moves > 0 and engine.steps < sum(max_tokens)
    assert engine.cache.holes[0].is_cuda
    unfilled = Engine(session, config)
    unfilled.cache.holes = None
    got = _run_schedule(unfilled, prompts, max_tokens, joins)
    assert [got[i].text for i in range(n)] != alone
    monkeypatch.setattr(slot_cache, "_join_columns",
                        lambda width, k: slice(width - k, width) if k == width else slice(width - k - 1, width - 1))
    got = _run_schedule(Engine(session, config), prompts, max_tokens, joins)
    assert [got[i].text for i in range(n)] != alone


def test_prefill_in_decode_on_cuda_equals_each_prompt_alone(static_form, rng, monkeypatch):
    """serve --prefill-in-decode on the GPU: prompts join free slots with no columns and go through the decode steps
    one token a step (the joins fill the slots' masked columns with the padding entry on the device); every pass
    is a one-token step and each greedy text equals the prompt alone. Control: a variant that loses each joining
    prompt's first token changes the texts."""
    from alibi_export.runtime.generate import GenerationSession
    from alibi_export.serve.engine import Engine, EngineConfig
    from tests.conftest import losing_first_prompt_tokens

    session = GenerationSession(static_form, provider="cuda")
    n = 8
    prompts = [rng.integers(0, session.config.vocab_size, int(k)).tolist() for k in rng.integers(1, 60, n)]
    max_tokens = rng.integers(4, 20, n).tolist()
    joins = np.sort(rng.integers(0, 40, n)).tolist()
    alone = [session.generate_ids([p], m).texts[0] for p, m in zip(prompts, max_tokens)]
    config = EngineConfig(max_batch=4, max_context=256, prefill_in_decode=True)
    engine = Engine(session, config)
    assert engine.cache.buffers[0].is_cuda
    passes = []
    real = session.step
    monkeypatch.setattr(session, "step", lambda ids, *a, **k: passes.append(ids.shape[1]) or real(ids, *a, **k))
    got = _run_schedule(engine, prompts, max_tokens, joins)
    assert set(passes) == {1}  # only decode steps: no prefill pass
    assert [got[i].text for i in range(n)] == alone
    assert engine.batch_size == 0 and engine.cache.batch == 0

    wrong = _run_schedule(losing_first_prompt_tokens(Engine(session, config)), prompts, max_tokens, joins)
    assert [wrong[i].text for i in range(n)] != alone
