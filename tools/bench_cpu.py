"""CPU benchmark: export time, ONNX Runtime vs PyTorch forward latency, and peak memory per length.

Every measurement runs in its own subprocess, so its peak resident memory (ru_maxrss) is its own.
Subprocesses are capped at --mem-cap-gb of address space: a peer that would not fit fails cleanly
instead of taking the machine down.

Rows:
  ort          our dynamic-length export (query-chunked ALiBi attention, bias from runtime shapes)
  ort-naive    the naive dynamic export: the same model with attention written out as one
               (B, H, L, L) score tensor + materialized bias (the peer the issue names)
  torch-sdpa   PyTorch eager with F.scaled_dot_product_attention and a materialized ALiBi float bias,
               over the whole sequence at once (PyTorch's fastest CPU path; the latency reference)
  torch-chunk  the same SDPA call run query-chunk by query-chunk (this project's PyTorch reference)
  ort-op       our export in the onnx attention form (the standard Attention op, opset 23, ALiBi folded
               into 8 extra head dims; no mask, causal), which ONNX Runtime runs with its own kernel
  ort-matmuls  only the model's matrix products at that length (projections, MLP, q·k and p·v, LM
               head; same shapes, same count), in one ONNX Runtime graph: the floor under any export
               of this model, since no graph does fewer of them without skipping masked scores

With --quantized it measures the quantized exports instead (issue 12), on the shipped model and on a
larger random-weights model of the same architecture (--large, default d_model 1024, 12 layers):
  forward      ort (fp32), ort-int8, ort-int4 against torch-sdpa at each length (batch 1)
  decode       batch-1 greedy decoding through the KV-cache export (GenerationSession), fp32 / int8 / int4:
               tokens/s of the decoding steps after a prompt of --prompt-len tokens
  size         file size of each export; peak RSS of each measuring process

usage: python tools/bench_cpu.py [--model alibi_export/models/alibi-small] [--threads 2] [--json out.json]
       python tools/bench_cpu.py --quantized [--large 1024x12] [--json docs/bench_cpu.json]  (adds "quantized")
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import PRODUCER, ROOT, time_one, write_record


def child(kind: str, model: str, onnx_path: str, length: int, threads: int, repeats: int) -> dict:
    """Runs in the subprocess: load, warm up once, time ``repeats`` forwards of batch 1."""
    import numpy as np

    ids = np.random.default_rng(0).integers(0, 4096, size=(1, length), dtype=np.int64)
    if kind.startswith("decode"):
        return decode_child(onnx_path, length, threads, repeats)
    if kind.startswith("ort"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        feeds = {"input_ids": ids}
        if kind == "ort-matmuls":
            onnx_path, feeds = matmuls_only(model, length)
        sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        run = lambda: sess.run(None, feeds)  # noqa: E731
    else:
        import torch

        import alibi_export.model as M
        from alibi_export import load

        torch.set_num_threads(threads)
        if kind == "torch-sdpa":
            M.CHUNK_SCORES = 1 << 62  # one SDPA call over the whole sequence
        lm = load(model).model.set_attention("sdpa")
        x = torch.from_numpy(ids)

        def run():
            with torch.inference_mode():
                return lm(x)
    return {"ms": time_one(run, warmup=1, repeats=repeats).ms, "rss_mb": peak_rss_mb()}


def decode_child(onnx_path: str, new_tokens: int, threads: int, repeats: int, prompt_len: int = 32) -> dict:
    """Batch-1 greedy decoding of ``new_tokens`` tokens after a random prompt: median decode tokens/s."""
    import numpy as np

    from alibi_export.runtime.generate import GenerationSession

    session = GenerationSession(onnx_path, threads=threads)
    prompt = [np.random.default_rng(0).integers(0, session.config.vocab_size, prompt_len).tolist()]
    session.generate_ids(prompt, 4, stop_tokens=[])  # warm-up

    def seconds_per_token(_):
        r = session.generate_ids(prompt, new_tokens, stop_tokens=[])
        return r.decode_seconds / r.steps
    timing = time_one(None, warmup=0, repeats=repeats, measure=seconds_per_token)
    return {"tokens_per_s": 1 / timing.median, "rss_mb": peak_rss_mb()}


def matmuls_only(model: str, length: int):
    """An ONNX graph of just the forward's matrix products for batch 1 at ``length``, and its feeds."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cfg = json.loads((Path(model) / "config.json").read_text())
    d, f, h, v, n_layer = cfg["d_model"], cfg["d_ff"], cfg["n_head"], cfg["vocab_size"], cfg["n_layer"]
    dh = d // h
    rng = np.random.default_rng(0)
    shapes = {"x": (1, length, d), "hid": (1, length, f), "q": (1, h, length, dh), "kt": (1, h, dh, length),
              "p": (1, h, length, length), "vv": (1, h, length, dh)}
    weights = {"w_qkv": (d, 3 * d), "w_o": (d, d), "w_up": (d, f), "w_down": (f, d), "w_head": (d, v)}
    inits = [numpy_helper.from_array(rng.standard_normal(s, dtype=np.float32), n) for n, s in weights.items()]
    pairs = [("x", "w_qkv"), ("x", "w_o"), ("x", "w_up"), ("hid", "w_down"), ("q", "kt"), ("p", "vv")]
    nodes = [helper.make_node("MatMul", list(ab), [f"y{i}_{j}"]) for i in range(n_layer) for j, ab in enumerate(pairs)]
    nodes.append(helper.make_node("MatMul", ["x", "w_head"], ["logits"]))
    graph = helper.make_graph(nodes, "matmuls", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                                                 for n, s in shapes.items()],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for n in nodes
                               for o in n.output], inits)
    proto = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 18)])
    feeds = {n: rng.standard_normal(s, dtype=np.float32) for n, s in shapes.items()}
    return onnx._serialize(proto) if hasattr(onnx, "_serialize") else proto.SerializeToString(), feeds


def peak_rss_mb() -> float:
    """VmHWM: this process's own peak (ru_maxrss would carry over the parent's peak through fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(kind, model, onnx_path, length, threads, repeats, cap_gb) -> dict:
    code = (f"import json,sys; sys.path.insert(0,{str(ROOT / 'tools')!r}); sys.path.insert(0,{str(ROOT)!r});"
            f"import resource; cap={cap_gb} << 30; resource.setrlimit(resource.RLIMIT_AS,(cap,cap));"
            f"from bench_cpu import child; print(json.dumps(child({kind!r},{model!r},{onnx_path!r},{length},"
            f"{threads},{repeats})))")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["killed"])[-1]
        return {"error": last[:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def export_variants(model: str, out_dir: Path) -> dict:
    import alibi_export.export.dynamo as dynamo
    import alibi_export.export.onnx as exp
    from alibi_export import load
    from alibi_export.model import attend_eager

    ck = load(model)
    t = time.perf_counter()
    exp.export_onnx(ck, out_dir / "ours.onnx")
    export_s = time.perf_counter() - t
    real = dynamo._attention_node
    dynamo._attention_node = lambda m: attend_eager  # the naive export: attention written out whole
    try:
        exp.export_onnx(ck, out_dir / "naive.onnx")
    finally:
        dynamo._attention_node = real
    exp.export_onnx(ck, out_dir / "op.onnx", attention="onnx")
    return {"export_s": export_s}


QUANT_FORMS = {"ort": None, "ort-int8": "int8", "ort-int4": "int4"}


def large_model(out_dir: Path, spec: str) -> str:
    """A random-weights checkpoint of the shipped architecture, d_model x layers from ``spec`` ("1024x12"), and
    the vocabulary's size as a third field ("1024x24x250880": BLOOM-560m's shape; default 4096). Past the
    tokenizer's 4096 words the extra rows are never produced by it, but they cost the LM head what they cost."""
    import torch

    from alibi_export import AlibiLM, ModelConfig, load, save

    d, layers, *vocab = (int(x) for x in spec.split("x"))
    cfg = ModelConfig(vocab_size=vocab[0] if vocab else 4096, n_layer=layers, n_head=d // 64, d_model=d, d_ff=4 * d, train_len=256,
                      max_positions=256)
    torch.manual_seed(0)
    from alibi_export.shipped import default_model

    save(AlibiLM(cfg), load(default_model()).tokenizer, out_dir)
    return str(out_dir)


def quantized_rows(model: str, tmp: Path, lengths: list[int], args) -> dict:
    """Exports (fp32, int8, int4; plain and KV cache), then forward, decode, size and memory rows."""
    from alibi_export import load
    from alibi_export.export.onnx import export_onnx

    ck = load(model)
    files, out = {}, {"forward": {}, "decode": {}, "size_mb": {}}
    for kind, q in QUANT_FORMS.items():
        t = time.perf_counter()
        files[kind] = str(export_onnx(ck, tmp / f"{kind}.onnx", quantize=q).path)
        files["decode-" + kind] = str(export_onnx(ck, tmp / f"kv-{kind}.onnx", quantize=q, kv_cache=True).path)
        out["size_mb"][kind] = Path(files[kind]).stat().st_size / 1e6
        print(f"exported {kind} in {time.perf_counter() - t:.0f}s ({out['size_mb'][kind]:.1f} MB)", flush=True)
    del ck
    for length in lengths:
        row = {k: measure(k if k == "torch-sdpa" else "ort", model, files.get(k, ""), length, args.threads,
                          args.repeats, args.mem_cap_gb) for k in ("torch-sdpa", *QUANT_FORMS)}
        out["forward"][length] = row
        print(length, json.dumps(row), flush=True)
    for kind in QUANT_FORMS:
        out["decode"][kind] = measure("decode", model, files["decode-" + kind], args.new_tokens, args.threads,
                                      args.repeats, args.mem_cap_gb)
        print("decode", kind, json.dumps(out["decode"][kind]), flush=True)
    return out


def print_quantized(name: str, r: dict) -> None:
    print(f"\n{name}: forward ms (batch 1, median) and ratio to torch-sdpa fp32")
    print(f"{'L':>6} {'torch-sdpa':>11}" + "".join(f" {k:>9}" for k in QUANT_FORMS) +
          "".join(f" {k + '/sdpa':>14}" for k in QUANT_FORMS))
    for length, row in r["forward"].items():
        ms = {k: v.get("ms", float("nan")) for k, v in row.items()}
        print(f"{length:>6} {ms['torch-sdpa']:>11.1f}" + "".join(f" {ms[k]:>9.1f}" for k in QUANT_FORMS) +
              "".join(f" {ms[k] / ms['torch-sdpa']:>14.2f}" for k in QUANT_FORMS))
    fp32 = r["decode"]["ort"].get("tokens_per_s", float("nan"))
    print("decode tokens/s (batch 1), ratio to fp32 ORT, peak RSS MB; file MB and ratio to fp32")
    for k in QUANT_FORMS:
        d = r["decode"][k]
        print(f"  {k:>9}: {d.get('tokens_per_s', float('nan')):8.1f} tok/s {d.get('tokens_per_s', float('nan')) / fp32:5.2f}x"
              f"  rss {d.get('rss_mb', float('nan')):7.0f}  file {r['size_mb'][k]:7.1f} MB "
              f"{r['size_mb'][k] / r['size_mb']['ort']:5.3f}x")


def main_quantized(args) -> None:
    lengths = [int(x) for x in args.latency_lengths.split(",")]
    results = {"threads": args.threads, "repeats": args.repeats, "large_repeats": args.large_repeats,
               "new_tokens": args.new_tokens, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "small").mkdir()
        results["models"][Path(args.model).name] = quantized_rows(args.model, tmp / "small", lengths, args)
        if args.large:
            (tmp / "large").mkdir()
            big = large_model(tmp / "large-ckpt", args.large)
            args.repeats = args.large_repeats  # a forward of the large model takes seconds: fewer repeats
            large_lengths = [int(x) for x in args.large_lengths.split(",")]
            results["models"][f"random-{args.large}"] = quantized_rows(big, tmp / "large", large_lengths, args)
    for name, r in results["models"].items():
        print_quantized(name, r)
    if args.json:  # kept beside the float32 rows of the same file's results, under "quantized"
        path = Path(args.json)
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged = merged["results"] if merged.get("producer") == PRODUCER else merged
        merged["quantized"] = results
        write_record(path, merged)


def main():
    from alibi_export.shipped import default_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(default_model()))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-lengths", default="256,512,1024,2048,4096")
    ap.add_argument("--memory-lengths", default="1024,4096,8192,16384")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mem-cap-gb", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quantized", action="store_true", help="Measure the int8/int4 exports (see above).")
    ap.add_argument("--large", default="1024x12", help="With --quantized: also a random model d_model x layers "
                                                      "('' to skip).")
    ap.add_argument("--large-lengths", default="256,1024", help="Forward lengths for the large model.")
    ap.add_argument("--large-repeats", type=int, default=3, help="Repeats per measurement of the large model.")
    ap.add_argument("--new-tokens", type=int, default=64, help="Tokens decoded per decode measurement.")
    args = ap.parse_args()
    if args.quantized:
        return main_quantized(args)
    lat = [int(x) for x in args.latency_lengths.split(",")]
    mem = [int(x) for x in args.memory_lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        info = export_variants(args.model, tmp)
        onnx_of = {"ort": str(tmp / "ours.onnx"), "ort-naive": str(tmp / "naive.onnx"), "ort-op": str(tmp / "op.onnx")}
        results = {"export_s": info["export_s"], "threads": args.threads, "latency": {}, "memory": {}}
        print(f"export (dynamic, fp32): {info['export_s']:.1f} s", flush=True)
        for length in lat:
            row = {}
            for kind in ("torch-sdpa", "torch-chunk", "ort-naive", "ort", "ort-op", "ort-matmuls"):
                row[kind] = measure(kind, args.model, onnx_of.get(kind, ""), length, args.threads, args.repeats,
                                    args.mem_cap_gb)
            results["latency"][length] = row
            print(length, json.dumps(row), flush=True)
        for length in mem:
            row = {}
            for kind in ("ort", "ort-op", "ort-naive", "torch-chunk"):
                row[kind] = measure(kind, args.model, onnx_of.get(kind, ""), length, args.threads, 1,
                                    args.mem_cap_gb)
            results["memory"][length] = row
            print(length, json.dumps(row), flush=True)
    print("\nlatency (ms, batch 1, median) and ratio to torch-sdpa")
    kinds = ("torch-chunk", "ort-naive", "ort", "ort-op", "ort-matmuls")
    print(f"{'L':>6} {'torch-sdpa':>11}" + "".join(f" {k:>11}" for k in kinds) + "".join(f" {k + '/sdpa':>16}"
                                                                                     for k in kinds[1:]))
    for length, row in results["latency"].items():
        ms = {k: v.get("ms", float("nan")) for k, v in row.items()}
        ref = ms["torch-sdpa"]
        print(f"{length:>6} {ref:>11.1f}" + "".join(f" {ms[k]:>11.1f}" for k in kinds) +
              "".join(f" {ms[k] / ref:>16.2f}" for k in kinds[1:]))
    print("\npeak RSS (MB, one forward of batch 1; 'fail' = over the address-space cap or killed)")
    print(f"{'L':>6} {'ort':>8} {'ort-op':>8} {'ort-naive':>10} {'torch-chunk':>12}")
    for length, row in results["memory"].items():
        cell = lambda r: f"{r['rss_mb']:.0f}" if "rss_mb" in r else "fail"  # noqa: E731
        print(f"{length:>6} {cell(row['ort']):>8} {cell(row['ort-op']):>8} {cell(row['ort-naive']):>10} "
              f"{cell(row['torch-chunk']):>12}")
    if args.json:
        write_record(args.json, results)


if __name__ == "__main__":
    main()
