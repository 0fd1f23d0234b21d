"""The HTTP front end's ceiling: the real app over an engine that costs nothing but its step time.

On the H200 the continuous-batching engine made 10,370 tokens/s in process and 3,666 through the server
(BENCHMARKS, "Serving on the GPU"): the front end, not the model, was the limit. This tool measures that front end
alone. The server is the real app (``serve.app.create_app``: FastAPI, the per-request event queues, SSE chunks,
metrics) under uvicorn in its own process, over a stand-in engine that runs in a thread like the real one: each
step sleeps ``--step-ms`` (the GIL released, as ONNX Runtime releases it) and then gives one token to every
running request through the same callbacks. The load is tools/bench_serve.py's closed loop of streamed
completions. Each HTTP stack uvicorn can run (``h11`` + asyncio's loop, what the ``[serve]`` extra alone
installs; ``httptools`` + ``uvloop``, what ``uvicorn[standard]`` adds) is measured, alternated over rounds.

    python tools/bench_serve_frontend.py --clients 64 --requests 256 --max-tokens 64 --step-ms 6 --rounds 2
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import ROOT, out_path, write_record

STACKS = {"h11+asyncio": ("h11", "asyncio"), "httptools+uvloop": ("httptools", "uvloop")}


class StandInEngine:
    """What the app calls on an Engine (check, submit, wake, session.tokenizer, config.max_context), with a step
    that costs ``step_s`` of sleep and emits one token to every running request."""

    def __init__(self, step_s: float, max_batch: int, tokenizer, metrics):
        from alibi_export.serve.engine import EngineConfig

        self.step_s, self.max_batch, self.metrics = step_s, max_batch, metrics
        self.config = EngineConfig(max_batch=max_batch, max_queue=4096)
        self.session = type("Session", (), {"tokenizer": tokenizer})()
        self.waiting, self.running, self.lock = [], [], threading.Lock()
        self.steps = 0
        threading.Thread(target=self._loop, daemon=True).start()

    def check(self, ids, params):
        return list(ids)

    def submit(self, ids, params, on_event):
        from alibi_export.serve.engine import EngineRequest

        request = EngineRequest(ids, params, on_event)
        with self.lock:
            self.waiting.append(request)
        return request

    def wake(self):
        pass

    def _loop(self):
        from alibi_export.serve.engine import Delta, Finished

        while True:
            time.sleep(self.step_s)
            with self.lock:
                room = self.max_batch - len(self.running)
                self.running += self.waiting[:room]
                del self.waiting[:room]
            self.steps += 1
            keep = []
            for r in self.running:
                if r.cancelled:
                    r.on_event(Finished("cancelled", len(r.prompt_ids), r.emitted, ""))
                    continue
                r.emitted += 1
                now = time.perf_counter()  # the real engine's observer calls, on its thread
                if r.first_token_at is None:
                    r.first_token_at = now
                    self.metrics.first_token(now - r.arrival)
                else:
                    self.metrics.inter_token(now - r.last_token_at)
                r.last_token_at = now
                r.on_event(Delta(" x"))
                if r.emitted >= r.params.max_tokens:
                    self.metrics.finished("length", len(r.prompt_ids), r.emitted)
                    r.on_event(Finished("length", len(r.prompt_ids), r.emitted, " x" * r.emitted))
                else:
                    keep.append(r)
            self.running = keep


def serve(port: int, http: str, loop: str, step_ms: float, max_batch: int) -> None:
    import uvicorn
    from tokenizers import Tokenizer

    from alibi_export.serve.app import create_app
    from alibi_export.serve.metrics import ServeMetrics
    from alibi_export.shipped import default_model

    tokenizer = Tokenizer.from_file(str(default_model() / "tokenizer.json"))
    metrics = ServeMetrics()
    engine = StandInEngine(step_ms / 1e3, max_batch, tokenizer, metrics)
    app = create_app(engine, "stand-in", metrics)
    uvicorn.run(app, host="127.0.0.1", port=port, http=http, loop=loop, log_level="warning", lifespan="off",
                access_log=False)


def measure(stack: str, procs: int, client: str, args) -> dict:
    from bench_serve import free_port, run_load, summary, wait_until_healthy

    http, loop = STACKS[stack]
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tools"),
                                                                       os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--http", http, "--loop", loop,
                             "--step-ms", str(args.step_ms), "--clients", str(args.clients)],
                            stdout=log, stderr=log, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, url, log.name)
        prompts = ["It was a dark and stormy night"] * args.requests
        run_load(url, prompts[:8], 4, 8, None, client=client)  # warm-up
        server0 = _cpu_seconds(proc.pid)
        records, wall, spent = run_load(url, prompts, args.max_tokens, args.clients, None, procs, client=client)
        # which side was busy: a process near 1 CPU-second per second is a limit (one Python thread at a time)
        cpu = {"server_cpu_per_s": round((_cpu_seconds(proc.pid) - server0) / wall, 2),
               "client_cpu_per_s": round(spent / wall, 2)}
        return {"stack": stack, "client_procs": procs, "client": client, **summary(stack, wall, records), **cpu}
    finally:
        proc.terminate()
        proc.wait(30)


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a finder that refuses the name
        return False


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--http", help=argparse.SUPPRESS)
    ap.add_argument("--loop", help=argparse.SUPPRESS)
    ap.add_argument("--clients", type=int, default=64, help="Concurrent streams (also the stand-in's batch).")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--step-ms", type=float, default=6.0,
                    help="The stand-in engine's step (6 ms: the H200 engine's 10,370 tokens/s at 64 rows).")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--client-procs", default="1,2", help="Load-generator process counts to measure (comma list).")
    ap.add_argument("--client", default="raw,httpx",
                    help="Load-generator HTTP clients to measure (comma list of raw, httpx: tools/bench_serve.py).")
    ap.add_argument("--json", type=Path, help="Write the record here (default: $OUT/bench_serve_frontend.json).")
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve, args.http, args.loop, args.step_ms, args.clients)
    ceiling = 1e3 / args.step_ms * args.clients
    print(f"the stand-in engine's ceiling: {ceiling:,.0f} tokens/s ({args.clients} rows every {args.step_ms} ms)")
    stacks = [k for k, (http, loop) in STACKS.items() if all(map(_installed, (http, loop)))]
    for k in STACKS.keys() - set(stacks):
        print(f"skipped {k}: not installed")
    rows = []
    for r in range(args.rounds):
        for stack, procs, client in itertools.product(stacks, map(int, args.client_procs.split(",")),
                                                      args.client.split(",")):
            row = {"round": r, **measure(stack, procs, client, args)}
            rows.append(row)
            print(f"round {r} {stack}, {procs} {client} client process(es): {row['tokens_per_s']:,.0f} tokens/s, TTFT p99 {row['ttft_p99_ms']} ms, "
                  f"ITL p50 {row['itl_p50_ms']} ms, p99 {row['itl_p99_ms']} ms; CPU-s per s: server "
                  f"{row['server_cpu_per_s']}, client {row['client_cpu_per_s']}", flush=True)
    path = out_path("bench_serve_frontend.json", args.json)
    if path:
        write_record(path, {"engine_ceiling_tokens_per_s": ceiling, "clients": args.clients,
                            "requests": args.requests, "max_tokens": args.max_tokens, "step_ms": args.step_ms,
                            "rows": rows}, tool="bench_serve_frontend.py")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
