"""The server: continuous batching equals each prompt alone, over a real process and the official openai client.

Engine tests run in process (the scheduler driven one iteration at a time, so joins and leaves happen at
chosen steps); the HTTP tests start `python -m alibi_export serve` on a free loopback port. Both use the
shipped model's KV-cache export (fp32), a trained model whose tokens depend on what it attends. Greedy
outputs are compared exactly (as text, which decodes the token ids): batching and chunked prefill change
float32 logits by rounding only (~1e-5, tests/test_kv_cache.py), below the argmax margins met here, and
each control shows that a real layout fault changes the tokens.
"""
import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from alibi_export.errors import AlibiExportError, ConfigError
from alibi_export.runtime.generate import GenerationSession
from alibi_export.serve import batch_cache
from alibi_export.serve.engine import Engine, EngineConfig, Finished, RequestRejected, SamplingParams
from tests.conftest import ROOT, losing_first_prompt_tokens

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

MODEL_ID = "alibi-small-kv"  # the served id: the export's file stem


@pytest.fixture(scope="module")
def kv_path(tmp_path_factory, shipped):
    """The shipped model as a KV-cache export: a trained model, whose tokens depend on what it attends
    (the tiny random model's greedy tokens hardly do, so a layout fault would go unseen there). With
    --logits-to-keep, as `serve` exports it: its prefills compute the last position's logits only (the
    static forms below are without it, so the engine runs both kinds of file)."""
    from alibi_export.export.onnx import export_onnx

    return export_onnx(shipped, tmp_path_factory.mktemp("serve") / f"{MODEL_ID}.onnx", kv_cache=True,
                       logits_to_keep=True).path


@pytest.fixture(scope="module")
def session(kv_path):
    return GenerationSession(kv_path)


STATIC_LMAX = 320  # the static export's buffer length: room for every schedule below (prompts < 250 + 40)


@pytest.fixture(scope="module")
def static_path(tmp_path_factory, shipped):
    """The same model as a --static-cache export, which the engine serves from fixed cache slots."""
    from alibi_export.export.onnx import export_onnx

    return export_onnx(shipped, tmp_path_factory.mktemp("serve-static") / f"{MODEL_ID}.onnx", kv_cache=True,
                       static_cache=STATIC_LMAX).path


@pytest.fixture(scope="module")
def static_session(static_path):
    return GenerationSession(static_path)


@pytest.fixture(scope="module")
def folded_session(tmp_path_factory, shipped):
    """The folded static form (--static-cache --attention onnx: the ALiBi term and the padding mark in extra
    cache columns, no attention bias; the form ONNX Runtime CUDA runs in float16), also served from slots."""
    from alibi_export.export.onnx import export_onnx

    return GenerationSession(export_onnx(shipped, tmp_path_factory.mktemp("serve-folded") / f"{MODEL_ID}.onnx",
                                         kv_cache=True, static_cache=STATIC_LMAX, attention="onnx").path)


FORMS = {"concat": "session", "static": "static_session", "folded": "folded_session"}


@pytest.fixture(params=list(FORMS))
def form_session(request):
    """Each engine test runs on every export form: the concatenated cache (BatchCache) and the two static forms'
    fixed slots (SlotCache)."""
    return request.getfixturevalue(FORMS[request.param])


@pytest.fixture(params=["static", "folded"])
def slot_session(request):
    """The static forms, which the engine serves from fixed slots."""
    return request.getfixturevalue(FORMS[request.param])


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


def test_engine_batches_equal_each_prompt_alone(form_session, rng):
    session = form_session
    prompts, max_tokens, joins = _schedule(rng, session)
    engine = Engine(session, EngineConfig(max_batch=6, prefill_chunk=16, max_context=256))
    got = _run_schedule(engine, prompts, max_tokens, joins)
    assert engine.steps < sum(max_tokens)  # requests were decoded together
    for i, p in enumerate(prompts):
        alone = session.generate_ids([p], max_tokens[i])
        assert got.results[i].text == alone.texts[0], i
        assert got.results[i].completion_tokens == len(alone.token_ids[0])
        assert "".join(got.deltas.get(i, [])) == got.results[i].text  # the stream adds up to the text
    assert engine.kv_tokens == 0 and engine.batch_size == 0 and engine.cache.batch == 0


def test_prefill_in_decode_equals_each_prompt_alone(slot_session, rng, monkeypatch):
    """serve --prefill-in-decode: prompts go through the decode steps one token a step, beside running rows, and
    every greedy text still equals the prompt alone, and every forward pass is a one-token step (no prefill pass
    pauses the running rows). Control: a variant that feeds each prompt from its second token (the first token
    lost, as a join one column off would) changes the texts."""
    session = slot_session
    prompts, max_tokens, joins = _schedule(rng, session, n=8)
    config = EngineConfig(max_batch=4, max_context=256, prefill_in_decode=True)
    engine = Engine(session, config)
    passes = []
    real = session.step
    monkeypatch.setattr(session, "step", lambda ids, *a, **k: passes.append(ids.shape[1]) or real(ids, *a, **k))
    got = _run_schedule(engine, prompts, max_tokens, joins)
    assert set(passes) == {1}  # only decode steps: no prefill pass
    for i, p in enumerate(prompts):
        alone = session.generate_ids([p], max_tokens[i])
        assert got.results[i].text == alone.texts[0], i
        assert got.results[i].completion_tokens == len(alone.token_ids[0])
    assert engine.batch_size == 0 and engine.cache.batch == 0

    wrong = _run_schedule(losing_first_prompt_tokens(Engine(session, config)), prompts, max_tokens, joins)
    assert [wrong.results[i].text for i in range(len(prompts))] != [got.results[i].text for i in range(len(prompts))]


def _admissions(engine):
    """Each prefill job the engine admits: (running rows, requests admitted, decode steps since the last job)."""
    log, real, last = [], engine._admit, [0]

    def admit():
        running, job = len(engine.running), real()
        if job is not None:
            log.append((running, len(job.requests), engine.steps - last[0]))
            last[0] = engine.steps
        return job
    engine._admit = admit
    return log


@pytest.mark.parametrize("ratio,wait", [(1.0, None), (1.0, 6), (0.7, None)])
def test_waiting_served_ratio_holds_prefill_passes_back_while_rows_run(form_session, rng, ratio, wait):
    """serve --waiting-served-ratio R: while rows run, a prefill pass (a stall in each of them) starts only when it
    admits at least floor(R x running) requests, or (--max-waiting-steps N) at least N decode steps after the
    previous one; every greedy text still equals the prompt alone. Control: the default (R 0) on the same schedule
    stalls running rows for fewer requests than that, and so does the wait bound, which must come into play."""
    session = form_session
    n = 10
    prompts = _prompts(rng, session.config.vocab_size, n, longest=40)
    # Distinct lengths, and half the prompts there at the start: when the first of the 4 rows finishes, 3 run
    # and some wait, where the default admits one (the control's stall); the others join while rows run.
    max_tokens = rng.permutation(np.arange(4, 24))[:n].tolist()
    joins = sorted([0] * (n // 2) + rng.integers(0, 20, n - n // 2).tolist())
    config = dict(max_batch=4, prefill_chunk=256, max_context=256, max_tokens_in_flight=4 * 256)
    engine = Engine(session, EngineConfig(**config, waiting_served_ratio=ratio, max_waiting_steps=wait))
    log = _admissions(engine)
    got = _run_schedule(engine, prompts, max_tokens, joins)
    for i, p in enumerate(prompts):
        assert got.results[i].text == session.generate_ids([p], max_tokens[i]).texts[0], i

    def short(entries):  # passes that stalled running rows for fewer requests than the ratio asks
        return [e for e in entries if e[0] and e[1] < int(e[0] * ratio)]
    if wait is None:
        assert not short(log), log
    else:
        assert short(log) and all(since >= wait for _, _, since in short(log)), log
    default = Engine(session, EngineConfig(**config))
    default_log = _admissions(default)
    _run_schedule(default, prompts, max_tokens, joins)
    assert short(default_log), "the control stalls no more than R allows"


def test_prefill_in_decode_refuses_a_concatenating_export(session):
    with pytest.raises(AlibiExportError, match="needs fixed cache slots"):
        Engine(session, EngineConfig(prefill_in_decode=True))


def test_engine_with_a_rolling_window_equals_each_prompt_alone_under_it(kv_path, session, rng):
    """serve --kv-window: each request's greedy text equals GenerationSession(kv_window=W) on its prompt alone,
    for prompts shorter and longer than W and generations that cross it, with rows joining and leaving and
    the cache cut every few steps (slack 3). Control: without the window the texts differ, so the window
    is what the equality is about."""
    W = 24
    windowed = GenerationSession(kv_path, kv_window=W)
    prompts = _prompts(rng, session.config.vocab_size, 6, longest=60)
    max_tokens = rng.integers(20, 40, 6).tolist()
    joins = np.sort(rng.integers(0, 20, 6)).tolist()
    engine = Engine(session, EngineConfig(max_batch=4, prefill_chunk=16, max_context=256, kv_window=W,
                                          window_slack=3))
    got = _run_schedule(engine, prompts, max_tokens, joins)
    alone = [windowed.generate_ids([p], m).texts[0] for p, m in zip(prompts, max_tokens)]
    assert [got.results[i].text for i in range(len(prompts))] == alone
    assert max(len(p) for p in prompts) > W and engine.kv_tokens == 0
    full = [session.generate_ids([p], m).texts[0] for p, m in zip(prompts, max_tokens)]
    assert full != alone  # control


def test_engine_with_unmasked_holes_differs(session, rng, monkeypatch):
    """Negative control: rows joined with their holes marked as real tokens (so attended, and counted in
    the ALiBi positions) give other tokens than each prompt alone."""
    prompts, max_tokens, joins = _schedule(rng, session)
    monkeypatch.setattr(batch_cache, "_pad_mask", lambda mask, width: np.concatenate(
        [np.ones((mask.shape[0], width - mask.shape[1]), dtype=np.int64), mask], axis=1))
    engine = Engine(session, EngineConfig(max_batch=6, prefill_chunk=16, max_context=256))
    got = _run_schedule(engine, prompts, max_tokens, joins)
    alone = [session.generate_ids([p], m).texts[0] for p, m in zip(prompts, max_tokens)]
    assert [got.results[i].text for i in range(len(prompts))] != alone


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


def test_seeded_sampling_is_the_same_whatever_else_is_in_the_batch(form_session, rng):
    session = form_session
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


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(form_session, rng):
    """A running stream gets a token every iteration while a 200-token prompt goes through 16 at a time."""
    session = form_session
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


@pytest.mark.parametrize("chunk, passes", [(None, [64, 64, 22]), (256, [150])])  # 256: the control
def test_unset_prefill_chunk_is_the_devices_default(session, rng, monkeypatch, chunk, passes):
    """On the CPU an unset --prefill-chunk is 64 tokens a pass (PREFILL_CHUNK: a pass is a stall in every running
    stream); a chunk set by the caller is kept. The passes are counted at the session: a 150-token prompt alone."""
    widths, real = [], session.step

    def step(ids, *a, **k):
        widths.append(ids.shape[1])
        return real(ids, *a, **k)

    monkeypatch.setattr(session, "step", step)
    engine = Engine(session, EngineConfig(max_batch=2, prefill_chunk=chunk))
    widths.clear()  # the engine's own start-up pass (the padding entry the cache layout writes into holes)
    got = _Collector()
    engine.submit(rng.integers(0, session.config.vocab_size, 150).tolist(),
                  SamplingParams(max_tokens=1, temperature=0), got(0))
    while 0 not in got.results:
        engine.iterate()
    assert engine.prefill_chunk == (chunk or 64)
    assert widths == passes  # max_tokens 1: the prefill's own token ends it, no decode step


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


def test_a_failed_forward_pass_fails_its_requests_and_the_engine_goes_on(form_session, rng, monkeypatch):
    session = form_session
    engine = Engine(session, EngineConfig(max_batch=4))
    got = _Collector()
    real = session.step
    monkeypatch.setattr(session, "step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost")))
    engine.submit([1, 2, 3], SamplingParams(max_tokens=4, temperature=0), got("failed"))
    engine.start()
    try:
        for _ in range(100):
            if "failed" in got.results:
                break
            time.sleep(0.05)
        assert got.results["failed"].reason == "error" and "device lost" in got.results["failed"].error
        monkeypatch.setattr(session, "step", real)
        engine.submit([1, 2, 3], SamplingParams(max_tokens=4, temperature=0), got("next"))
        for _ in range(200):
            if "next" in got.results:
                break
            time.sleep(0.05)
        assert got.results["next"].reason in ("length", "stop") and got.results["next"].completion_tokens >= 1
        assert engine.batch_size == 0 and engine.kv_tokens == 0
    finally:
        assert engine.stop(timeout=10)


def test_device_ops_lay_the_cache_out_as_the_host_would(session, rng):
    """The graphs that join and leave rows on the session's device give exactly the host's layout: rows
    stacked, each side widened on the left with the padding entries, kept rows cut at a column; and the
    prefill's last-position logits. Control: a layout with the holes on the right is told apart."""
    from onnxruntime import OrtValue

    ops = batch_cache.DeviceOps(session, 2)
    heads, d = session.config.kv_heads, session.cache_width
    dev = lambda xs: [OrtValue.ortvalue_from_numpy(x) for x in xs]  # noqa: E731
    holes = [rng.standard_normal((1, heads, 1, d)).astype(np.float32) for _ in range(2)]
    for wa, wb in ((5, 9), (9, 5)):  # the running rows narrower, then the joining ones
        a = [rng.standard_normal((3, heads, wa, d)).astype(np.float32) for _ in range(2)]
        b = [rng.standard_normal((2, heads, wb, d)).astype(np.float32) for _ in range(2)]
        merged = [v.numpy() for v in ops.merge(dev(a), dev(b), dev(holes), 9)]
        for m, x, y, h in zip(merged, a, b, holes):
            fill = lambda z: np.broadcast_to(h, (len(z), heads, 9 - z.shape[2], d))  # noqa: E731
            left = [np.concatenate([fill(z), z], axis=2) for z in (x, y)]
            assert np.array_equal(m, np.concatenate(left, axis=0))
            right = [np.concatenate([z, fill(z)], axis=2) for z in (x, y)]
            assert not np.array_equal(m, np.concatenate(right, axis=0))  # the control
    kept = [v.numpy() for v in ops.keep(dev(merged), [4, 0, 2], 3)]
    for k, m in zip(kept, merged):
        assert np.array_equal(k, m[[4, 0, 2]][:, :, 3:])
    logits = rng.standard_normal((2, 7, 11)).astype(np.float32)
    last = ops.last_logits(OrtValue.ortvalue_from_numpy(logits))
    assert last.dtype == np.float32 and np.array_equal(last, logits[:, -1])
    assert not np.array_equal(last, logits[:, 0])  # the control: another position differs


def test_waiting_prompts_are_prefilled_together_within_the_chunk(form_session, rng, monkeypatch):
    """Prompts that arrive together go through one prefill pass while rows x padded length fits the chunk,
    and each still gives what it gives alone; with a chunk that holds one of them, they take one pass each."""
    session = form_session
    vocab = session.config.vocab_size
    prompts = [rng.integers(0, vocab, int(n)).tolist() for n in [20, *rng.integers(11, 21, 5)]]  # left-padded
    alone = [session.generate_ids([p], 6).texts[0] for p in prompts]
    for chunk, passes in ((6 * 20, 1), (20, 6)):  # 2 x 11 > 20: one prompt per pass
        engine = Engine(session, EngineConfig(max_batch=8, prefill_chunk=chunk, max_context=64))
        shapes = []
        real = session.step
        monkeypatch.setattr(session, "step", lambda ids, mask, *a, **k: (
            shapes.append((ids.shape, mask.shape)), real(ids, mask, *a, **k))[1])
        got = _run_schedule(engine, prompts, [6] * 6, [0] * 6)
        monkeypatch.undo()
        prefills = [ids for ids, mask in shapes if ids[1] == mask[1]]  # from an empty cache
        assert len(prefills) == passes, shapes
        assert sum(rows for rows, _ in prefills) == 6
        assert [got.results[i].text for i in range(6)] == alone


# ----------------------------------------------------------------------------- fixed slots (static-cache exports)
def _decode_steps(session, monkeypatch, engine):
    """Record each decode step of ``engine``: (rows stepped, rows running, the first past's address)."""
    steps, real, decode, decoding = [], session.step, engine.cache.decode, []

    def step(ids, mask, cache, **options):
        if decoding:
            steps.append((ids.shape[0], len(engine.running), cache[0].data_ptr()))
        return real(ids, mask, cache, **options)

    def traced(*args, **options):
        decoding.append(True)
        try:
            return decode(*args, **options)
        finally:
            decoding.clear()
    monkeypatch.setattr(session, "step", step)
    monkeypatch.setattr(engine.cache, "decode", traced)
    return steps


def test_slots_pack_and_move_rows_and_each_prompt_still_equals_it_alone(slot_session, rng, monkeypatch):
    """Slots of 124 columns, 12 requests of 12-23 new tokens: the batch's width reaches the buffers' end (rows
    are packed), rows leave from the middle (the last row moves into the hole), and every decode step runs the
    occupied rows only, on the buffers allocated once (bound in place: no step copies the cache). Each greedy
    text still equals the prompt alone, on both static forms. (The CUDA twin: tests/test_serve_cuda.py.)"""
    session = slot_session
    prompts, _, joins = _schedule(rng, session)  # prompts < 100 tokens
    max_tokens = rng.integers(12, 24, len(prompts)).tolist()
    engine = Engine(session, EngineConfig(max_batch=4, prefill_chunk=16, max_tokens_in_flight=4 * 124))
    assert engine.cache.columns == 124 and engine.max_context == 124
    steps = _decode_steps(session, monkeypatch, engine)
    got = _run_schedule(engine, prompts, max_tokens, joins)
    monkeypatch.undo()
    alone = [session.generate_ids([p], m).texts[0] for p, m in zip(prompts, max_tokens)]
    assert [got.results[i].text for i in range(len(prompts))] == alone
    assert engine.cache.packs > 0 and engine.cache.moves > 0 and engine.steps < sum(max_tokens)
    assert len(steps) == engine.steps and all(rows == running for rows, running, _ in steps)
    assert {ptr for _, _, ptr in steps} == {engine.cache.device.address(engine.cache.buffers[0])}


def test_a_join_copied_into_the_wrong_columns_changes_the_tokens(static_session, rng, monkeypatch):
    """Negative control for the slots: a joining row's keys and values copied one column left of the columns
    its mask gives it (its last prompt token's entry missing, a stale column attended) change the tokens."""
    from alibi_export.serve import slot_cache

    prompts, max_tokens, joins = _schedule(rng, static_session)
    alone = [static_session.generate_ids([p], m).texts[0] for p, m in zip(prompts, max_tokens)]
    monkeypatch.setattr(slot_cache, "_join_columns",
                        lambda width, n: slice(width - n, width) if n == width else slice(width - n - 1, width - 1))
    engine = Engine(static_session, EngineConfig(max_batch=6, prefill_chunk=16, max_context=256))
    got = _run_schedule(engine, prompts, max_tokens, joins)
    assert [got.results[i].text for i in range(len(prompts))] != alone


def test_folded_slots_attend_what_their_masked_columns_hold(folded_session, static_session, rng):
    """The folded form masks a column by the padding mark its cached key carries, not by the attention mask: the
    slots fill every masked column a step reads (left of a join, the gap a wider join opens, left of a moved or
    packed row) with the model's padding entry. Controls, the same schedule as the test above: masked columns
    left as they are (zeros, or an earlier row's keys: the behaviour before the fill), then filled with a zero
    key, each change the tokens; the default static form's slots need no fill (their bias masks)."""
    session = folded_session
    prompts, _, joins = _schedule(rng, session)
    max_tokens = rng.integers(12, 24, len(prompts)).tolist()
    alone = [session.generate_ids([p], m).texts[0] for p, m in zip(prompts, max_tokens)]
    config = EngineConfig(max_batch=4, prefill_chunk=16, max_tokens_in_flight=4 * 124)
    engine = Engine(session, config)
    got = _run_schedule(engine, prompts, max_tokens, joins)
    assert [got.results[i].text for i in range(len(prompts))] == alone
    assert engine.cache.packs > 0 and engine.cache.moves > 0
    for holes in (None, [np.zeros_like(h) for h in engine.cache.holes]):
        stale = Engine(session, config)
        stale.cache.holes = holes
        got = _run_schedule(stale, prompts, max_tokens, joins)
        assert [got.results[i].text for i in range(len(prompts))] != alone
    assert Engine(static_session, config).cache.holes is None


def test_slots_budget_waits_and_refuses(static_session, rng):
    """The budget is the slots' memory: 2 slots of 64 columns. A request longer than a slot is refused (400);
    a third request waits for a free slot; a rolling window and a budget of under 2 columns per slot are
    refused in one line."""
    from alibi_export.errors import AlibiExportError

    vocab = static_session.config.vocab_size
    engine = Engine(static_session, EngineConfig(max_batch=2, max_tokens_in_flight=128))
    with pytest.raises(RequestRejected, match=r"allows \(64 tokens \(one cache slot") as e:
        engine.submit([1] * 50, SamplingParams(max_tokens=20), lambda ev: None)
    assert e.value.status == 400
    prompts = [rng.integers(0, vocab, n).tolist() for n in (30, 10, 20)]
    got = _Collector()
    for i, p in enumerate(prompts):
        engine.submit(p, SamplingParams(max_tokens=30, temperature=0), got(i))
    for _ in range(3):
        engine.iterate()
    assert engine.batch_size == 2 and engine.queue_depth == 1 and engine.kv_tokens <= 128
    for _ in range(200):
        if len(got.results) == 3:
            break
        engine.iterate()
    assert [got.results[i].text for i in range(3)] == [static_session.generate_ids([p], 30).texts[0]
                                                        for p in prompts]
    for config, says in ((EngineConfig(kv_window=16), "--kv-window does not apply"),
                         (EngineConfig(max_batch=8, max_tokens_in_flight=15), "fewer than 2 cache columns")):
        with pytest.raises(AlibiExportError, match=says) as e:
            Engine(static_session, config)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("options,says", [
    ({"max_batch": 0}, "max_batch must be a positive integer"),
    ({"waiting_served_ratio": -0.5}, "waiting_served_ratio must be a finite number"),
    ({"waiting_served_ratio": float("nan")}, "waiting_served_ratio must be a finite number"),
    ({"waiting_served_ratio": True}, "waiting_served_ratio must be a finite number"),
    ({"max_waiting_steps": 8}, "needs waiting_served_ratio > 0"),
    ({"waiting_served_ratio": 1.0, "max_waiting_steps": 0}, "max_waiting_steps must be a positive integer"),
    ({"waiting_served_ratio": 1.0, "prefill_in_decode": True}, "with prefill_in_decode there are none"),
])
def test_engine_config_is_checked(options, says):
    with pytest.raises(AlibiExportError, match=says):
        EngineConfig(**options)
    EngineConfig(waiting_served_ratio=1.2, max_waiting_steps=8)  # and the settings that go together pass


# ----------------------------------------------------------------------------- the server, as a process
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """`python -m alibi_export serve PATH ...` on a free loopback port; its log in a file (no pipe to fill)."""

    def __init__(self, path, tmp_path, *options):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"server-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "alibi_export", "serve", str(path), "--port",
                                          str(self.port), *map(str, options)], stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the server did not come up: {self.log.read_text()}")

    def client(self):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def metrics(self) -> dict:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {s.name + "".join(f"{{{v}}}" for v in s.labels.values()): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def server(kv_path, tmp_path_factory):
    srv = _Server(kv_path, tmp_path_factory.mktemp("server"), "--max-batch", 8, "--prefill-chunk", 32,
                  "--max-context", 320, "--queue", 64)
    yield srv
    srv.stop()


def _complete(client, prompt, max_tokens, stream, delay, **options):
    time.sleep(delay)
    if not stream:
        r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=max_tokens, temperature=0, **options)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage
    text, reason, usage = [], None, None
    for chunk in client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, **options):
        for c in chunk.choices:
            text.append(c.text)
            reason = c.finish_reason or reason
        usage = chunk.usage or usage
    return "".join(text), reason, usage


def test_32_concurrent_clients_each_equal_the_prompt_alone(server, session, rng):
    """Mixed lengths (1-250 tokens: chunked prefill at 32), text and token-id prompts, streamed and not,
    starting at different times; each completion equals the prompt alone through GenerationSession."""
    from tests.conftest import EXCERPT

    text = EXCERPT.read_text()
    prompts, ids = [], []
    for i in range(32):
        if i % 3 == 0:
            start = int(rng.integers(0, len(text) - 2000))
            prompts.append(text[start:start + int(rng.integers(1, 1000))])
            ids.append(session.encode(prompts[-1])[0])
        else:
            prompts.append(rng.integers(0, session.config.vocab_size, int(rng.integers(1, 250))).tolist())
            ids.append(prompts[-1])
    max_tokens = rng.integers(1, 40, 32).tolist()
    before = server.metrics()
    client = server.client()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(_complete, client, p, m, i % 2 == 1, 0.05 * float(rng.integers(0, 20)))
                   for i, (p, m) in enumerate(zip(prompts, max_tokens))]
        answers = [f.result(timeout=300) for f in futures]
    for i, ((got, reason, usage), row, m) in enumerate(zip(answers, ids, max_tokens)):
        alone = session.generate_ids([row], m)
        assert got == alone.texts[0], i
        assert reason == ("length" if len(alone.token_ids[0]) == m else "stop"), i
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(row), len(alone.token_ids[0])), i
    after = server.metrics()
    assert after['alibi_serve_requests_total{success}'] - before['alibi_serve_requests_total{success}'] == 32
    generated = sum(u.completion_tokens for _, _, u in answers)
    assert after["alibi_serve_generation_tokens_total"] - before["alibi_serve_generation_tokens_total"] == generated
    assert after["alibi_serve_prompt_tokens_total"] - before["alibi_serve_prompt_tokens_total"] == sum(map(len, ids))
    assert after["alibi_serve_time_to_first_token_seconds_count"] - before[
        "alibi_serve_time_to_first_token_seconds_count"] == 32
    assert after["alibi_serve_inter_token_latency_seconds_count"] - before[
        "alibi_serve_inter_token_latency_seconds_count"] == generated - 32 + sum(
        1 for _, r, u in answers if r == "stop" and u.completion_tokens < 40)  # a stop token is a step too
    assert after["alibi_serve_running_requests"] == 0 and after["alibi_serve_kv_tokens_in_use"] == 0


def test_a_static_export_is_served_from_fixed_slots(slot_session, tmp_path, rng):
    """`serve` on a --static-cache export, either form: 8 concurrent clients of mixed lengths (chunked prefill at
    32, slots of 160 columns), streamed and not, each equal to its prompt alone; the KV gauge is back to 0 after."""
    static_session = slot_session
    srv = _Server(static_session.path, tmp_path, "--max-batch", 4, "--prefill-chunk", 32,
                  "--max-tokens-in-flight", 4 * 160)
    try:
        prompts = [rng.integers(0, static_session.config.vocab_size, int(n)).tolist() for n in rng.integers(1, 120, 8)]
        max_tokens = rng.integers(1, 30, 8).tolist()
        client = srv.client()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(_complete, client, p, m, i % 2 == 1, 0.1 * i)
                       for i, (p, m) in enumerate(zip(prompts, max_tokens))]
            answers = [f.result(timeout=300) for f in futures]
        for i, ((got, _, usage), p, m) in enumerate(zip(answers, prompts, max_tokens)):
            alone = static_session.generate_ids([p], m)
            assert got == alone.texts[0] and usage.completion_tokens == len(alone.token_ids[0]), i
        assert srv.metrics()["alibi_serve_kv_tokens_in_use"] == 0
    finally:
        srv.stop()


def test_the_server_lets_onnx_runtime_threads_sleep_unless_asked_to_spin(kv_path):
    """The served session's intra-op threads sleep between operators (spinning ones held the cores the HTTP thread
    streams from: BENCHMARKS.md, "Spinning threads and the inter-token tail"); spin=True, and any session
    outside the server, keep ONNX Runtime's default (the control: the entry is what build sets, nothing else)."""
    from alibi_export.serve.server import build

    def spinning(session):  # ONNX Runtime raises for an entry that was never set
        return session.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")

    for spin in (False, True):
        served = build(kv_path, EngineConfig(max_batch=2), spin=spin)
        try:
            if spin:
                with pytest.raises(Exception):
                    spinning(served.engine.session)
            else:
                assert spinning(served.engine.session) == "0"
        finally:
            served.engine.stop(timeout=30)
    with pytest.raises(Exception):
        spinning(GenerationSession(kv_path))


def test_models_health_and_metrics(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    names = {f.name for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text)}
    assert {"alibi_serve_requests", "alibi_serve_prompt_tokens", "alibi_serve_generation_tokens",
            "alibi_serve_time_to_first_token_seconds", "alibi_serve_inter_token_latency_seconds",
            "alibi_serve_queue_depth", "alibi_serve_running_requests", "alibi_serve_kv_tokens_in_use"} <= names


BAD = [  # (body, status, what the message must say)
    (b'{"prompt": "hi", ', 400, "not valid JSON"),
    (b'{"prompt": "\xff\xfe"}', 400, "not valid UTF-8"),
    (b'[1, 2]', 400, "JSON object"),
    (b'{"max_tokens": 4}', 400, "prompt is required"),
    (b'{"prompt": ""}', 400, "empty"),
    (b'{"prompt": [1, "a"]}', 400, "prompt"),
    (b'{"prompt": [99999]}', 400, "outside the vocabulary"),
    (b'{"prompt": "hi", "model": "gpt-4"}', 404, "does not exist"),
    (b'{"prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": -3}', 400, "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": 1.5}', 400, "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": 100000}', 400, "past the context"),
    (b'{"prompt": ' + str(list(range(1, 400))).encode() + b'}', 400, "the prompt has 399 tokens"),
    (b'{"prompt": "hi", "temperature": -0.5}', 400, "temperature"),
    (b'{"prompt": "hi", "temperature": "hot"}', 400, "temperature"),
    (b'{"prompt": "hi", "top_p": 0}', 400, "top_p"),
    (b'{"prompt": "hi", "top_p": 1.5}', 400, "top_p"),
    (b'{"prompt": "hi", "top_k": 0}', 400, "top_k"),
    (b'{"prompt": "hi", "stop": 5}', 400, "stop"),
    (b'{"prompt": "hi", "stop": ["a", 3]}', 400, "stop"),
    (b'{"prompt": "hi", "stop": [""]}', 400, "stop"),
    (b'{"prompt": "hi", "n": 2}', 400, "not supported"),
    (b'{"prompt": "hi", "logprobs": 2}', 400, "not supported"),
    (b'{"prompt": "hi", "echo": true}', 400, "not supported"),
    (b'{"prompt": "hi", "stream": "yes"}', 400, "stream"),
    (b'{"prompt": "' + b"a" * (1 << 20) + b'"}', 413, "at most 1048576"),
]


@pytest.mark.parametrize("body,status,says", BAD, ids=[f"{i}-{s}" for i, (_, s, _) in enumerate(BAD)])
def test_bad_input_gets_an_openai_error(server, body, status, says):
    r = httpx.post(f"{server.url}/v1/completions", content=body, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"


def test_a_large_body_without_a_length_is_cut_off_at_the_limit(server):
    chunks = (b"a" * 65536 for _ in range(20))  # chunked transfer: the limit is counted as the body arrives
    r = httpx.post(f"{server.url}/v1/completions", content=chunks, timeout=30)
    assert r.status_code == 413 and "at most 1048576" in r.json()["error"]["message"]


def test_bad_input_leaves_the_server_serving(server):
    before = server.metrics()["alibi_serve_requests_total{invalid}"]
    assert httpx.post(f"{server.url}/v1/completions", content=b"{", timeout=10).status_code == 400
    assert server.metrics()["alibi_serve_requests_total{invalid}"] == before + 1
    text, reason, usage = _complete(server.client(), "Once upon a time", 4, False, 0)
    assert usage.completion_tokens >= 1 and reason in ("stop", "length")


def test_chat_without_a_template_is_refused_with_the_reason(server):
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        server.client().chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}])


def test_stop_strings_cut_the_text(server, session):
    client = server.client()
    full, _, _ = _complete(client, "It was a dark and stormy night", 30, False, 0)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3 and stop in full
    for stream in (False, True):
        text, reason, _ = _complete(client, "It was a dark and stormy night", 30, stream, 0, stop=[stop])
        assert text == full[:full.index(stop)] and reason == "stop"


def _wait_for(server, predicate, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        m = server.metrics()
        if predicate(m):
            return m
        time.sleep(0.1)
    raise AssertionError(f"metrics never got there: {m}")


def test_a_client_that_disconnects_frees_its_slot(server):
    before = server.metrics()["alibi_serve_requests_total{cancelled}"]
    body = {"model": MODEL_ID, "prompt": "The", "max_tokens": 300, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert '"finish_reason": null' in first
            assert server.metrics()["alibi_serve_running_requests"] == 1  # still generating
    m = _wait_for(server, lambda m: m["alibi_serve_requests_total{cancelled}"] == before + 1)
    m = _wait_for(server, lambda m: m["alibi_serve_running_requests"] == 0 and m["alibi_serve_kv_tokens_in_use"] == 0)
    assert m["alibi_serve_queue_depth"] == 0
    # Not streamed: the client gives up (its timeout closes the connection) while the answer is computed. The
    # server notices within its 0.1 s poll; the 300 tokens take >= 0.6 s on an idle 2-core machine (a read
    # timeout of 0.3 s with a 0.25 s poll once let them finish first there).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=httpx.Timeout(10, read=0.02))
    _wait_for(server, lambda m: m["alibi_serve_requests_total{cancelled}"] == before + 2)
    _wait_for(server, lambda m: m["alibi_serve_running_requests"] == 0 and m["alibi_serve_kv_tokens_in_use"] == 0)


def test_full_queue_answers_429_and_sigterm_drains(kv_path, tmp_path):
    """One slot and a queue of one: a third request is refused with Retry-After. Then SIGTERM: the two
    accepted requests still complete, and the process exits 0."""
    srv = _Server(kv_path, tmp_path, "--max-batch", 1, "--queue", 1, "--max-context", 320)
    try:
        client = srv.client()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(_complete, client, "The", 300, True, 0)
            _wait_for(srv, lambda m: m["alibi_serve_running_requests"] == 1)
            queued = pool.submit(_complete, client, "A", 5, False, 0)
            _wait_for(srv, lambda m: m["alibi_serve_queue_depth"] == 1)
            r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "B", "max_tokens": 2}, timeout=10)
            assert r.status_code == 429 and r.headers["Retry-After"] == "1" and "queue is full" in r.text
            assert srv.metrics()["alibi_serve_requests_total{queue_full}"] == 1
            srv.proc.send_signal(signal.SIGTERM)
            text, reason, usage = running.result(timeout=120)
            assert usage.completion_tokens == len(_alone_tokens(kv_path, "The", 300)) and reason in ("length", "stop")
            assert queued.result(timeout=120)[2].completion_tokens >= 1
        assert srv.proc.wait(60) == 0, srv.log.read_text()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{srv.url}/health", timeout=2)
    finally:
        srv.stop()


def _alone_tokens(path, prompt, n):
    return GenerationSession(path).generate(prompt, n).token_ids[0]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "alibi_export", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.mark.parametrize("args,says", [
    (["serve", "missing.onnx"], "not found"),
    (["serve", "--replicas", "2", "x.onnx"], "--replicas applies to --ray"),
    (["serve", "--max-batch", "0", "x.onnx"], "--max-batch"),
    (["serve", "--kv-window", "0", "x.onnx"], "--kv-window"),
    (["serve", "--waiting-served-ratio", "-1", "x.onnx"], "--waiting-served-ratio"),
    (["serve", "--max-waiting-steps", "8", "x.onnx"], "needs waiting_served_ratio > 0"),
    (["serve", "--waiting-served-ratio", "1", "--prefill-in-decode", "x.onnx"], "with prefill_in_decode there are none"),
])
def test_cli_serve_refuses_bad_options_in_one_line(tmp_path, args, says):
    proc = _cli(*args)
    assert proc.returncode != 0 and proc.stderr.startswith("Error") and says in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_cli_serve_refuses_a_setting_its_export_rules_out_in_one_line(kv_path):
    """What `alibi-export serve X --prefill-in-decode` prints for a concatenating export: one line, before it
    listens. (The same export serves without the flag in every server test here.)"""
    proc = _cli("serve", kv_path, "--prefill-in-decode", "--port", _free_port())
    assert proc.returncode != 0 and proc.stderr.startswith("Error"), proc.stderr
    assert "needs fixed cache slots" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_cli_serve_refuses_a_folder_without_a_model(tmp_path):
    proc = _cli("serve", tmp_path)
    assert proc.returncode == 1 and "without model.onnx" in proc.stderr


@pytest.mark.slow  # exports the shipped model (~25 s)
def test_shipped_model_is_exported_once_into_the_user_cache(tmp_path, monkeypatch):
    from alibi_export.serve.model_cache import shipped_kv_export

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    path = shipped_kv_export()
    assert path.is_relative_to(tmp_path / "cache" / "alibi-export") and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert shipped_kv_export() == path and path.stat().st_mtime_ns == stamp  # not exported again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing in the working directory
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_serve_run_arguments_are_parsed_strictly():
    """`serve run alibi_export.serve.ray_app:app key=value ...` hands strings over: each becomes its type, and a
    misspelt key or a bad value is an error naming it (it was ignored, or a traceback, before). Controls: the
    same flag given as false is False, and an unset setting keeps EngineConfig's default."""
    from alibi_export.serve.ray_app import parse_app_arguments

    config, options = parse_app_arguments({"path": "m.onnx", "replicas": "3", "max_batch": "12",
                                           "prefill_in_decode": "true", "window_slack": "0", "threads": "2",
                                           "spin": "yes"})
    assert (config.max_batch, config.prefill_in_decode, config.window_slack) == (12, True, 0)
    assert config.max_queue == EngineConfig().max_queue
    assert options == {"path": "m.onnx", "replicas": 3, "provider": "cpu", "threads": 2, "spin": True}
    assert parse_app_arguments({"prefill_in_decode": "False"})[0].prefill_in_decode is False
    assert parse_app_arguments({})[1]["spin"] is False  # the server's default: threads that sleep
    config, _ = parse_app_arguments({"waiting_served_ratio": "1.5", "max_waiting_steps": "64"})
    assert (config.waiting_served_ratio, config.max_waiting_steps) == (1.5, 64)
    for args, message in [({"max_bacth": "4"}, "unknown argument max_bacth"),
                          ({"prefill_in_decode": "maybe"}, "prefill_in_decode='maybe': expected true or false"),
                          ({"max_batch": "four"}, "max_batch='four': expected an integer >= 1"),
                          ({"max_batch": "0"}, "max_batch='0': expected an integer >= 1"),
                          ({"replicas": "two"}, "replicas='two'"),
                          ({"provider": "tpu"}, "provider='tpu': expected cpu or cuda"),
                          ({"spin": "sometimes"}, "spin='sometimes': expected true or false"),
                          ({"waiting_served_ratio": "-1"}, "waiting_served_ratio='-1': expected a finite number"),
                          ({"waiting_served_ratio": "inf"}, "waiting_served_ratio='inf': expected a finite number")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_app_arguments(args)


def test_ray_application_refuses_a_setting_the_export_rules_out_on_the_driver(kv_path):
    """On Ray, a replica that fails in its constructor is started again and again; the settings an export's form
    rules out are refused once, on the driver, before any replica (no Ray instance runs here). Control: the same
    export with a setting it allows builds its application."""
    pytest.importorskip("ray")
    from alibi_export.serve.ray_app import application

    with pytest.raises(AlibiExportError, match="prefill in the decode steps needs fixed cache slots"):
        application(str(kv_path), EngineConfig(prefill_in_decode=True))
    assert application(str(kv_path), EngineConfig(max_batch=2)) is not None


@pytest.mark.slow  # a local Ray instance and two replicas: about a minute on 2 cores
def test_ray_serve_spreads_requests_over_two_replicas(kv_path, session, rng):
    """Two CPU replicas behind Ray Serve's proxy on loopback: both serve (their ids in X-Replica-Id), and
    every answer equals the prompt alone through GenerationSession, so equals what one replica gives."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from alibi_export.serve.ray_app import REPLICA_HEADER, application

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(str(kv_path), EngineConfig(max_batch=4, max_context=320), replicas=2, threads=1),
                  name="alibi-export", route_prefix="/")
        prompts = _prompts(rng, session.config.vocab_size, 16, longest=60)
        replicas, url = set(), f"http://127.0.0.1:{port}/v1/completions"

        def ask(prompt):
            r = httpx.post(url, json={"model": MODEL_ID, "prompt": prompt, "max_tokens": 8, "temperature": 0},
                           timeout=120)
            assert r.status_code == 200, r.text
            return r.headers[REPLICA_HEADER], r.json()["choices"][0]["text"]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, prompts))
        for (replica, text), prompt in zip(answers, prompts):
            replicas.add(replica)
            assert text == session.generate_ids([prompt], 8).texts[0]
        assert len(replicas) == 2, replicas
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow  # a genai export of the tiny model (~15 s)
def test_a_genai_folder_is_served_through_its_model_onnx(tmp_path, tiny_dir, rng):
    from alibi_export import load
    from alibi_export.export.genai import export_genai
    from alibi_export.serve.server import resolve_model

    folder = tmp_path / "tiny-genai"
    export_genai(load(tiny_dir), folder, kv_cache=True)
    path, model_id = resolve_model(folder)
    assert path == folder / "model.onnx" and model_id == "tiny-genai"
    genai = GenerationSession(path)
    prompts, max_tokens, joins = _schedule(rng, genai, n=4)
    got = _run_schedule(Engine(genai, EngineConfig(max_batch=4, prefill_chunk=16)), prompts, max_tokens, joins)
    assert [got.results[i].text for i in range(4)] == [genai.generate_ids([p], m).texts[0]
                                                       for p, m in zip(prompts, max_tokens)]
