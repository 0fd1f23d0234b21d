"""Would a float16 KV cache speed up CPU decoding? (issue 23 section 3: llama.cpp keeps its cache in f16.)

A probe, not an export option: it takes a float32 folded static-cache export (``--kv-cache --static-cache L
--attention onnx``: its GroupQueryAttention takes no bias, so the ALiBi positions already travel in the cache
columns in a form float16 holds exactly), rewrites a copy whose cache buffers are float16 (a Cast to float16
on q, k and v before each GroupQueryAttention, and back to float32 after it), and times one decode step of
both at the given contexts in interleaved fresh-process rounds (GenerationSession: the cache dtype comes from
the file's inputs). The default static form cannot take a float16 cache this way: its op takes the ALiBi bias
in the query's dtype, and float16 would round the bias's large values (m times the distance).

Usage (repo root): PYTHONPATH=. python tools/probe_f16_cache.py FOLDED.onnx [--contexts 128,1024] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def float16_cache(src: Path, dst: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    graph = model.graph
    for value in list(graph.input) + list(graph.output):
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    nodes = []
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            nodes.append(node)
            continue
        for i in range(3):  # q, k, v
            nodes.append(helper.make_node("Cast", [node.input[i]], [node.input[i] + "_f16"], to=TensorProto.FLOAT16))
            node.input[i] += "_f16"
        y = node.output[0]
        node.output[0] = y + "_f16"
        nodes += [node, helper.make_node("Cast", [y + "_f16"], [y], to=TensorProto.FLOAT)]
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [v for v in graph.value_info if not v.name.startswith("present.")]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    onnx.save(model, str(dst), save_as_external_data=model.ByteSize() > 2**31 - 2**26)


def child(path: str, contexts: list[int], steps: int) -> dict:
    """One fresh process: the median ms of ``steps`` single-token steps at each context."""
    from alibi_export.runtime.generate import GenerationSession

    session = GenerationSession(path, threads=2)
    ids = np.random.default_rng(0).integers(3, 1000, max(contexts) + steps + 1)
    cache = session.new_cache(1, max(contexts) + steps + 1)
    out, done = {}, 0
    for c in contexts:
        mask = np.ones((1, c), dtype=np.int64)
        _, cache = session.step(ids[None, done:c], mask, cache)
        samples = []
        for t in range(c, c + steps):
            mask = np.ones((1, t + 1), dtype=np.int64)
            t0 = time.perf_counter()
            _, cache = session.step(ids[None, t:t + 1], mask, cache)
            samples.append(1e3 * (time.perf_counter() - t0))
        out[f"decode_ms@{c}"] = statistics.median(samples)
        done = c + steps
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx", help="a float32 --kv-cache --static-cache L --attention onnx export")
    ap.add_argument("--contexts", default="128,1024")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.child:
        print(json.dumps(child(args.onnx, contexts, args.steps)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        f16 = Path(tmp) / "f16-cache.onnx"
        float16_cache(Path(args.onnx), f16)
        files = {"f32 cache": args.onnx, "f16 cache": str(f16)}
        samples = {k: [] for k in files}
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        for r in range(args.rounds):
            for name, path in files.items():
                done = subprocess.run([sys.executable, __file__, path, "--child", "--contexts", args.contexts,
                                       "--steps", str(args.steps)], env=env, capture_output=True, text=True, check=True)
                samples[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1} {name}: {samples[name][-1]}", flush=True)
    for name, runs in samples.items():
        print(name, {k: round(statistics.median(s[k] for s in runs), 2) for k in runs[0]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
