#!/usr/bin/env python3
"""Where a 16k-token prefill spends GPU time: CUDA kernel times (CUPTI, through torch.profiler) of one
ONNX Runtime CUDA prefill of the fp16 `--attention onnx` KV-cache export, and of the PyTorch forward with
the fused Triton ALiBi kernel, in one process. Same random 12-layer model as tools/bench_generate_gpu.py.

    python tools/profile_prefill_gpu.py [--length 16384] [--ort-fusions]     # GPU machine, onnxruntime-gpu
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from harness import cuda_kernel_times, time_one

from alibi_export import AlibiLM, ModelConfig, load, save  # noqa: E402
from alibi_export.export.onnx import export_onnx  # noqa: E402
from alibi_export.shipped import default_model  # noqa: E402


def report(name: str, fn, top: int = 14) -> None:
    wall = time_one(fn, warmup=3, repeats=1, sync=torch.cuda.synchronize).ms
    total, count = cuda_kernel_times(fn, torch.cuda.synchronize)
    print(f"== {name}: wall {wall:.2f} ms, GPU kernel sum {sum(total.values()) / 1000:.2f} ms")
    for kernel, us in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {us / 1000:7.2f} ms {count[kernel]:4d}x  {kernel}")


def main() -> None:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--ort-fusions", action="store_true", help="profile the --ort-fusions export")
    args = ap.parse_args()
    length = args.length
    cfg = ModelConfig(vocab_size=4096, n_layer=12, n_head=12, d_model=768, d_ff=3072, train_len=1024,
                      max_positions=1024)
    torch.manual_seed(0)
    model = AlibiLM(cfg).eval()
    work = Path(tempfile.mkdtemp(prefix="profile-prefill-"))
    save(model, Tokenizer.from_file(str(default_model() / "tokenizer.json")), work / "ckpt")
    path = export_onnx(load(work / "ckpt"), work / "kv.onnx", kv_cache=True, dtype="float16", attention="onnx",
                       ort_fusions=args.ort_fusions).path
    session = ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", {"use_tf32": 0})])
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, length), dtype=np.int64)
    binding = session.io_binding()
    binding.bind_cpu_input("input_ids", ids)
    binding.bind_cpu_input("attention_mask", np.ones((1, length), np.int64))
    for inp in session.get_inputs()[2:]:
        empty = np.zeros((1, cfg.n_head, 0, inp.shape[-1]), np.float16)
        binding.bind_ortvalue_input(inp.name, ort.OrtValue.ortvalue_from_numpy(empty, "cuda", 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda")
    fused = " --ort-fusions" if args.ort_fusions else ""
    report(f"ONNX Runtime CUDA, --attention onnx{fused}, prefill {length}", lambda: session.run_with_iobinding(binding))

    gpu = model.cuda().half().set_attention("triton")
    x = torch.from_numpy(ids).cuda()
    empty = [(torch.zeros(1, cfg.n_head, 0, cfg.head_dim, device="cuda", dtype=torch.half),) * 2] * cfg.n_layer

    def torch_prefill():
        with torch.inference_mode():
            gpu(x, past_key_values=empty)

    report(f"PyTorch + Triton ALiBi kernel, prefill {length}", torch_prefill)


if __name__ == "__main__":
    main()
