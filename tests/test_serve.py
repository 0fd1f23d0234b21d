"""The server: continuous batching equals each prompt alone, over a real process and the official openai client.

Engine tests run in process (the scheduler driven one iteration at a time, so joins and leaves happen at
chosen steps); the HTTP tests start `python -m alibi_export serve` on a free loopback port. Both use the
tiny KV-cache export of conftest. Greedy outputs are compared as token ids or text, exactly: batching
changes float32 logits by rounding only (~1e-6, tests/test_kv_cache.py), far below the tiny model's
argmax margins, and each control shows a real layout fault changes the tokens.
"""
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from alibi_export.runtime.generate import GenerationSession
from alibi_export.serve import batch_cache
from alibi_export.serve.engine import Engine, EngineConfig, Finished, RequestRejected, SamplingParams
from tests.conftest import ROOT

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

MODEL_ID = "alibi-small-kv"  # the served id: the export's file stem


@pytest.fixture(scope="module")
def kv_path(tmp_path_factory, shipped):
    """The shipped model as a KV-cache export: a trained model, whose tokens depend on what it attends
    (the tiny random model's greedy tokens hardly do, so a layout fault would go unseen there)."""
    from alibi_export.export.onnx import export_onnx

    return export_onnx(shipped, tmp_path_factory.mktemp("serve") / f"{MODEL_ID}.onnx", kv_cache=True).path


@pytest.fixture(scope="module")
def session(kv_path):
    return GenerationSession(kv_path)


def _prompts(rng, vocab, n, longest=100):
    return [rng.integers(0, vocab, int(k)).tolist() for k in rng.integers(1, longest, n)]


# ----------------------------------------------------------------------------- the engine, in process
class _Collector:
    def __init__(self):
        self.results, self.deltas = {}, {}

    def __call__(self, key):
        def on_event(event):
            if isinstance(event, Finished):
                self.results[key] = event
            else:
                self.deltas.setdefault(key, []).append(event.text)
        return on_event


def _run_schedule(engine, prompts, max_tokens, joins, params=None, budget=2000):
    """Submit prompt i before iteration joins[i]; iterate until all finish (bounded)."""
    got = _Collector()
    for it in range(budget):
        for i, (p, at) in enumerate(zip(prompts, joins)):
            if at == it:
                engine.submit(p, params[i] if params else SamplingParams(max_tokens=max_tokens[i], temperature=0),
                              got(i))
        if len(got.results) == len(prompts):
            return got
        engine.iterate()
    raise AssertionError(f"only {len(got.results)} of {len(prompts)} requests finished in {budget} iterations")


def _schedule(rng, session, n=12):
    prompts = _prompts(rng, session.config.vocab_size, n)
    max_tokens = rng.integers(1, 24, n).tolist()
    joins = np.sort(rng.integers(0, 30, n)).tolist()  # requests join while others run, and after some left
    return prompts, max_tokens, joins


def test_engine_batches_equal_each_prompt_alone(session, rng):
    prompts, max_tokens, joins = _schedule(rng, session)
    engine = Engine(session, EngineConfig(max_batch=6, prefill_chunk=16, max_context=256))
    got = _run_schedule(engine, prompts, max_tokens, joins)
    assert engine.steps < sum(max_tokens)  # requests were decoded together
    for i, p in enumerate(prompts):
        alone = session.generate_ids([p], max_tokens[i])
        assert got.results[i].text == alone.texts[0], i
        assert got.results[i].completion_tokens == len(alone.token_ids[0])
        assert "".join(got.deltas.get(i, [])) == got.results[i].text  # the stream adds up to the text
    assert engine.kv_tokens == 0 and engine.batch_size == 0 and engine.cache.values is None


def test_engine_with_unmasked_holes_differs(session, rng, monkeypatch):
    """Negative control: rows joined with their holes marked as real tokens (so attended, and counted in
    the ALiBi positions) give other tokens than each prompt alone."""
    prompts, max_tokens, joins = _schedule(rng, session)
    monkeypatch.setattr(batch_cache, "_pad_mask", lambda mask, width: np.concatenate(
        [np.ones((mask.shape[0], width - mask.shape[1]), dtype=np.int64), mask], axis=1))
    engine = Engine(session, EngineConfig(max_batch=6, prefill_chunk=16, max_context=256))
    got = _run_schedule(engine, prompts, max_tokens, joins)
    wrong = [i for i, p in enumerate(prompts) if got.results[i].text != session.generate_ids([p], max_tokens[i]).texts[0]]
    assert wrong


@pytest.mark.slow  # a second export of the shipped model (~25 s here)
def test_engine_onnx_form_fills_holes_with_padding_entries(tmp_path, shipped, rng):
    """The onnx attention form keeps the padding mark in its cached keys: holes filled with the model's
    own padding entries are invisible; zero-filled holes (the control) are attended."""
    from alibi_export.export.onnx import export_onnx

    op = GenerationSession(export_onnx(shipped, tmp_path / "op.onnx", kv_cache=True, attention="onnx").path)
    prompts, max_tokens, joins = _schedule(rng, op, n=8)
    alone = [op.generate_ids([p], m).texts[0] for p, m in zip(prompts, max_tokens)]
    got = _run_schedule(Engine(op, EngineConfig(max_batch=6, prefill_chunk=16)), prompts, max_tokens, joins)
    assert [got.results[i].text for i in range(len(prompts))] == alone
    zero = Engine(op, EngineConfig(max_batch=6, prefill_chunk=16))
    zero.cache.holes = [np.zeros_like(h) for h in zero.cache.holes]  # the control: holes a zero key fills
    got = _run_schedule(zero, prompts, max_tokens, joins)
    assert [got.results[i].text for i in range(len(prompts))] != alone


def test_seeded_sampling_is_the_same_whatever_else_is_in_the_batch(session, rng):
    vocab = session.config.vocab_size
    prompt = rng.integers(0, vocab, 20).tolist()
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    alone = session.generate_ids([prompt], 16, greedy=False, temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    others = _prompts(rng, vocab, 5)
    params = [SamplingParams(max_tokens=20, temperature=1.0, seed=i) for i in range(5)] + [seeded]
    for joins in ([0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 2], [5, 0, 9, 0, 1, 0]):
        got = _run_schedule(Engine(session, EngineConfig(max_batch=4, prefill_chunk=16)), others + [prompt],
                            None, joins, params=params)
        assert got.results[5].text == alone.texts[0]
    other_seed = _run_schedule(Engine(session), [prompt], None, [0], params=[SamplingParams(
        max_tokens=16, temperature=0.9, top_k=40, top_p=0.95, seed=1235)])
    assert other_seed.results[0].text != alone.texts[0]  # control: the seed does choose the tokens


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(session, rng):
    """A running stream gets a token every iteration while a 200-token prompt goes through 16 at a time."""
    vocab = session.config.vocab_size
    engine = Engine(session, EngineConfig(max_batch=4, prefill_chunk=16, max_context=256))
    got = _Collector()
    engine.submit(rng.integers(0, vocab, 5).tolist(), SamplingParams(max_tokens=40, temperature=0), got("short"))
    engine.iterate()  # the short prompt's prefill and its first decode step
    engine.submit(rng.integers(0, vocab, 200).tolist(), SamplingParams(max_tokens=10, temperature=0), got("long"))
    before = engine.running[0]
    counts = []
    for _ in range(13):  # 200 tokens in chunks of 16: 13 prefill passes
        engine.iterate()
        counts.append(len(before.stream.ids))
    assert np.diff(counts).tolist() == [1] * 12  # one token per iteration: stalled by one chunk at most
    assert len(engine.running) == 2 and "long" not in got.results


def test_kv_budget_waits_and_refuses(session, rng):
    vocab = session.config.vocab_size
    engine = Engine(session, EngineConfig(max_batch=4, max_tokens_in_flight=90, max_context=256))
    with pytest.raises(RequestRejected, match="KV-cache tokens") as e:
        engine.submit([1] * 60, SamplingParams(max_tokens=50), lambda ev: None)
    assert e.value.status == 400
    got = _Collector()
    engine.submit(rng.integers(0, vocab, 30).tolist(), SamplingParams(max_tokens=20, temperature=0), got(0))
    engine.submit(rng.integers(0, vocab, 10).tolist(), SamplingParams(max_tokens=10, temperature=0), got(1))
    engine.iterate()
    assert engine.batch_size == 1 and engine.queue_depth == 1  # 2 rows x 50 tokens would exceed 90: it waits
    assert engine.kv_tokens <= 90
    for _ in range(60):
        if len(got.results) == 2:
            break
        engine.iterate()
        assert engine.kv_tokens <= 90
    assert len(got.results) == 2


def test_engine_config_is_checked():
    with pytest.raises(Exception, match="max_batch must be a positive integer"):
        EngineConfig(max_batch=0)
