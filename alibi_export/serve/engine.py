"""Iteration-level (continuous) batching over one KV-cache export, in one background thread.

Each iteration runs at most one prefill pass (a chunk of at most ``prefill_chunk`` tokens of waiting
prompts) and one decode step of every running request. A request joins the running batch as soon as
its prompt is through (``BatchCache.merge``) and leaves as soon as it finishes (``BatchCache.keep``),
so no request waits for another to finish and a long prompt stalls running streams by one chunk at a
time. Every pass between two steps is a gap in every running stream; with ``waiting_served_ratio`` (TGI's knob of
that name) a pass waits while rows run until it admits enough requests to be worth their gap, so the passes
become few and large (with requests of equal lengths: waves, each prefilled while nothing streams). With
``prefill_in_decode`` (fixed slots only) there are no prefill passes at all: a request joins
with no cache columns and its prompt goes through the decode steps one token a step, so a running stream's
gap is one step whatever arrives, at the price of a prompt token costing a row of a step. Batching changes no
result: each row keeps its own ALiBi positions (the export counts them over the row's mask), and each request
samples with its own generator.

Two cache layouts, one per export form. A ``--kv-cache`` export (the graph concatenates past and new
keys) runs on ``BatchCache``: the running rows share one tensor as wide as the longest row, re-laid on
every join and leave, so the engine admits a request only while (admitted rows + 1) x (the longest
prompt + max_tokens among them) stays within ``max_tokens_in_flight``. A ``--static-cache`` export runs
on ``SlotCache``: ``max_batch`` fixed slots of min(LMAX, max_tokens_in_flight / max_batch) columns,
allocated once and updated in place by the graph, so a request needs a free slot and fits if its prompt
and max_tokens fit one slot. The engine knows nothing of HTTP: requests carry a callback that receives
``Delta`` and ``Finished`` events on the engine's thread.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import AlibiExportError
from ..runtime.generate import Sampler, TokenStream, left_pad
from .batch_cache import BatchCache, padding_entries
from .slot_cache import SlotCache

__all__ = ["EngineConfig", "SamplingParams", "Engine", "EngineRequest", "Delta", "Finished", "RequestRejected",
           "PREFILL_CHUNK", "check_form"]

log = logging.getLogger(__name__)

# The prompt tokens of one prefill pass when EngineConfig leaves it unset, by the session's device. A pass runs
# between two decode steps, so it is a stall in every running stream. On a 2-core CPU a 256-token pass of the
# shipped model is ~20x a decode step; 64 tokens halved the server's inter-token latency p99 against 256 at
# equal tokens/s (-1% and +9% over two prompt mixes; BENCHMARKS.md, "Throughput against inter-token latency").
# A GPU prefills hundreds of thousands of tokens/s, where a pass of 256 costs about one step.
PREFILL_CHUNK = {"cpu": 64, "cuda": 256}


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16  # requests decoded together
    max_tokens_in_flight: int = 32768  # KV-cache slots (rows x columns of the padded cache)
    max_queue: int = 64  # requests waiting for admission; more are refused (HTTP 429)
    prefill_chunk: int | None = None  # tokens of prompt per prefill pass (None: PREFILL_CHUNK of the device)
    max_context: int = 2048  # prompt + max_tokens of one request
    kv_window: int | None = None  # each row keeps its last kv_window tokens' keys and values (runtime.window)
    window_slack: int = 64  # masked columns held past the window before the cache is cut (one cut per slack steps)
    prefill_in_decode: bool = False  # prompts go through the decode steps, one token a step (fixed slots only)
    # A prefill pass stalls every running row, so while rows run one starts only when it admits at least
    # floor(waiting_served_ratio x running) requests (0: whenever one fits), or once max_waiting_steps decode
    # steps have passed since the last one: fewer, larger passes, fewer stalled gaps (TGI's knobs of these names)
    waiting_served_ratio: float = 0.0
    max_waiting_steps: int | None = None

    def __post_init__(self):
        names = ("max_batch", "max_tokens_in_flight", "max_queue", "max_context")
        optional = tuple(n for n in ("prefill_chunk", "kv_window", "max_waiting_steps") if getattr(self, n) is not None)
        for name in names + optional:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AlibiExportError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.window_slack, int) or self.window_slack < 0:
            raise AlibiExportError(f"window_slack must be a non-negative integer, got {self.window_slack!r}")
        ratio = self.waiting_served_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < float("inf"):
            raise AlibiExportError(f"waiting_served_ratio must be a finite number >= 0, got {ratio!r}")
        if ratio and self.prefill_in_decode:
            raise AlibiExportError("waiting_served_ratio holds back prefill passes; with prefill_in_decode there are "
                                   "none. Note: use one or the other")
        if self.max_waiting_steps is not None and not ratio:
            raise AlibiExportError("max_waiting_steps bounds how long waiting_served_ratio holds requests back; it "
                                   "needs waiting_served_ratio > 0")

    def kv_need(self, final_len: int) -> int:
        """The cache columns a request of ``final_len`` tokens (prompt + max_tokens) holds at most."""
        return final_len if self.kv_window is None else min(final_len, self.kv_window + self.window_slack)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy (the argmax)
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # strings that end the text (not included in it)
    stop_token_ids: tuple[int, ...] = ()  # more token ids that end the text, besides the model's end of text


@dataclass(frozen=True)
class Delta:
    text: str  # new text (held back while it could be the start of a stop string or of a UTF-8 character)


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    text: str  # the whole completion
    error: str | None = None


class RequestRejected(AlibiExportError):
    """A request the engine refuses: ``status`` 400 (it can never run) or 429 (the queue is full)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class EngineRequest:
    """One prompt in the engine. ``cancel()`` may be called from any thread; the engine frees the
    request's slot and cache at its next iteration."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[object], None]):
        self.id = next(self._ids)
        self.prompt_ids, self.params, self.on_event = prompt_ids, params, on_event
        self.arrival = time.perf_counter()
        self.cancelled = False
        self.final_len = len(prompt_ids) + params.max_tokens
        # Engine-thread state:
        self.text, self.emitted, self.next_token = "", 0, -1
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.sampler: Sampler | None = None
        self.stream: TokenStream | None = None
        self.stops: set[int] = set()
        self.pending: list[int] = []  # prompt tokens not fed yet (EngineConfig.prefill_in_decode)

    def cancel(self) -> None:
        self.cancelled = True


class _Observer:
    """What the engine reports (the server's metrics implement it); the default ignores everything."""

    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def finished(self, outcome: str, prompt_tokens: int, completion_tokens: int) -> None: ...


@dataclass
class _PrefillJob:
    """Prompts that go through one prefill together: left-padded ids and mask, fed ``step`` columns per pass."""

    requests: list[EngineRequest]
    ids: np.ndarray  # (b, L)
    mask: np.ndarray  # (b, L)
    step: int
    done: int = 0
    cache: list | None = None
    seen: np.ndarray | None = None  # the mask of the columns in ``cache`` (fewer than ``done`` under a window)


class Engine:
    """Continuous batching over ``session`` (a ``GenerationSession``). ``start()`` runs the loop in a
    daemon thread; ``submit`` is thread-safe."""

    def __init__(self, session, config: EngineConfig = EngineConfig(), observer: _Observer | None = None):
        static = getattr(session, "static", None)
        check_form(config, static.limit if static is not None else 0, session.path)
        if config.kv_window is not None:
            from ..runtime.window import check_window_form

            check_window_form(session.config, session.cache_width, repr(str(session.path)))
        self.session, self.config, self.observer = session, config, observer or _Observer()
        self.prefill_chunk = config.prefill_chunk or PREFILL_CHUNK.get(getattr(session, "device", "cpu"), 256)
        self.max_context = config.max_context
        if static is not None:
            # Fixed slots, allocated once: max_batch rows of the budget's share of columns (at most LMAX).
            columns = min(static.limit, config.max_tokens_in_flight // config.max_batch)
            self.cache = SlotCache(session, config.max_batch, columns)
            self.max_context = min(config.max_context, columns)
        else:
            self.cache = BatchCache(session, padding_entries(session))
        self.running: list[EngineRequest] = []
        self._job: _PrefillJob | None = None
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode steps so far
        self._steps_at_admission = 0  # self.steps when the last prefill job was admitted
        self.kv_tokens = 0  # cache slots in use (running rows x width, plus the prefill's)

    # ------------------------------------------------------------------ other threads
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """The prompt as a list of ids, or RequestRejected (400) for a request that can never run."""
        try:
            (ids,) = self.session.check_ids([prompt_ids])
            _sampler(params)
            vocab = self.session.config.vocab_size
            if any(not 0 <= t < vocab for t in params.stop_token_ids):
                raise AlibiExportError(f"stop_token_ids must be token ids in [0, {vocab}), "
                                       f"got {list(params.stop_token_ids)}")
        except AlibiExportError as e:
            raise RequestRejected(str(e)) from None
        cfg = self.config
        if params.max_tokens < 1:
            raise RequestRejected(f"max_tokens must be at least 1, got {params.max_tokens}", param="max_tokens")
        limit = self.max_context
        why = " (one cache slot: max_tokens_in_flight / max_batch)" if limit < cfg.max_context else ""
        if len(ids) >= limit:
            raise RequestRejected(f"the prompt has {len(ids)} tokens; this server allows at most {limit} "
                                  f"tokens of prompt and completion together{why}", param="prompt")
        if len(ids) + params.max_tokens > limit:
            raise RequestRejected(f"max_tokens {params.max_tokens} with a prompt of {len(ids)} tokens is past the "
                                  f"context this server allows ({limit} tokens{why}). Note: ask for at most "
                                  f"{limit - len(ids)}", param="max_tokens")
        if cfg.kv_need(len(ids) + params.max_tokens) > cfg.max_tokens_in_flight:
            raise RequestRejected(f"the request needs {cfg.kv_need(len(ids) + params.max_tokens)} KV-cache tokens; "
                                  f"this server holds at most {cfg.max_tokens_in_flight}", param="max_tokens")
        return ids

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               on_event: Callable[[object], None]) -> EngineRequest:
        """Queue a request; RequestRejected (400) if it can never run, (429) if the queue is full."""
        ids = self.check(prompt_ids, params)
        request = EngineRequest(ids, params, on_event)
        with self._wake:
            if self._stopping:
                raise RequestRejected("the server is shutting down", status=503)
            if len(self._waiting) >= self.config.max_queue:
                raise RequestRejected(f"the queue is full ({self.config.max_queue} requests waiting)", status=429)
            self._waiting.append(request)
            self._wake.notify()
        return request

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="alibi-serve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> bool:
        """Finish what is queued and running, then end the thread; False if it is still running after ``timeout``."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    # ------------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        while True:
            with self._wake:
                idle = not (self._waiting or self._job or self.running)
                if idle and self._stopping:
                    return
                if idle:
                    self._wake.wait(0.5)
                    continue
            try:
                self.iterate()
            except Exception as e:  # a failed forward pass: fail what is in flight, keep serving
                log.exception("engine iteration failed")
                self._fail_all(f"{type(e).__name__}: {e}")

    def iterate(self) -> None:
        """One iteration: drop cancelled requests, admit, one prefill pass, one decode step."""
        self._drop_cancelled()
        if self.config.prefill_in_decode:
            self._join_unfed()
        elif self._job is None:
            self._job = self._admit()
        if self._job is not None:
            self._prefill()
        if self.running:
            self._decode()
        self._account()

    def _account(self) -> None:
        job = self._job
        held = (job.seen.shape[1] if job.seen is not None else 0) if job else 0
        self.kv_tokens = self.cache.batch * self.cache.width + (len(job.requests) * held if job else 0)

    def _admit(self) -> _PrefillJob | None:
        """The next prefill job: the oldest waiting request, and the ones behind it while they fit; none while the
        job would stall running rows for fewer requests than the waiting-served ratio asks."""
        cfg, taken, width = self.config, [], 0
        rows = len(self.running)
        longest = max((cfg.kv_need(r.final_len) for r in self.running), default=0)
        with self._wake:
            for r in self._waiting:
                n = len(r.prompt_ids)
                if taken and (n > self.prefill_chunk or (len(taken) + 1) * max(n, width) > self.prefill_chunk):
                    break
                need = cfg.kv_need(r.final_len)
                if rows + 1 > cfg.max_batch or not self._fits(rows + 1, max(longest, need)):
                    break  # first come, first served: nothing overtakes a request that does not fit yet
                taken.append(r)
                rows, longest = rows + 1, max(longest, need)
                width = max(len(t.prompt_ids) for t in taken)
                if n > self.prefill_chunk:
                    break  # a long prompt goes through alone, chunk by chunk
            if not taken or len(taken) < self._fewest_to_admit():
                return None
            for _ in taken:
                self._waiting.popleft()
        self._steps_at_admission = self.steps
        for r in taken:
            self._prepare(r)
        ids, mask = left_pad([r.prompt_ids for r in taken])
        step = self.prefill_chunk if len(taken) == 1 else ids.shape[1]
        return _PrefillJob(taken, ids, mask, step, cache=self.cache.new_job(len(taken), ids.shape[1]))

    def _fewest_to_admit(self) -> int:
        """The requests a prefill pass must admit to start now (EngineConfig.waiting_served_ratio)."""
        cfg = self.config
        if not self.running or not cfg.waiting_served_ratio:
            return 1
        if cfg.max_waiting_steps is not None and self.steps - self._steps_at_admission >= cfg.max_waiting_steps:
            return 1
        return max(1, int(len(self.running) * cfg.waiting_served_ratio))

    def _join_unfed(self) -> None:
        """Prefill in the decode steps: waiting requests take free slots with no cache columns, and their prompts
        go through the next steps one token a step, beside the running rows' tokens. No prefill pass ever runs
        between two steps, so a running stream's gap is one step, whatever arrives; a prompt of n tokens takes n
        steps to its first token, each costing one row of a step."""
        joined = []
        with self._wake:
            while self._waiting and len(self.running) + len(joined) < self.config.max_batch:
                joined.append(self._waiting.popleft())
        for r in joined:
            self._prepare(r)
            r.pending = list(r.prompt_ids)
        if joined:
            self.cache.join_empty(len(joined))
            self.running += joined

    def _fits(self, rows: int, longest: int) -> bool:
        """The padded cache's budget; fixed slots hold their memory already (a free slot is all a row needs)."""
        return isinstance(self.cache, SlotCache) or rows * longest <= self.config.max_tokens_in_flight

    def _prepare(self, r: EngineRequest) -> None:
        r.sampler = _sampler(r.params)
        r.stops = self.session.stop_ids(None) | self.session.stop_ids(r.params.stop_token_ids)
        r.stream = TokenStream(self.session.tokenizer, 0, lambda row, token, text: setattr(r, "text", r.text + text))

    def _prefill(self) -> None:
        job, window = self._job, self.config.kv_window
        if window is not None and job.done >= window:
            # Past the window: one column per pass, the cache cut to the window first, as GenerationSession.prefill
            # does, so that every prompt token sees exactly its last kv_window tokens.
            job.cache, seen = self._window(job.cache, job.seen)
            end = job.done + 1
            mask = np.concatenate([seen, job.mask[:, job.done:end]], axis=1)
        else:
            end = min(job.done + job.step, job.ids.shape[1], window or job.ids.shape[1])
            mask = job.mask[:, :end]
        # Only the last position's logits of the last pass are sampled: a --logits-to-keep file computes those
        # alone; any other makes b rows x L tokens x vocab of them, left on the device (copying them all down
        # cost more than the pass).
        logits, job.cache = self.session.step(job.ids[:, job.done:end], mask, job.cache, logits_on_device=True,
                                              last_only=True)
        job.done, job.seen = end, mask
        if end < job.ids.shape[1]:
            return
        self._job = None
        tokens = _next_tokens(job.requests, self.cache.last_logits(logits))
        joining = []
        for i, (r, token) in enumerate(zip(job.requests, tokens)):
            if r.cancelled:
                self._finish(r, "cancelled")
            elif not self._push(r, token):
                joining.append(i)
        if joining:
            self.cache.merge(job.cache, job.seen, joining)
            self.running += [job.requests[i] for i in joining]

    def _decode(self) -> None:
        ids = np.array([[r.pending.pop(0) if r.pending else r.next_token] for r in self.running], dtype=np.int64)
        logits = self.cache.decode(ids, self._window)  # (B, V)
        self.steps += 1
        # A row still feeding its prompt samples nothing; the step that feeds its last prompt token gives its first.
        ready = [i for i, r in enumerate(self.running) if not r.pending]
        if len(ready) < len(self.running):  # only then: a copy of (B, V) logits costs per step with a large vocabulary
            logits = logits[ready]
        tokens = dict(zip(ready, _next_tokens([self.running[i] for i in ready], logits)))
        keep = [i for i, r in enumerate(self.running) if i not in tokens or not self._push(r, tokens[i])]
        if len(keep) < len(self.running):
            self.running = [self.running[i] for i in keep]
            self.cache.keep(keep)

    def _window(self, values: list, mask: np.ndarray) -> tuple[list, np.ndarray]:
        """The cache and mask for a step of one new column: cut to the rolling window, or as they are."""
        window = self.config.kv_window
        if window is None:
            return values, mask
        from ..runtime.window import trim_window

        return trim_window(values, mask, window, incoming=1, slack=self.config.window_slack,
                           device=self.session.device, device_id=self.session.device_id, cut=self.cache.ops.cut)

    def _push(self, r: EngineRequest, token: int) -> bool:
        """Add ``token`` to ``r`` and send what text is ready; True when ``r`` has finished (and was told)."""
        now = time.perf_counter()
        if r.first_token_at is None:
            r.first_token_at = now
            self.observer.first_token(now - r.arrival)
        else:
            self.observer.inter_token(now - r.last_token_at)
        r.last_token_at = now
        r.stream.push(token, r.stops)
        r.next_token = token
        if r.stream.done:
            r.text = r.stream.text()  # as GenerationSession's text (an unfinished character included)
            self._finish(r, "stop")
            return True
        cut = _find_stop(r.text, r.params.stop, r.emitted)
        if cut is not None:
            r.text = r.text[:cut]
            self._finish(r, "stop")
            return True
        if len(r.stream.ids) >= r.params.max_tokens:
            r.text = r.stream.text()
            self._finish(r, "length")
            return True
        ready = len(r.text) - _held_back(r.text, r.params.stop)
        if ready > r.emitted:
            r.on_event(Delta(r.text[r.emitted:ready]))
            r.emitted = ready
        return False

    def _finish(self, r: EngineRequest, reason: str, error: str | None = None) -> None:
        if reason not in ("cancelled", "error") and len(r.text) > r.emitted:
            r.on_event(Delta(r.text[r.emitted:]))
            r.emitted = len(r.text)
        completion = len(r.stream.ids) if r.stream else 0
        self.observer.finished("success" if reason in ("stop", "length") else reason, len(r.prompt_ids), completion)
        r.on_event(Finished(reason, len(r.prompt_ids), completion, r.text[:r.emitted], error))

    def _drop_cancelled(self) -> None:
        with self._wake:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            self._finish(r, "cancelled")
        if self._job is not None and all(r.cancelled for r in self._job.requests):
            for r in self._job.requests:
                self._finish(r, "cancelled")
            self._job = None
        keep = [i for i, r in enumerate(self.running) if not r.cancelled]
        if len(keep) < len(self.running):
            for r in self.running:
                if r.cancelled:
                    self._finish(r, "cancelled")
            self.running = [self.running[i] for i in keep]
            self.cache.keep(keep)

    def _fail_all(self, message: str) -> None:
        requests = self.running + (self._job.requests if self._job else [])
        self.running, self._job = [], None
        self.cache.keep([])
        for r in requests:
            self._finish(r, "error", message)
        self._account()


def check_form(config: EngineConfig, static_cache: int, path) -> None:
    """The settings that the export's cache form rules out (``static_cache``: its LMAX, 0 for a concatenating
    export), refused before any model is loaded: on Ray Serve the driver calls this, because a replica that fails
    in its constructor is started again and again instead of reporting once."""
    if config.kv_window is not None and static_cache:  # a rolling window cuts columns; static buffers keep them
        raise AlibiExportError(f"--kv-window does not apply to {str(path)!r}, a --static-cache export. Note: serve "
                               "the same model exported with --kv-cache alone")
    if config.prefill_in_decode and not static_cache:
        raise AlibiExportError(f"prefill in the decode steps needs fixed cache slots; {str(path)!r} is a --kv-cache "
                               "export. Note: serve the same model exported with --kv-cache --static-cache LMAX")
    if static_cache and min(static_cache, config.max_tokens_in_flight // config.max_batch) < 2:
        raise AlibiExportError(f"max_tokens_in_flight {config.max_tokens_in_flight} leaves fewer than 2 cache columns "
                               f"to each of {config.max_batch} slots. Note: raise it to at least {2 * config.max_batch}")


def _next_tokens(requests: list[EngineRequest], logits: np.ndarray) -> list[int]:
    """Each request's next token from its row of ``logits`` (B, V): one argmax for all greedy rows, each
    sampled row through its own generator."""
    greedy = logits.argmax(-1)
    return [int(greedy[i]) if r.sampler.greedy else int(r.sampler(logits[i:i + 1])[0])
            for i, r in enumerate(requests)]


def _sampler(p: SamplingParams) -> Sampler:
    """Temperature 0 is greedy (top_k and top_p then change nothing); top_p 1 keeps every token."""
    if p.temperature == 0:
        return Sampler(True, 1.0, None, None, p.seed)
    return Sampler(False, p.temperature, p.top_k, None if p.top_p == 1 else p.top_p, p.seed)


def _find_stop(text: str, stops: tuple[str, ...], emitted: int) -> int | None:
    """Where the first stop string starts in ``text`` (searching from just before what was sent), or None."""
    found = [i for s in stops for i in [text.find(s, max(0, emitted - len(s) + 1))] if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could begin a stop string (not sent yet)."""
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return held
