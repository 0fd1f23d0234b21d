"""Decode ms/step: the concatenating KV cache (`--kv-cache`) against the static one (`--kv-cache --static-cache`).

Both files are exported from the same checkpoint and driven by GenerationSession.step, one decode token per
row, at a fixed context (the cache holds CONTEXT tokens, the step adds one). The caches are filled with random
values instead of a prefill (the step's cost does not depend on them; a 16 x 1024-token prefill of the d 1024
model would take minutes on 2 cores). Each timed call is the same step at the same context: the concatenating
form's input cache is not modified (it returns a longer copy), the static form writes the same column again.
Forms are timed interleaved (harness.time_peers), medians reported. Before timing, the two forms' logits for the
same cache are compared (max |difference|), so a broken static export cannot post a speed.

    python tools/bench_kv_buffer.py                          # the shipped model
    python tools/bench_kv_buffer.py --random 1024x12         # issue 23's random d 1024, 12-layer model
    python tools/bench_kv_buffer.py --random 1024x12 --quantize int8   # both forms with int8 weights
    python tools/bench_kv_buffer.py --batches 16 --contexts 560 --profile 16x560   # where a step's time goes
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from harness import ROOT, out_path, time_peers, write_record

sys.path.insert(0, str(ROOT))


def filled_caches(session, batch: int, context: int, rng) -> list:
    """Each past input filled with random values: (batch, heads, context, width), or for a static file a buffer
    of context + 1 columns (the step writes the last one)."""
    from onnxruntime import OrtValue

    length = context + 1 if session.static is not None else context
    shape = (batch, session.config.kv_heads, length, session.cache_width)
    return [OrtValue.ortvalue_from_numpy(rng.standard_normal(shape, dtype=np.float32)) for _ in session._past_names]


def profile(paths: dict, batch: int, context: int, threads: int, steps: int = 6, prefill: int = 0) -> dict:
    """ONNX Runtime's profile of ``steps`` decode steps of each form: kernel ms/step and each op type's share.
    With ``prefill`` > 0, ``steps`` prefills of that many tokens into an empty cache instead, and the share of
    the largest single node (the LM head, whose (batch, prefill, vocab) logits a prefill computes in full, unless
    the file was exported with ``--logits-to-keep``: the prefills ask for the last position's only)."""
    import collections
    import json

    import onnxruntime as ort

    from alibi_export.runtime.generate import GenerationSession

    out = {}
    for name, path in paths.items():
        session = GenerationSession(path, threads=threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.enable_profiling = threads, True
        options.profile_file_prefix = str(Path(path).with_suffix("")) + "-profile"
        session.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        if prefill:
            ids = np.random.default_rng(0).integers(3, 4000, (batch, prefill))
            mask = np.ones((batch, prefill), np.int64)
            for _ in range(steps):
                session.step(ids, mask, session.new_cache(batch, prefill), last_only=True)
        else:
            cache = filled_caches(session, batch, context, np.random.default_rng(0))
            ids, mask = np.ones((batch, 1), np.int64), np.ones((batch, context + 1), np.int64)
            for _ in range(steps):
                session.step(ids, mask, cache)
        events = json.loads(Path(session.session.end_profiling()).read_text())
        ops, nodes = collections.Counter(), collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                ops[e["args"]["op_name"]] += e["dur"]
                nodes[e["name"].removesuffix("_kernel_time")] += e["dur"]
        total = sum(ops.values())
        (top, top_us), = nodes.most_common(1)
        out[name] = {"kernel_ms_per_step": total / steps / 1e3,
                     "share": {op: t / total for op, t in ops.most_common(8)},
                     "largest_node": {"name": top, "ms_per_step": top_us / steps / 1e3, "share": top_us / total}}
        where = f"prefill of {prefill}" if prefill else f"context {context}"
        print(f"profile {name}, batch {batch}, {where}: kernels {total / steps / 1e3:.1f} ms/step: "
              + ", ".join(f"{op} {100 * t / total:.0f}%" for op, t in ops.most_common(6))
              + f"; largest node {top} {top_us / steps / 1e3:.1f} ms ({100 * top_us / total:.0f}%)", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--random", default=None, metavar="DxL", help="a random model of the shipped architecture, "
                    "d_model x layers (e.g. 1024x12; tools/bench_cpu.py's large model)")
    ap.add_argument("--contexts", default="128,1024")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None,
                    help="export both forms with these weights (the cpu target's int8, or int4)")
    ap.add_argument("--profile", default=None, metavar="BATCHxCONTEXT",
                    help="also profile a few steps of each form there (ONNX Runtime's enable_profiling), e.g. 16x560")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from alibi_export import load
    from alibi_export.export.onnx import export_onnx
    from alibi_export.runtime.generate import GenerationSession
    from alibi_export.shipped import default_model

    contexts, batches = [int(x) for x in a.contexts.split(",")], [int(x) for x in a.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.random:
            from bench_cpu import large_model

            model = large_model(tmp / "random", a.random)
        else:
            model = a.model or str(default_model())
        ckpt = load(model)
        lmax = max(contexts) + 1
        paths = {"concat": export_onnx(ckpt, tmp / "concat.onnx", kv_cache=True, quantize=a.quantize).path,
                 "static": export_onnx(ckpt, tmp / "static.onnx", kv_cache=True, static_cache=lmax,
                                       quantize=a.quantize).path}
        sessions = {k: GenerationSession(p, threads=a.threads) for k, p in paths.items()}
        cfg = ckpt.config
        print(f"model {a.random or Path(model).name} ({a.quantize or 'float32'}): d_model {cfg.d_model}, {cfg.n_layer} layers, {cfg.n_head} heads; "
              f"{a.threads} threads, medians of {a.repeats} interleaved steps", flush=True)
        rows = []
        for batch in batches:
            for context in contexts:
                rng = np.random.default_rng(0)
                caches = {k: filled_caches(s, batch, context, rng) for k, s in sessions.items()}
                # The same values in both: the static buffer's first `context` columns are the concat form's past.
                for c, s in zip(caches["concat"], caches["static"]):
                    s.numpy()[:, :, :context] = c.numpy()  # numpy() of a CPU OrtValue is a view
                ids = rng.integers(0, cfg.vocab_size, (batch, 1))
                mask = np.ones((batch, context + 1), dtype=np.int64)
                logits = {k: s.step(ids, mask, caches[k])[0] for k, s in sessions.items()}
                diff = float(np.abs(logits["concat"] - logits["static"]).max())
                timings = time_peers({k: (lambda s=s, c=caches[k]: s.step(ids, mask, c)) for k, s in sessions.items()},
                                     warmup=1, repeats=a.repeats)
                row = {"batch": batch, "context": context, "max_abs_logit_diff": diff,
                       **{f"{k}_ms": t.ms for k, t in timings.items()}}
                row["speedup"] = row["concat_ms"] / row["static_ms"]
                rows.append(row)
                print(f"batch {batch:2d} context {context:5d}: concat {row['concat_ms']:8.2f} ms  static "
                      f"{row['static_ms']:8.2f} ms  = {row['speedup']:.2f}x  (logits max|diff| {diff:.1e})",
                      flush=True)
                del caches
        profiled = None
        if a.profile:
            batch, context = (int(x) for x in a.profile.split("x"))
            profiled = profile(paths, batch, context, a.threads)
    path = out_path("bench_kv_buffer.json", a.json)
    if path:
        write_record(path, {"model": a.random or Path(model).name, "weights": a.quantize or "float32",
                            "threads": a.threads, "rows": rows, "profile": profiled})


if __name__ == "__main__":
    main()
