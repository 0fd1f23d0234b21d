"""Prefill with --logits-to-keep against every position's logits: time and output size, interleaved, one process.

A prefill samples one token from the last position's logits; a KV-cache file without the ``logits_to_keep``
input still computes the LM head for every prompt position. What that costs grows with the vocabulary: a
quarter of the shipped model's work per token (vocab 4096, d 256), nearly half of a BLOOM-560m's (vocab 250,880,
d 1024, 24 layers), whose 2,048-token prompt makes 2 GB of float32 logits.

Each model is exported twice from the same weights (``--kv-cache``, float32, and the same with
``--logits-to-keep``); ``GenerationSession.prefill`` of one prompt of each length runs on both, interleaved
(``harness.time_peers``), and the two last-position logits are compared.

    python tools/bench_logits_to_keep.py --random 256x4x4096 --random 1024x24x250880 --lengths 128,512,2048
    (the shipped model: --shipped)
"""
from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import out_path, time_peers, write_record


def _pair(checkpoint, tmp: Path, name: str) -> dict:
    from alibi_export.export.onnx import export_onnx

    files = {}
    for form, keep in (("every", False), ("last", True)):
        t = time.perf_counter()
        files[form] = export_onnx(checkpoint, tmp / f"{name}-{form}.onnx", kv_cache=True, logits_to_keep=keep).path
        print(f"exported {files[form].name} in {time.perf_counter() - t:.0f} s", flush=True)
    return files


def bench_model(checkpoint, name: str, tmp: Path, lengths: list[int], batch: int, repeats: int, threads: int) -> dict:
    from alibi_export.runtime.generate import GenerationSession

    files = _pair(checkpoint, tmp, name)
    sessions = {form: GenerationSession(path, threads=threads) for form, path in files.items()}
    cfg = checkpoint.config
    rows = []
    rng = np.random.default_rng(0)
    for length in lengths:
        ids = rng.integers(0, min(cfg.vocab_size, 4096), (batch, length))
        mask = np.ones_like(ids)
        last = {f: s.prefill(ids, mask)[0][:, -1] for f, s in sessions.items()}
        diff = float(np.abs(last["every"] - last["last"]).max())
        timings = time_peers({f: (lambda s=s: s.prefill(ids, mask)) for f, s in sessions.items()},
                             warmup=1, repeats=repeats)
        every, kept = timings["every"].median, timings["last"].median
        row = {"length": length, "batch": batch, "every_ms": round(every * 1e3, 2), "last_ms": round(kept * 1e3, 2),
               "speedup": round(every / kept, 3), "every_logits_mb": round(batch * length * cfg.vocab_size * 4 / 1e6, 1),
               "last_logits_mb": round(batch * cfg.vocab_size * 4 / 1e6, 3), "max_abs_diff_last": diff,
               "samples_ms": {f: [round(x * 1e3, 2) for x in t.samples] for f, t in timings.items()}}
        rows.append(row)
        print(f"{name} L={length} B={batch}: every {row['every_ms']} ms, last {row['last_ms']} ms "
              f"({row['speedup']}x); logits {row['every_logits_mb']} -> {row['last_logits_mb']} MB; "
              f"|diff| {diff:.2e}", flush=True)
    params = sum(int(np.prod(p.shape)) for p in checkpoint.model.parameters())
    return {"model": name, "d_model": cfg.d_model, "n_layer": cfg.n_layer, "vocab": cfg.vocab_size,
            "parameters": params, "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", action="append", default=[], metavar="DxLxV",
                    help="A random-weights model of the shipped architecture, d_model x layers x vocabulary "
                         "(repeatable).")
    ap.add_argument("--shipped", action="store_true", help="Also the shipped alibi-small.")
    ap.add_argument("--lengths", default="128,512,2048")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="Write the record here (default: $OUT/bench_logits_to_keep.json).")
    args = ap.parse_args()
    from alibi_export import load
    from bench_cpu import large_model

    lengths = [int(x) for x in args.lengths.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-logits-"))
    models = []
    try:
        if args.shipped:
            from alibi_export.shipped import default_model

            models.append(bench_model(load(default_model()), "alibi-small", tmp, lengths, args.batch, args.repeats,
                                      args.threads))
        for spec in args.random:
            ckpt = load(large_model(tmp / f"ckpt-{spec}", spec))
            models.append(bench_model(ckpt, f"random-{spec}", tmp, lengths, args.batch, args.repeats, args.threads))
            del ckpt
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results = {"threads": args.threads, "repeats": args.repeats, "models": models,
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    path = out_path("bench_logits_to_keep.json", args.json)
    if path:
        write_record(path, results, tool="bench_logits_to_keep.py")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
