"""The rolling KV window (``--kv-window W``) on a long stream: what it costs in perplexity, and whether the
decode time and memory per token stay flat (issue 22, section 2).

- ``ppl``: perplexity of the books test split at evaluation lengths of 16x, 32x, 64x the training length
  L, with the full context and with windows of W = 1, 2, 4, 8 x L (PyTorch, ``TorchRunner(kv_window=W)``:
  the banded blocks that tests/test_window.py proves equal to token-by-token decoding).
- ``decode``: one ONNX Runtime session (CPU, or CUDA with ``--provider cuda``) over a KV-cache export; the stream (the same text) is fed through
  the rolling cache, and at each probe length the cache and mask are kept. Then single-token steps (the
  window's cut included) are timed from every kept state in interleaved rounds (medians), and the
  process's resident memory is read at each probe while the stream grows. The full cache runs the same
  way up to ``--full-max`` tokens (its steps grow with the stream). On CUDA the cache stays on the GPU (the
  kept states too), and the memory read is the GPU's, the process's share that ``nvidia-smi`` reports (ONNX
  Runtime's arena keeps what it once held, so it shows growth, never a fall).

Usage (repo root): PYTHONPATH=. python tools/bench_kv_window.py [ppl|decode|all] [--model DIR]
  [--text FILE] [--tokens N | --spread K] [--multiples 16,32,64] [--windows 1,2,4,8] [--probes 4096,...]
  [--full-max 16384] [--rounds 15] [--threads 1] [--provider cpu|cuda] [--dtype float32|float16] [--json FILE]
Defaults: the shipped alibi-small; the books test split at ../shared (beside the repository, as for /work/main)
when present, else the shipped excerpt (its opening, 55k tokens): pass --text for a worktree elsewhere.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import out_path, write_record

from alibi_export import shipped
from alibi_export.data import encode_text, read_text

BOOKS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "books" / "test.txt"  # ../shared of the repo


def rss_mb() -> float:
    """Resident memory of this process now (not the peak: the peak never falls)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_ppl(model_dir, tokens, train_len, multiples, windows, segments=None, on_segment=None) -> list[dict]:
    """Perplexity with the full context and with each window, per evaluation length. ``segments``: (start,
    stop) token ranges scored separately and pooled (token-weighted mean log-likelihood), so that a sample
    spread over the whole split costs a fraction of it; ``on_segment(rows)`` sees the pooled rows after each
    segment, so an interrupted run keeps what it finished."""
    from alibi_export.checkpoint import load
    from alibi_export.perplexity import perplexity
    from alibi_export.runtime.pytorch import TorchRunner

    model = load(model_dir).model.set_attention("sdpa").eval()
    segments = segments or [(0, len(tokens))]
    pooled = {}  # (mult, "full" | W) -> [nll sum, tokens, windows, seconds]
    rows = []
    for n, (start, stop) in enumerate(segments, 1):
        part = tokens[start:stop]
        for mult in multiples:
            length = mult * train_len
            for w in [None, *windows]:
                t0 = time.perf_counter()
                runner = TorchRunner(model) if w is None else TorchRunner(model, kv_window=w * train_len)
                got = perplexity(runner, part, [length])[0]
                acc = pooled.setdefault((mult, w), [0.0, 0, 0, 0.0])
                acc[0] += float(np.log(got.ppl)) * got.tokens
                acc[1] += got.tokens
                acc[2] += got.windows
                acc[3] += time.perf_counter() - t0
        rows = []
        for mult in multiples:
            nll, count, wins, secs = pooled[(mult, None)]
            full = float(np.exp(nll / count))
            row = {"length": mult * train_len, "multiple": mult, "segments": n, "windows_scored": wins,
                   "tokens_scored": count, "ppl_full": full, "seconds_full": secs, "window": {}}
            for w in windows:
                nll_w, count_w, _, secs_w = pooled[(mult, w)]
                got = float(np.exp(nll_w / count_w))
                row["window"][f"{w}L"] = {"W": w * train_len, "ppl": got, "ratio": got / full, "seconds": secs_w}
            rows.append(row)
            print(f"[{n}/{len(segments)} segments] {row['length']:>6} full {full:8.3f} " + " ".join(
                f"W={v['W']}: {v['ppl']:.3f} ({100 * (v['ratio'] - 1):+.2f}%)" for v in row["window"].values()),
                flush=True)
        if on_segment is not None:
            on_segment(rows)
    return rows


def spread_segments(n_tokens: int, length: int, count: int) -> list[tuple[int, int]]:
    """``count`` ranges of ``length + 1`` tokens (the +1 is the last target) evenly spaced over the text, never
    overlapping: a sample of the whole split, not of its first book."""
    if count * (length + 1) > n_tokens:
        raise SystemExit(f"Error: {count} segments of {length} tokens need {count * (length + 1)} tokens; the text "
                         f"has {n_tokens}")
    step = (n_tokens - (length + 1)) // max(count - 1, 1)
    return [(i * step, i * step + length + 1) for i in range(count)]


def gpu_mb() -> float | None:
    """This process's GPU memory as ``nvidia-smi`` reports it (None where there is none)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [line.split(",") for line in out.splitlines() if line.strip()]
    return sum(float(mb) for pid, mb in rows if int(pid) == os.getpid()) if rows else None


def _feed(session, stream, probes, chunk):
    """Feed ``stream`` through the session's cache in chunks (the window's cut before each), keeping a copy of
    the cache and mask at each probe length, and the process's memory there."""
    from onnxruntime import OrtValue

    cache, mask = session.new_cache(1), np.zeros((1, 0), dtype=np.int64)
    kept, memory, pos = {}, {}, 0
    for probe in probes:
        while pos < probe:
            n = min(chunk, probe - pos)
            cache, mask = session.window(cache, mask, n)
            mask = np.concatenate([mask, np.ones((1, n), dtype=np.int64)], axis=1)
            try:
                _, cache = session.step(stream[None, pos:pos + n], mask, cache)
            except Exception:
                print(f"step failed at {pos}: ids {n}, mask {mask.shape}, cache {cache[0].shape()}", flush=True)
                raise
            pos += n
        # rss_mb includes the copies kept at the earlier probes (snapshots_mb): subtract them for the stream's own.
        memory[probe] = {"rss_mb": rss_mb(), **({"gpu_mb": gpu_mb()} if session.device == "cuda" else {}),
                         "cache_mb": sum(v.tensor_size_in_bytes() for v in cache) / 2**20,
                         "cache_columns": mask.shape[1],
                         "snapshots_mb": sum(v.tensor_size_in_bytes() for c, _ in kept.values() for v in c) / 2**20}
        kept[probe] = ([OrtValue.ortvalue_from_numpy(v.numpy().copy(), session.device, session.device_id)
                        for v in cache], mask.copy())
    return kept, memory


def _time_steps(session, kept, token, rounds) -> dict:
    """Median ms of one decode step (the window's cut included) from each kept state, in interleaved rounds."""
    samples = {p: [] for p in kept}
    for _ in range(rounds):
        for probe, (cache, mask) in kept.items():
            t0 = time.perf_counter()
            c, m = session.window(cache, mask, 1)
            m = np.concatenate([m, np.ones((1, 1), dtype=np.int64)], axis=1)
            session.step(np.array([[token]], dtype=np.int64), m, c)
            samples[probe].append(time.perf_counter() - t0)
    return {p: 1e3 * statistics.median(s) for p, s in samples.items()}


def run_decode(model_dir, tokens, train_len, windows, probes, full_max, rounds, threads, slack, onnx=None,
               provider="cpu", dtype="float32") -> dict:
    from alibi_export.runtime.generate import GenerationSession

    with tempfile.TemporaryDirectory() as tmp:
        # Exported by the CLI in its own process, so that the exporter's memory is not in the measured RSS.
        path = Path(onnx) if onnx else Path(tmp) / "kv.onnx"
        if not onnx:
            subprocess.run([sys.executable, "-m", "alibi_export", "onnx", str(model_dir), "--kv-cache", "--no-validate",
                            "--dtype", dtype, "-o", str(path)], check=True, stdout=subprocess.DEVNULL)
        if len(tokens) < max(probes):
            raise SystemExit(f"Error: the text has {len(tokens)} tokens, fewer than the longest probe {max(probes)}")
        stream = tokens[: max(probes)]
        out = {"probes": probes, "threads": threads, "provider": provider,
               "export": f"onnx --kv-cache --dtype {dtype} (decomposed attention)" if not onnx else str(onnx),
               "runs": {}}
        settings = [(f"W={w * train_len}" + (f" slack {slack}" if slack else ""), w * train_len) for w in windows]
        settings.append(("full", None))
        for label, w in settings:
            session = GenerationSession(path, provider=provider, threads=threads, kv_window=w,
                                        window_slack=slack if w else 0)
            reach = [p for p in probes if w is not None or p <= full_max]
            t0 = time.perf_counter()
            kept, memory = _feed(session, stream, reach, chunk=min(512, w // 2) if w else 512)
            fill = time.perf_counter() - t0
            ms = _time_steps(session, kept, int(stream[-1]), rounds)
            out["runs"][label] = {"W": w, "fill_seconds": fill,
                                  "by_length": {p: {"decode_ms": ms[p], **memory[p]} for p in reach}}
            print(f"{label:>14}: " + "  ".join(f"{p}: {ms[p]:.2f} ms, rss {memory[p]['rss_mb']:.0f} MB, "
                                               + (f"gpu {memory[p]['gpu_mb']} MB, " if "gpu_mb" in memory[p] else "")
                                               + f"cache {memory[p]['cache_mb']:.1f} MB" for p in reach), flush=True)
            del kept, session
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", nargs="?", default="all", choices=["ppl", "decode", "all"])
    ap.add_argument("--model", default=str(shipped.default_model()))
    ap.add_argument("--text", default=str(BOOKS) if BOOKS.is_file() else str(shipped.default_text()))
    ap.add_argument("--tokens", type=int, default=65536, help="ppl: score the first N tokens of the text")
    ap.add_argument("--spread", type=int, default=0,
                    help="ppl: instead, score this many segments of the longest length spread over the whole text")
    ap.add_argument("--multiples", default="16,32,64", help="ppl: evaluation lengths, multiples of L")
    ap.add_argument("--windows", default="1,2,4,8", help="windows, multiples of L")
    ap.add_argument("--probes", default="4096,8192,16384,32768,65536", help="decode: stream lengths")
    ap.add_argument("--full-max", type=int, default=16384, help="decode: longest stream for the full cache")
    ap.add_argument("--rounds", type=int, default=15, help="decode: timed steps per probe (median)")
    ap.add_argument("--threads", type=int, default=1, help="decode: ONNX Runtime intra-op threads")
    ap.add_argument("--slack", type=int, default=0, help="decode: window_slack of the windowed sessions")
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="decode: ONNX Runtime's provider")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="decode: the export's dtype")
    ap.add_argument("--onnx", help="decode: an existing `onnx MODEL --kv-cache` export (default: export one)")
    ap.add_argument("--json")
    args = ap.parse_args()
    from alibi_export.checkpoint import checked_config, load

    train_len = checked_config(args.model).train_len
    tokenizer = load(args.model).tokenizer
    tokens = encode_text(tokenizer, read_text(args.text))
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    results = {"model": Path(args.model).name, "train_len": train_len, "text": Path(args.text).name,
               "text_tokens": int(len(tokens))}
    print(f"{Path(args.text).name}: {len(tokens)} tokens", flush=True)
    path = out_path("kv_window.json", args.json)
    if args.part in ("ppl", "all"):
        def partial(rows):  # each finished segment is on disk: a long run that is stopped keeps its sample
            if path is not None and args.spread:
                write_record(path, {**results, "ppl": rows, "spread": args.spread})

        if args.spread:
            segs = spread_segments(len(tokens), max(ints(args.multiples)) * train_len, args.spread)
            results["segments"] = segs
            results["ppl"] = run_ppl(args.model, tokens, train_len, ints(args.multiples), ints(args.windows),
                                     segs, partial)
        else:
            results["ppl"] = run_ppl(args.model, tokens[: args.tokens + 1], train_len, ints(args.multiples),
                                     ints(args.windows))
    if args.part in ("decode", "all"):
        results["decode"] = run_decode(args.model, tokens, train_len, ints(args.windows), ints(args.probes),
                                       args.full_max, args.rounds, args.threads, args.slack, args.onnx,
                                       args.provider, args.dtype)
    if path is not None:
        write_record(path, results)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
