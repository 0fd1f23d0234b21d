"""Throughput against inter-token latency: the serving engine over a grid of --max-batch x --prefill-chunk.

Issue 21 asks the CPU server for two things at once: at least 3x the naive server's tokens/s at 16 clients,
and an inter-token latency (ITL) p99 of at most 2x the single-stream decode step. The two knobs that trade one
for the other are the rows decoded together (``--max-batch``: more rows, more tokens per step, a longer
step) and the prompt tokens per prefill pass (``--prefill-chunk``: a pass between two decode steps is a
stall in every running stream). This runs the continuous-batching engine in process (no HTTP, the closed
loop of tools/bench_serve.py's ``engine`` system) at each setting, and ``--max-batch 1`` as the naive
baseline, on one model and one prompt mix, so the frontier is measured in one run rather than argued.

Beside the grid it times the decode step alone at each batch size (the engine's fixed slots, every row at
the same context): when a step of B rows already costs more than 2x a step of one, no scheduling of
prefills can bring ITL p99 under 2x at B running streams.

usage: python tools/bench_serve_sweep.py [--random 1024x12] [--quantize int8] [--static-cache LMAX] [--lengths 16:512]
           [--max-tokens 64|16:48] [--requests 64] [--clients 16] [--max-batch 1,4,8,16] [--prefill-chunk 32,64,256]
           [--prefill-in-decode] [--waiting-served-ratio 0,1] [--max-waiting-steps N] [--contexts 48,300] [--rounds 2]
           [--threads 2] [--books test.txt] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from harness import out_path, write_record  # noqa: E402  (harness puts this checkout first on the path)

from bench_serve import BOOKS, engine_in_process, mixed_max_tokens, per_request, prompts_from_books


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not 0 <= v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers >= 0, got {text!r}")
    return values


def step_times(session, columns: int, batches: list[int], contexts: list[int], repeats: int = 12) -> list[dict]:
    """The decode step of B rows from the engine's fixed slots, every row holding ``context`` tokens, ms (median
    of ``repeats`` after 3 warm-up steps)."""
    import numpy as np

    from alibi_export.serve.slot_cache import SlotCache

    rng = np.random.default_rng(0)
    vocab = session.config.vocab_size
    rows = []
    for context in contexts:
        for b in batches:
            slots = SlotCache(session, max(batches), columns)
            ids, mask = rng.integers(1, vocab, (b, context)), np.ones((b, context), np.int64)
            _, job = session.step(ids, mask, slots.new_job(b, context), logits_on_device=True, last_only=True)
            slots.merge(job, mask)
            times = []
            for _ in range(repeats + 3):
                t = time.perf_counter()
                slots.decode(rng.integers(1, vocab, (b, 1)))
                times.append(time.perf_counter() - t)
            rows.append({"batch": b, "context": context, "step_ms": round(1e3 * float(np.median(times[3:])), 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", metavar="DxL", help="A random-weights model of the shipped architecture (default: "
                                                    "the shipped model).")
    ap.add_argument("--static-cache", type=int, default=2048, metavar="LMAX",
                    help="The export's static cache (the engine runs it from fixed slots).")
    ap.add_argument("--lengths", default="16:512", help="Prompt lengths in tokens, LOW:HIGH (uniform).")
    ap.add_argument("--max-tokens", default="64",
                    help="New tokens per request: N, or LOW:HIGH for each request its own (uniform, seeded).")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16, help="Closed-loop clients (requests in the system).")
    ap.add_argument("--max-batch", type=_ints, default=[4, 8, 16], help="Engine batch sizes (1 always runs).")
    ap.add_argument("--prefill-chunk", type=_ints, default=[32, 64, 256], help="Prompt tokens per prefill pass.")
    ap.add_argument("--prefill-in-decode", action="store_true",
                    help="Also each --max-batch with serve --prefill-in-decode (rows with prefill_chunk 0): prompts go "
                         "through the decode steps, one token a step, and no prefill pass runs between steps.")
    ap.add_argument("--contexts", type=_ints, default=[48, 300], help="Contexts of the decode-step timing.")
    ap.add_argument("--rounds", type=int, default=2, help="Passes over the grid, alternately forwards and backwards; "
                                                          "the rows report each setting's median.")
    ap.add_argument("--quantize", choices=["int8", "int4", "dynamic-u8s8", "dynamic-u8u8"],
                    help="Serve a quantized file: int8/int4 are the export's forms (MatMulNBits); dynamic-u8s8 and "
                         "dynamic-u8u8 are ONNX Runtime's quantize_dynamic over the float32 export (MatMulInteger), "
                         "NOT export forms (issue 19 rejected them for accuracy on AVX2 CPUs), measured for the "
                         "record: on AMX CPUs their batched products are far cheaper.")
    ap.add_argument("--waiting-served-ratio", type=_floats, default=[0.0],
                    help="serve --waiting-served-ratio values, a grid axis (0: a prefill pass whenever one fits).")
    ap.add_argument("--max-waiting-steps", type=int, help="serve --max-waiting-steps, with the ratios above 0.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--books", type=Path, default=BOOKS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import numpy as np

    from alibi_export import load
    from alibi_export.export.onnx import export_onnx
    from alibi_export.runtime.generate import GenerationSession
    from alibi_export.shipped import default_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-sweep-"))
    if args.random:
        from tools.bench_cpu import large_model

        checkpoint = load(large_model(tmp / "ckpt", args.random))
    else:
        checkpoint = load(default_model())
    shipped_form = args.quantize in ("int8", "int4")
    path = export_onnx(checkpoint, tmp / "model-static.onnx", kv_cache=True, logits_to_keep=True,
                       static_cache=args.static_cache, quantize=args.quantize if shipped_form else None).path
    if args.quantize and not shipped_form:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        weights = QuantType.QInt8 if args.quantize == "dynamic-u8s8" else QuantType.QUInt8
        quantize_dynamic(str(path), str(tmp / "model-dynamic.onnx"), weight_type=weights,
                         op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
        path = tmp / "model-dynamic.onnx"
    session = GenerationSession(path, threads=args.threads)
    low, high = map(int, args.lengths.split(":"))
    prompts = prompts_from_books(session, args.books, args.requests, low, high)
    max_tokens = mixed_max_tokens(args.max_tokens, args.requests)
    single = session.generate_ids([prompts[0]], max(per_request(max_tokens, args.requests)),
                                  stop_tokens=[]).decode_ms_per_step
    print(f"single-stream decode step: {single:.2f} ms (GenerationSession, batch 1)", flush=True)
    steps = step_times(session, args.static_cache, sorted({1, *args.max_batch}), args.contexts)
    budget = args.clients * args.static_cache
    grid = [(1, max(args.prefill_chunk), 0.0)] + [(b, c, w) for b in args.max_batch if b > 1
                                                   for c in args.prefill_chunk for w in args.waiting_served_ratio]
    if args.prefill_in_decode:  # chunk 0 in the rows: serve --prefill-in-decode (prompts through the steps)
        grid += [(b, 0, 0.0) for b in args.max_batch if b > 1]
    runs = {setting: [] for setting in grid}
    for r in range(args.rounds):
        # Odd rounds run the grid backwards: this 2-core VM's speed drifts by tens of percent over minutes, which
        # one pass in a fixed order would charge to the settings that come last.
        for max_batch, chunk, ratio in (grid if r % 2 == 0 else grid[::-1]):
            row = engine_in_process(session, prompts, max_tokens, args.clients, chunk or 64, budget,
                                    max_batch=max_batch, prefill_in_decode=chunk == 0, waiting_served_ratio=ratio,
                                    max_waiting_steps=args.max_waiting_steps if ratio else None)
            row.update(round=r, max_batch=max_batch, prefill_chunk=chunk, waiting_served_ratio=ratio,
                       itl_p50_over_single_step=round(row["itl_p50_ms"] / single, 2),
                       itl_p99_over_single_step=round(row["itl_p99_ms"] / single, 2))
            runs[(max_batch, chunk, ratio)].append(row)
            print(json.dumps({k: row[k] for k in ("round", "max_batch", "prefill_chunk", "waiting_served_ratio",
                                                  "tokens_per_s", "ttft_p50_ms",
                                                  "itl_p50_over_single_step", "itl_p99_over_single_step",
                                                  "mean_batch")}), flush=True)

    def median(setting, key):
        return round(float(np.median([row[key] for row in runs[setting]])), 2)

    keys = ("tokens_per_s", "ttft_p50_ms", "itl_p50_over_single_step", "itl_p99_over_single_step")
    rows = [{"max_batch": b, "prefill_chunk": c, "waiting_served_ratio": w, **{k: median((b, c, w), k) for k in keys}}
            for b, c, w in grid]
    naive = rows[0]["tokens_per_s"]
    for row in rows:  # medians over the rounds; each round's own rows are kept under "runs"
        row["over_naive"] = round(row["tokens_per_s"] / naive, 2)
        row["meets_both"] = row["over_naive"] >= 3 and row["itl_p99_over_single_step"] <= 2
    results = {"model": args.random or "alibi-small (shipped)", "quantize": args.quantize,
               "static_cache": args.static_cache,
               "lengths": args.lengths, "max_tokens": args.max_tokens, "requests": args.requests,
               "clients": args.clients, "threads": args.threads, "single_stream_step_ms": round(single, 3),
               "max_waiting_steps": args.max_waiting_steps, "rounds": args.rounds, "decode_steps": steps, "rows": rows,
               "runs": [row for setting in grid for row in runs[setting]]}
    print("max_batch chunk ratio  tokens/s  x naive  ITL p50 x  ITL p99 x  TTFT p50 ms")
    for row in rows:
        print(f"{row['max_batch']:9d} {row['prefill_chunk']:5d} {row['waiting_served_ratio']:5.2f} "
              f"{row['tokens_per_s']:9.1f} {row['over_naive']:8.2f} "
              f"{row['itl_p50_over_single_step']:10.2f} {row['itl_p99_over_single_step']:10.2f} "
              f"{row['ttft_p50_ms']:12.0f}")
    out = out_path("bench_serve_sweep.json", args.json)
    if out:
        write_record(out, results, tool="bench_serve_sweep.py")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
