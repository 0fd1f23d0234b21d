#!/usr/bin/env python3
"""Where a decode step spends GPU time, ONNX Runtime's static-cache export against the CUDA-graph anchor
(issue 23 §2): CUDA kernel times (CUPTI, through torch.profiler) of one step of each, in one process, on the
random model and the buffers of ``tools/bench_generate_gpu.py --anchor``.

The anchor's gap (1.29-1.61x at batch 1) was read from shapes, not measured: this splits both steps' GPU time
into attention, GEMMs and the rest, and sets it beside the step's wall time, so the gap is located (the
kernels, or the time between them). Each step is profiled without its CUDA graph (the kernels are the same; a
replay hides them from CUPTI on some drivers) and timed with it.

    PYTHONPATH=$PWD:$PWD/tools:/tmp/site python3 tools/profile_decode_gpu.py --out $OUT   # GPU, onnxruntime-gpu
    python3 tools/profile_decode_gpu.py --quick --out /tmp/p                           # CPU: the plumbing only
"""
from __future__ import annotations

import argparse
import collections
import copy
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_generate_gpu import (AnchorStep, Clock, OrtStaticStep, ort_static_session, pairs, random_cache,
                                random_checkpoint)
from harness import cuda_kernel_times, write_record

from alibi_export import load  # noqa: E402
from alibi_export.export.onnx import export_onnx  # noqa: E402

# kernel name fragments -> the category a row of the table sums (first match wins; lower-case)
CATEGORIES = (
    ("attention", ("attention", "flash", "fmha", "mha", "_alibi", "decode", "softmax", "gqa", "rotary",
                   "unpack", "concatnew", "concat_new", "xqa")),
    ("gemm", ("gemm", "gemv", "cutlass", "sm90_xmma", "xmma", "cublas", "ampere_", "sm80_", "nvjet")),
    ("norm+activation", ("layernorm", "layer_norm", "skiplayernorm", "gelu", "biasgelu", "elementwise",
                         "vectorized", "norm")),
    ("copy", ("memcpy", "copy", "cast", "transpose", "gather", "index")),
)


def category(kernel: str) -> str:
    low = kernel.lower()
    for name, keys in CATEGORIES:
        if any(k in low for k in keys):
            return name
    return "other"


def kernel_profile(fn, sync) -> dict:
    """One call of ``fn`` under CUPTI: per-kernel device time (us) and count, and the sums per category."""
    total, count = cuda_kernel_times(fn, sync)
    cats = collections.Counter()
    for k, us in total.items():
        cats[category(k)] += us
    return dict(kernel_us=round(sum(total.values()), 1), kernels=sum(count.values()),
                by_category={k: round(v, 1) for k, v in cats.most_common()},
                top=[dict(kernel=k, us=round(us, 1), count=count[k], category=category(k))
                     for k, us in sorted(total.items(), key=lambda kv: -kv[1])[:12]])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--sdpa-kernels", type=int, nargs="+", default=[0, 1, 2],
                   help="ONNX Runtime CUDA EP sdpa_kernel values whose CUDA-graph step is also timed and profiled "
                        "(0: its own choice; 1 flash, 2 memory-efficient, 8 cuDNN flash)")
    p.add_argument("--quick", action="store_true", help="tiny model and contexts; runs on a CPU (no profile)")
    args = p.parse_args(argv)
    args.layers, args.d_model, args.heads, args.vocab = 12, 768, 12, 4096
    if args.quick:
        args.layers, args.d_model, args.heads = 2, 64, 4
        args.contexts, args.batches, args.repeats = [64, 128], [1, 2], 3
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda and not args.quick:
        raise SystemExit("Error: profile_decode_gpu needs a CUDA device (--quick runs the plumbing on a CPU)")
    import onnxruntime as ort

    if cuda and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    clock = Clock(cuda)
    t0 = time.perf_counter()
    cfg, model, work = random_checkpoint(args, "profile-decode-")
    dtype = torch.float16 if cuda else torch.float32
    lmax = max(args.contexts) + 1
    path = export_onnx(load(work / "ckpt"), work / "static.onnx", kv_cache=True, static_cache=lmax,
                       attention="onnx", ort_fusions=True, dtype="float16" if cuda else "float32").path
    tmodel = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    meta = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                onnxruntime=ort.__version__, argv=sys.argv[1:], config=cfg.to_dict(),
                export=dict(kv_cache=True, static_cache=lmax, attention="onnx", ort_fusions=True))
    rows = []
    variant = "sliced-triton" if cuda else "sliced-eager"
    for batch in args.batches:
        plain = ort_static_session(path, device, False, "next-power-of-two")
        graphed = ort_static_session(path, device, True, "next-power-of-two") if cuda else None
        width = plain.get_inputs()[2].shape[-1]
        ort_buffers = random_cache(cfg, batch, lmax, dtype, device, width)
        anchor_buffers = pairs(random_cache(cfg, batch, lmax, dtype, device))
        rng = np.random.default_rng(0)
        for i, ctx in enumerate(args.contexts):
            ids = rng.integers(0, cfg.vocab_size, (batch, 1), dtype=np.int64)
            tids = torch.from_numpy(ids)
            row = dict(batch=batch, context=ctx)
            ort_step = OrtStaticStep(plain, ort_buffers, ids, ctx, device, None, cfg.vocab_size)
            anchor_eager = AnchorStep(tmodel, anchor_buffers, batch, ctx, variant, False)
            row["ort_iobinding_ms"] = round(1e3 * clock.time(lambda: ort_step(ids), 3, args.repeats)[0], 3)
            row["anchor_no_graph_ms"] = round(1e3 * clock.time(lambda: anchor_eager(tids), 3, args.repeats)[0], 3)
            if cuda:
                ort_graph = OrtStaticStep(graphed, ort_buffers, ids, ctx, device, i + 1, cfg.vocab_size)
                anchor_graph = AnchorStep(tmodel, anchor_buffers, batch, ctx, variant, True)
                row["ort_cuda_graph_ms"] = round(1e3 * clock.time(lambda: ort_graph(ids), 3, args.repeats)[0], 3)
                row["anchor_cuda_graph_ms"] = round(1e3 * clock.time(lambda: anchor_graph(tids), 3,
                                                                     args.repeats)[0], 3)
                for k in args.sdpa_kernels:  # the attention kernel ORT picks is most of the gap: try the others
                    if k == 0:
                        continue
                    try:
                        other = ort_static_session(path, device, True, "next-power-of-two", sdpa_kernel=k)
                        step_k = OrtStaticStep(other, ort_buffers, ids, ctx, device, 1, cfg.vocab_size)
                        ms = round(1e3 * clock.time(lambda: step_k(ids), 3, args.repeats)[0], 3)
                        row[f"ort_cuda_graph_sdpa{k}"] = dict(ms=ms, **kernel_profile(lambda: step_k(ids), clock.sync))
                    except Exception as e:  # a kernel that cannot take these heads: say why, keep the rest
                        row[f"ort_cuda_graph_sdpa{k}"] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    step_k = other = None
                row["ort"] = kernel_profile(lambda: ort_step(ids), clock.sync)
                row["anchor"] = kernel_profile(lambda: anchor_eager(tids), clock.sync)
                row["ort_graph_replay"] = kernel_profile(lambda: ort_graph(ids), clock.sync)
                row["anchor_graph_replay"] = kernel_profile(lambda: anchor_graph(tids), clock.sync)
                ort_graph = anchor_graph = None
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)} |
                             {k: v.get("by_category", v) | ({"ms": v["ms"]} if "ms" in v else {})
                              for k, v in row.items() if isinstance(v, dict)}), flush=True)
            ort_step = anchor_eager = None
        plain = graphed = None
        del ort_buffers, anchor_buffers
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    meta["total_s"] = round(time.perf_counter() - t0, 1)
    write_record(args.out / "profile_decode_gpu.json", dict(meta=meta, rows=rows))
    for row in rows:
        if "ort" not in row:
            continue
        print(f"\n== batch {row['batch']}, context {row['context']}: wall ms ORT graph {row['ort_cuda_graph_ms']} / "
              f"anchor graph {row['anchor_cuda_graph_ms']}")
        for side in ("ort", "anchor"):
            print(f"  {side}: {row[side]['kernels']} kernels, {row[side]['kernel_us']} us: {row[side]['by_category']}")
            for t in row[side]["top"][:6]:
                print(f"     {t['us']:9.1f} us {t['count']:4d}x [{t['category']}] {t['kernel']}")


if __name__ == "__main__":
    main()
