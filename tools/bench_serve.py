"""Load generator for `alibi-export serve`: continuous batching against the naive server and static batching.

Three systems, the same prompts (books test split, mixed lengths) and the same max_tokens:
  continuous  the server (`python -m alibi_export serve`, a real process) with --max-batch CLIENTS
  naive       the same server with --max-batch 1: one request at a time
  static      GenerationSession.generate over batches of arrivals (in process): a batch starts when the
              previous one has finished, and runs until its longest request is done
  engine      (only when named in --systems) the continuous-batching engine in process, without HTTP,
              closed loop: the server's own cost, and the engine's time per phase
  engine-holes  (only when named) the engine on a static-cache export with its slots left where they are
              when a row leaves (no move of the last row into the hole): what running free slots costs

With --static-cache LMAX the same model is also exported with a static cache (GroupQueryAttention over buffers
updated in place, served from fixed slots), and every system runs on both forms, one after the other. With
--random and --provider cuda the static export takes the cuda target's options too: the folded static form
(--attention onnx, fp16), the one whose GroupQueryAttention runs on ONNX Runtime's CUDA kernel.

Two loads: closed loop (CLIENTS clients, each sending its next request when the last one finished) and,
with --rate, open loop (Poisson arrivals at RATE requests/s). Reported per system: generated tokens/s,
time to first token p50/p99, inter-token latency p50/p99 (measured by the client, between streamed
chunks), and the single-stream decode step time (GenerationSession, batch 1) that the ITL target is
stated against. Requests ignore no end-of-text token: a greedy request may stop early, on every system alike.

With --provider cuda the servers and the static system run ONNX Runtime's CUDA provider; --random then
exports the cuda target's KV-cache form (onnx attention, ORT fusions, fp16), as issue 21's GPU figures need.
The record goes through tools/harness.py (--json FILE, else $OUT/bench_serve.json on the GPU machine).

The load generator is a bare asyncio HTTP/1.1 client by default (``--client raw``): on a small machine it shares
the cores with the server it measures, and httpx (``--client httpx``) costs about six times its CPU per streamed
token (tools/bench_serve_frontend.py). ``--max-batch`` sets the continuous server's rows apart from --clients
(tools/bench_serve_sweep.py maps the whole grid in process).

usage: python tools/bench_serve.py [--model X.onnx | --random 1024x12] [--static-cache LMAX] [--provider cpu|cuda] [--clients 16]
                                   [--max-batch B] [--requests 48] [--max-tokens 64|16:48] [--lengths 16:512] [--rate 8]
                                   [--threads 2] [--books test.txt] [--prefill-chunk N] [--prefill-in-decode] [--client raw|httpx]
                                   [--waiting-served-ratio R] [--max-waiting-steps N] [--spin] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, out_path, write_record  # noqa: E402  (harness puts this checkout first on the path)

BOOKS = ROOT.parent / "shared" / "data" / "books" / "test.txt"


def prompts_from_books(session, path: Path, n: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    if not path.is_file():
        raise SystemExit(f"Error: no prompt text at {path}. Note: pass --books FILE (a plain-text file)")
    text = path.read_text()[:2_000_000]
    rng = np.random.default_rng(seed)
    ids = session.tokenizer.encode(text[: 400_000]).ids
    out = []
    for length in rng.integers(low, high + 1, n):
        start = int(rng.integers(0, len(ids) - length))
        out.append(ids[start:start + int(length)])
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summary(name: str, wall: float, records: list[dict]) -> dict:
    ttft = [r["ttft"] for r in records]
    itl = [g for r in records for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in records)
    return {"system": name, "requests": len(records), "generated_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_ms": round(1e3 * percentile(ttft, 50), 2), "ttft_p99_ms": round(1e3 * percentile(ttft, 99), 2),
            "itl_p50_ms": round(1e3 * percentile(itl, 50), 2), "itl_p99_ms": round(1e3 * percentile(itl, 99), 2)}


# ----------------------------------------------------------------------------- the server systems
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(proc, url: str, log: str, seconds: float = 120) -> None:
    """Return once the server process answers /health with 200; exit with its log if it dies or never does."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {Path(log).read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


class Server:
    def __init__(self, model: Path, max_batch: int, threads: int, max_context: int, provider: str,
                 prefill_chunk: int, budget: int, prefill_in_decode: bool = False, waiting_served_ratio: float = 0.0,
                 max_waiting_steps: int | None = None, spin: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
        path = [str(ROOT), os.environ.get("PYTHONPATH")]  # the GPU machine's staged packages stay on the path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
        self.proc = subprocess.Popen([sys.executable, "-m", "alibi_export", "serve", str(model), "--port",
                                      str(self.port), "--max-batch", str(max_batch), "--threads", str(threads),
                                      "--max-context", str(max_context), "--queue", "1024", "--provider", provider,
                                      "--prefill-chunk", str(prefill_chunk),
                                      # every admitted row may hold a full context: the batch, not the KV
                                      # budget, is what limits admission here
                                      "--max-tokens-in-flight", str(budget),
                                      *(["--prefill-in-decode"] if prefill_in_decode else []),
                                      *(["--waiting-served-ratio", str(waiting_served_ratio)]
                                        if waiting_served_ratio else []),
                                      *(["--max-waiting-steps", str(max_waiting_steps)] if max_waiting_steps else []),
                                      *(["--spin"] if spin else [])],
                                     stdout=self.log, stderr=self.log, env=env)
        wait_until_healthy(self.proc, self.url, self.log.name)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


async def one_request(client, url: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion through httpx (``--client httpx``): the reference client."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            got = _server_event(line, stamps)
            tokens = tokens if got is None else got
    return _request_record(t0, stamps, tokens)


def _server_event(event: str | bytes, stamps: list) -> int | None:
    """One server-sent event of a streamed completion: a time stamp for a chunk that carries text; the completion
    tokens of the closing usage chunk (None for any other event)."""
    prefix = "data: " if isinstance(event, str) else b"data: "
    if not event.startswith(prefix) or event[6:] in ("[DONE]", b"[DONE]"):
        return None
    chunk = json.loads(event[6:])
    if chunk.get("usage"):
        return chunk["usage"]["completion_tokens"]
    if chunk["choices"] and chunk["choices"][0]["text"]:
        stamps.append(time.perf_counter())
    return None


def _request_record(t0: float, stamps: list, tokens: int) -> dict:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": (stamps[0] if stamps else time.perf_counter()) - t0, "gaps": gaps, "tokens": tokens}


async def one_request_raw(url: str, prompt: list[int], max_tokens: int) -> dict:
    """The same request over a bare asyncio connection (``--client raw``, the default): HTTP/1.1 written and
    its chunked answer read by hand, each server-sent event parsed as httpx's path parses it.

    Why: on a 2-core machine the load generator shares the cores with the server it measures, and httpx's
    layers cost it about a core at 3,000 streamed tokens/s (tools/bench_serve_frontend.py); what the client
    spends is taken from the server. Same answers, same time stamps (one per chunk that carries text)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request + body)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {(await reader.read(2000)).decode(errors='replace')[:300]}")
        chunked = b"transfer-encoding: chunked" in head.lower()
        pending = b""
        while True:
            if chunked:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    break
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
            pending += data
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                got = _server_event(event, stamps)
                tokens = tokens if got is None else got
    finally:
        writer.close()
    return _request_record(t0, stamps, tokens)


def per_request(max_tokens, n: int) -> list[int]:
    """``max_tokens`` for each of ``n`` requests: one number for all, or a list of each one's own."""
    return [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)


def mixed_max_tokens(spec: str, n: int, seed: int = 2) -> int | list[int]:
    """``--max-tokens``: "N" for every request, or "LOW:HIGH", each request's own, uniform and seeded (the same
    list for every system of a run)."""
    if ":" not in spec:
        return int(spec)
    import numpy as np

    low, high = map(int, spec.split(":"))
    return np.random.default_rng(seed).integers(low, high + 1, n).tolist()


async def drive(url: str, prompts, max_tokens, clients: int, rate: float | None, seed: int = 1,
                client: str = "raw"):
    """Closed loop (``clients`` workers) or, with ``rate``, Poisson arrivals; the records and the wall time.
    ``max_tokens``: one number, or each prompt's own (``per_request``)."""
    import contextlib

    import numpy as np

    async with contextlib.AsyncExitStack() as stack:
        if client == "httpx":
            import httpx

            limits = httpx.Limits(max_connections=len(prompts) + clients)
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=600, limits=limits))

            def one(request):
                return one_request(http, url, *request)
        else:
            def one(request):
                return one_request_raw(url, *request)
        requests = list(zip(prompts, per_request(max_tokens, len(prompts))))
        t0 = time.perf_counter()
        if rate is None:
            queue = list(requests)

            async def worker():
                out = []
                while queue:
                    out.append(await one(queue.pop(0)))
                return out

            records = [r for rs in await asyncio.gather(*(worker() for _ in range(clients))) for r in rs]
        else:
            gaps = np.random.default_rng(seed).exponential(1 / rate, len(prompts))

            async def later(delay, request):
                await asyncio.sleep(delay)
                return await one(request)

            records = await asyncio.gather(*(later(float(d), r) for d, r in zip(np.cumsum(gaps), requests)))
        return list(records), time.perf_counter() - t0


def _client_process(url, prompts, max_tokens, clients, rate, seed, client, ready, start, results):
    __import__("httpx" if client == "httpx" else "asyncio")  # imported before the start: import time is not load

    ready.release()
    start.wait()
    cpu = time.process_time()
    records, wall = asyncio.run(drive(url, prompts, max_tokens, clients, rate, seed, client))
    results.put((records, wall, time.process_time() - cpu))


def run_load(url: str, prompts, max_tokens, clients: int, rate: float | None, procs: int = 1,
             seed: int = 1, client: str = "raw"):
    """``drive`` from ``procs`` processes, each with its share of the prompts and clients (open loop: a Poisson
    process of rate / procs each, whose sum is Poisson at ``rate``); the records, the wall time, and the CPU
    seconds the load generator spent meanwhile (all its processes, their start-up excluded).

    Why processes: one Python process parsing the streamed chunks of many clients is itself a limit. Measured
    with tools/bench_serve_frontend.py on the 2-core CPU: at 64 streams the load generator's process used
    0.97-0.98 CPU-seconds per second (saturated) while the server used 0.2-0.3, at 2,800-3,300 tokens/s."""
    if procs <= 1:
        cpu = time.process_time()
        records, wall = asyncio.run(drive(url, prompts, max_tokens, clients, rate, seed, client))
        return records, wall, time.process_time() - cpu
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ready, start, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_client_process, daemon=True,
                           args=(url, list(prompts[k::procs]), per_request(max_tokens, len(prompts))[k::procs],
                                 max(1, clients // procs),
                                 rate / procs if rate else None, seed + k, client, ready, start, results))
               for k in range(procs)]
    for w in workers:
        w.start()
    for _ in workers:
        ready.acquire()
    start.set()
    t0 = time.perf_counter()
    parts = [results.get() for _ in workers]
    wall = time.perf_counter() - t0
    for w in workers:
        w.join()
    return [r for records, _, _ in parts for r in records], wall, sum(cpu for _, _, cpu in parts)


# ----------------------------------------------------------------------------- static batching
def static_batching(session, prompts, max_tokens, clients: int, rate: float | None, seed: int = 1):
    """Batches of arrivals through GenerationSession.generate_ids: closed loop, ``clients`` prompts per batch;
    open loop, whatever has arrived when the previous batch ends (at most ``clients``). With each request's own
    max_tokens a batch runs to its longest; a row's tokens past its own count are computed and not counted."""
    limits = per_request(max_tokens, len(prompts))
    import numpy as np

    arrivals = (np.cumsum(np.random.default_rng(seed).exponential(1 / rate, len(prompts))) if rate
                else np.zeros(len(prompts)))
    records, i, t0 = [], 0, time.perf_counter()
    while i < len(prompts):
        now = time.perf_counter() - t0
        if arrivals[i] > now:
            time.sleep(arrivals[i] - now)
            now = arrivals[i]
        j = i + 1
        while j < len(prompts) and j - i < clients and arrivals[j] <= now:
            j += 1
        if rate is None:
            j = min(i + clients, len(prompts))
        stamps = {k: [] for k in range(j - i)}
        start = time.perf_counter()
        result = session.generate_ids(prompts[i:j], max(limits[i:j]),
                                      on_token=lambda row, tok, text: stamps[row].append(time.perf_counter()))
        for k in range(j - i):
            s = stamps[k][:limits[i + k]]
            waited = start - t0 - arrivals[i + k] if rate else start - t0 - 0  # closed loop: all queued at 0
            records.append({"ttft": waited + (s[0] - start if s else 0.0), "gaps": [b - a for a, b in zip(s, s[1:])],
                            "tokens": min(len(result.token_ids[k]), limits[i + k])})
        i = j
    return records, time.perf_counter() - t0


# ----------------------------------------------------------------------------- the engine alone
def engine_in_process(session, prompts, max_tokens, clients: int, chunk: int, budget: int,
                      move_rows: bool = True, max_batch: int | None = None, prefill_in_decode: bool = False,
                      waiting_served_ratio: float = 0.0, max_waiting_steps: int | None = None):
    """The continuous-batching engine without HTTP, closed loop of ``clients`` (closed loop only): what the
    server's own overhead costs, and where the engine's time goes (seconds per phase, wall-clock; ONNX
    Runtime's runs end synchronized, so a phase's time includes its device work)."""
    import collections

    from alibi_export.serve.engine import Delta, Engine, EngineConfig, Finished, SamplingParams

    limits = per_request(max_tokens, len(prompts))
    max_context = max(len(p) for p in prompts) + max(limits) + 1
    engine = Engine(session, EngineConfig(max_batch=max_batch or clients, max_tokens_in_flight=budget,
                                          max_queue=len(prompts) + clients, prefill_chunk=chunk,
                                          max_context=max_context, prefill_in_decode=prefill_in_decode,
                                          waiting_served_ratio=waiting_served_ratio,
                                          max_waiting_steps=max_waiting_steps))
    if not move_rows:
        engine.cache.move_rows = False
    phases = collections.Counter()

    def timed(name, fn):
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] += time.perf_counter() - t
        return run

    cache = engine.cache
    cache.merge, cache.keep, cache.last_logits = (timed("join (merge)", cache.merge), timed("leave (keep)", cache.keep),
                                                  timed("last logits", cache.last_logits))
    engine._prefill, engine._decode = timed("prefill pass", engine._prefill), timed("decode step", engine._decode)
    session.step = timed("model forward", session.step)  # an instance attribute over the method; removed below
    queue, done, records, batches = list(zip(prompts, limits)), [], [], []

    def submit(request):
        prompt, max_tokens = request
        rec = {"t0": time.perf_counter(), "stamps": [], "tokens": 0}

        def on_event(event):
            if isinstance(event, Delta) and event.text:
                rec["stamps"].append(time.perf_counter())
            elif isinstance(event, Finished):
                rec["tokens"] = event.completion_tokens
                done.append(rec)
        engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), on_event)

    try:
        t0 = time.perf_counter()
        for _ in range(min(clients, len(queue))):
            submit(queue.pop(0))
        while len(done) < len(prompts):
            finished = len(done)
            engine.iterate()
            batches.append(engine.batch_size)
            for _ in range(len(done) - finished):
                if queue:
                    submit(queue.pop(0))
        wall = time.perf_counter() - t0
    finally:
        del session.step
    records = [{"ttft": (r["stamps"][0] if r["stamps"] else wall) - r["t0"],
                "gaps": [b - a for a, b in zip(r["stamps"], r["stamps"][1:])], "tokens": r["tokens"]} for r in done]
    row = summary("engine", wall, records)
    row["iterations"], row["decode_steps"] = len(batches), engine.steps
    row["mean_batch"] = round(sum(batches) / max(len(batches), 1), 1)
    row["packs"], row["moves"] = getattr(cache, "packs", None), getattr(cache, "moves", None)
    row["phases_s"] = {k: round(v, 3) for k, v in phases.most_common()}
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="A --kv-cache export (default: the shipped model, cached export).")
    ap.add_argument("--random", metavar="DxL", help="Instead, a random-weights model of the shipped architecture, "
                                                    "d_model x layers (e.g. 1024x12), exported to a temp folder.")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48, help="Requests per system and load.")
    ap.add_argument("--max-batch", type=int,
                    help="The continuous server's and the engine's --max-batch (default: --clients): fewer rows per "
                         "step than clients trade throughput for inter-token latency; the others wait in the queue.")
    ap.add_argument("--max-tokens", default="64",
                    help="New tokens per request: N, or LOW:HIGH for each request its own (uniform, seeded).")
    ap.add_argument("--lengths", default="16:512", help="Prompt lengths in tokens, LOW:HIGH (uniform).")
    ap.add_argument("--rate", type=float, help="Also an open loop of Poisson arrivals at RATE requests/s.")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (servers and static).")
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"],
                    help="ONNX Runtime provider of the servers and the static system; with --random, cuda exports "
                         "the cuda target's form (--attention onnx --ort-fusions --dtype float16).")
    ap.add_argument("--books", type=Path, default=BOOKS, help="Plain text the prompts are cut from.")
    ap.add_argument("--prefill-chunk", type=int,
                    help="The servers' and the engine's prompt tokens per prefill pass (rows x padded length; "
                         "default: the server's own on cpu, 64 (serve.engine.PREFILL_CHUNK); 16384 on cuda, which "
                         "prefills hundreds of thousands of tokens/s: 32 prompts of 512 in one pass).")
    ap.add_argument("--prefill-in-decode", action="store_true",
                    help="The continuous server and the engine feed prompts through the decode steps (serve "
                         "--prefill-in-decode); needs --static-cache, and runs that form only.")
    ap.add_argument("--waiting-served-ratio", type=float, default=0.0,
                    help="The continuous server's and the engine's serve --waiting-served-ratio: while rows run, a "
                         "prefill pass starts only when it admits at least R x the running requests.")
    ap.add_argument("--max-waiting-steps", type=int, help="Their serve --max-waiting-steps.")
    ap.add_argument("--spin", action="store_true",
                    help="Both servers with serve --spin (ONNX Runtime's threads spin-wait; the servers' default is "
                         "threads that sleep). The in-process systems keep ONNX Runtime's default, spinning.")
    ap.add_argument("--static-cache", type=int, metavar="LMAX",
                    help="Also export the model with --static-cache LMAX and run every system on both forms.")
    ap.add_argument("--every-logits", action="store_true",
                    help="Also the same model exported without --logits-to-keep (its prefill computes every "
                         "position's logits) and run every system on both forms.")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="Load-generator processes the clients are split over (one Python process saturates at a "
                         "few thousand streamed tokens/s: tools/bench_serve_frontend.py).")
    ap.add_argument("--client", default="raw", choices=["raw", "httpx"],
                    help="The load generator's HTTP client: raw asyncio streams (lean: it shares the cores with the "
                         "server) or httpx (the reference; about a core at 3,000 streamed tokens/s).")
    ap.add_argument("--systems", default="continuous,naive,static")
    ap.add_argument("--json", type=Path, help="Write the record here (default: $OUT/bench_serve.json if $OUT).")
    args = ap.parse_args()

    from alibi_export.runtime.generate import GenerationSession
    from alibi_export.serve.model_cache import shipped_kv_export

    if args.random:
        from alibi_export import load
        from alibi_export.export.onnx import export_onnx
        from tools.bench_cpu import large_model

        from alibi_export.export.targets import TARGETS

        tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
        options = TARGETS["cuda"] if args.provider == "cuda" else {}
        t = time.perf_counter()
        checkpoint = load(large_model(tmp / "ckpt", args.random))
        model = export_onnx(checkpoint, tmp / f"random-{args.random}.onnx", kv_cache=True, logits_to_keep=True,
                            **options).path
        print(f"exported {model.name} ({options or 'defaults'}) in {time.perf_counter() - t:.0f} s", flush=True)
    else:
        model = args.model or shipped_kv_export()
        options = {}
    forms = [("concat", model)]
    if (args.every_logits or args.static_cache) and args.model:
        raise SystemExit("Error: --every-logits and --static-cache export the shipped model or --random. Note: drop "
                         "--model, or export the twins yourself")
    if args.every_logits or args.static_cache:
        from alibi_export import load
        from alibi_export.export.onnx import export_onnx
        from alibi_export.shipped import default_model

        # the twins' weights: the random checkpoint (with the concat export's options: on cuda the folded form in
        # float16) or the shipped model, loaded once
        source = checkpoint if args.random else load(default_model())
    if args.every_logits:
        tmp = Path(tempfile.mkdtemp(prefix="bench-serve-every-"))
        every = export_onnx(source, tmp / f"{model.stem}-every.onnx", kv_cache=True, **options).path
        forms.append(("concat-every", every))
    if args.static_cache:
        tmp = Path(tempfile.mkdtemp(prefix="bench-serve-static-"))
        t = time.perf_counter()
        static = export_onnx(source, tmp / f"{model.stem}-static.onnx", kv_cache=True, logits_to_keep=True,
                             static_cache=args.static_cache, **options).path
        print(f"exported {static.name} (--static-cache {args.static_cache}, {options or 'defaults'}) in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        forms.append(("static", static))
    if args.prefill_in_decode:
        if not args.static_cache:
            raise SystemExit("Error: --prefill-in-decode serves fixed slots. Note: add --static-cache LMAX")
        forms = [(form, path) for form, path in forms if form == "static"]
    sessions = {form: GenerationSession(path, provider=args.provider, threads=args.threads) for form, path in forms}
    session = sessions[forms[0][0]]
    from alibi_export.serve.engine import PREFILL_CHUNK

    chunk = args.prefill_chunk or (16384 if args.provider == "cuda" else PREFILL_CHUNK["cpu"])
    low, high = map(int, args.lengths.split(":"))
    prompts = prompts_from_books(session, args.books, args.requests, low, high)
    max_tokens = mixed_max_tokens(args.max_tokens, args.requests)
    longest = max(per_request(max_tokens, args.requests))
    max_context = high + longest + 1
    steps_ms = {}
    for form, s in sessions.items():
        single = s.generate_ids([prompts[0]], longest, stop_tokens=[])
        steps_ms[form] = single.decode_ms_per_step
        print(f"single-stream decode step, {form}: {steps_ms[form]:.2f} ms (batch 1, prompt {len(prompts[0])} tokens)")
    loads = [("closed", None)] + ([("poisson", args.rate)] if args.rate else [])
    schedule = {"waiting_served_ratio": args.waiting_served_ratio, "max_waiting_steps": args.max_waiting_steps}
    rows = []
    for system in args.systems.split(","):
        for form, path in forms:
            session, step_ms = sessions[form], steps_ms[form]
            # The padded cache is budgeted per row x width; the slots are allocated up front: LMAX columns each.
            per_row = args.static_cache if form == "static" else max_context
            server = None
            if system in ("continuous", "naive"):
                batch = (args.max_batch or args.clients) if system == "continuous" else 1
                server = Server(path, batch, args.threads, max_context, args.provider, chunk, batch * per_row,
                                prefill_in_decode=args.prefill_in_decode and system == "continuous",
                                spin=args.spin, **(schedule if system == "continuous" else {}))
                run_load(server.url, prompts[:2], 4, 2, None, client=args.client)  # warm-up
            try:
                if system.startswith("engine"):
                    if system == "engine-holes" and form != "static":
                        continue
                    row = {"load": "closed", "form": form, **engine_in_process(
                        session, prompts, max_tokens, args.clients, chunk, args.clients * per_row,
                        move_rows=system != "engine-holes", max_batch=args.max_batch,
                        prefill_in_decode=args.prefill_in_decode, **schedule)}
                    row["system"] = system
                    row["itl_p99_over_single_step"] = round(row["itl_p99_ms"] / step_ms, 2)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                for kind, rate in loads:
                    if server:
                        records, wall, cpu = run_load(server.url, prompts, max_tokens, args.clients, rate,
                                                      args.client_procs, client=args.client)
                    else:
                        (records, wall), cpu = static_batching(session, prompts, max_tokens, args.clients,
                                                               rate), None
                    row = {"load": kind, "form": form, **summary(system, wall, records)}
                    if cpu is not None:  # what the load generator took from the cores it shares with the server
                        row["load_generator_cpu_s_per_s"] = round(cpu / wall, 3)
                    row["itl_p99_over_single_step"] = round(row["itl_p99_ms"] / step_ms, 2)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                if server:
                    server.stop()
    by = {(r["system"], r["form"], r["load"]): r for r in rows}
    ratios = {f"{form}/{load}": round(by[("continuous", form, load)]["tokens_per_s"]
                                      / by[("naive", form, load)]["tokens_per_s"], 2)
              for form, _ in forms for load, _ in loads
              if ("continuous", form, load) in by and ("naive", form, load) in by}
    print(f"continuous / naive tokens/s: {ratios}")
    results = {"provider": args.provider, "ort_providers": session.session.get_providers(), "model": str(model.name),
               "random": args.random, "static_cache": args.static_cache,
               "single_stream_step_ms": {f: round(v, 3) for f, v in steps_ms.items()}, "clients": args.clients,
               "max_batch": args.max_batch or args.clients,
               "requests": args.requests, "max_tokens": max_tokens if isinstance(max_tokens, int) else args.max_tokens,
               "lengths": args.lengths, "rate": args.rate,
               "threads": args.threads, "prefill_chunk": chunk, "prefill_in_decode": args.prefill_in_decode,
               **schedule, "spin": args.spin,
               "client_procs": args.client_procs, "client": args.client,
               "rows": rows, "continuous_over_naive": ratios}
    path = out_path("bench_serve.json", args.json)
    if path:
        write_record(path, results, tool="bench_serve.py")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
