#!/usr/bin/env python3
"""Prefill and decode speed and peak GPU memory: ONNX Runtime CUDA (fp16 KV-cache export, IO binding,
cache on the GPU) against PyTorch eager (SDPA with a materialized ALiBi bias) and PyTorch with the fused
Triton ALiBi kernel. Issue 5, "GPU".

The model is RANDOMLY INITIALIZED (torch.manual_seed(0)); speed does not depend on the weights. Default:
12 layers, d_model 768, 12 heads, d_ff 3072, vocab 4096 (the shipped tokenizer), ALiBi.

    python tools/bench_generate_gpu.py --out results/          # on the GPU machine
    python tools/bench_generate_gpu.py --quick --out /tmp/b    # CPU smoke test, tiny model

prefill: batch 1, C random tokens, past 0, all C logits and the cache produced on the device; tokens/s. Inputs are
ready before the clock starts on both sides: PyTorch's on the device, ORT's in one IO binding (ids and mask bound
from the host and copied in by each run, the empty cache as device OrtValues, outputs allocated by each run).
decode:  one token per row at context C (a random cache of C positions per layer), batch 1 and 16; ms per
step, ORT through IO binding (cache bound on the GPU, logits of the new token copied to the host, as
GenerationSession.step does), PyTorch with the cache as a list of tensors.
Times: CUDA synchronize around each call (ORT's Run also synchronizes), warm-up, median of repeats.
Memory: PyTorch torch.cuda.max_memory_allocated (reset before each point); ONNX Runtime: device memory in use
(cudaMemGetInfo) minus what torch's allocator holds, measured against the value before that session was
created (weights, arena, cuBLAS workspace: everything ORT holds), one fresh session per sweep so the arena's
high-water mark is that sweep's; the decode input cache (held by torch, bound by pointer) is added, as it
counts in PyTorch's. --ort-arena picks arena_extend_strategy. With same-as-requested, every Loop chunk of the
prefill asks for a slightly larger score buffer than the last (its key range grows), no freed region fits, and
the arena's high-water mark becomes the SUM of the chunks' buffers (quadratic in the context): that measures the
arena policy, not the graph's working set.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from harness import time_one, write_record  # noqa: E402

from alibi_export import AlibiLM, ModelConfig, load, save  # noqa: E402
from alibi_export.export.onnx import export_onnx  # noqa: E402
from alibi_export.shipped import default_model  # noqa: E402


def log(*a):
    print(*a, flush=True)


class Clock:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn, warmup: int, repeats: int, budget_s: float = 20.0) -> tuple[float, int]:
        """Median seconds of fn() and the number of timed calls (fewer when one call is slow)."""
        timing = time_one(fn, warmup=warmup, repeats=repeats, sync=self.sync, budget_s=budget_s)
        return timing.median, len(timing.samples)


# ----------------------------------------------------------------------------------------- ONNX Runtime
# KV-cache export forms: the default decomposed attention, the standard Attention op with ALiBi folded into
# extra head dims, and that with ONNX Runtime's fused SkipLayerNormalization / BiasGelu (--ort-fusions)
FORMS = {"decomposed": dict(attention="decomposed"), "onnx": dict(attention="onnx"),
         "onnx-fused": dict(attention="onnx", ort_fusions=True)}
ARENA = {"next-power-of-two": "kNextPowerOfTwo", "same-as-requested": "kSameAsRequested"}


def ort_session(path, provider: str, arena: str = "next-power-of-two", sdpa_kernel: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if provider == "cuda":
        cuda = {"use_tf32": 0, "arena_extend_strategy": ARENA[arena]}
        if sdpa_kernel:
            cuda["sdpa_kernel"] = str(sdpa_kernel)
        providers = [("CUDAExecutionProvider", cuda)]
    else:
        providers = ["CPUExecutionProvider"]
    s = ort.InferenceSession(str(path), options, providers=providers)
    assert s.get_providers()[0] == providers[0][0] if provider == "cuda" else True, s.get_providers()
    return s


class OrtModel:
    def __init__(self, session, cfg, device: str):
        self.s, self.cfg, self.device = session, cfg, device
        self.past = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        self.present = [o.name for o in session.get_outputs() if o.name.startswith("present.")]
        self.width = session.get_inputs()[2].shape[-1]  # head_dim, or head_dim + 8 in the onnx attention form

    def run(self, ids: np.ndarray, past: list, logits_on_host: bool):
        """One forward; returns its IO binding."""
        b = self.bind(ids, past, logits_on_host)
        self.s.run_with_iobinding(b)
        return b

    def bind(self, ids: np.ndarray, past: list, logits_on_host: bool):
        """An IO binding for one forward. ``past``: torch tensors (B, H, P, D) on the device, bound by pointer,
        or OrtValues."""
        b = self.s.io_binding()
        B, L = ids.shape
        P = past[0].shape[2] if isinstance(past[0], torch.Tensor) else past[0].shape()[2]
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("attention_mask", np.ones((B, P + L), dtype=np.int64))
        for name, t in zip(self.past, past):
            if not isinstance(t, torch.Tensor):  # an OrtValue made once, outside the timed call
                b.bind_ortvalue_input(name, t)
            elif P == 0 or self.device == "cpu":
                from onnxruntime import OrtValue

                b.bind_ortvalue_input(name, OrtValue.ortvalue_from_numpy(
                    t.cpu().numpy(), "cuda" if self.device == "cuda" else "cpu", 0))
            else:
                b.bind_input(name, "cuda", 0, np.float16, list(t.shape), t.data_ptr())
        b.bind_output("logits", "cpu" if logits_on_host else self.device)
        for name in self.present:
            b.bind_output(name, self.device, 0)
        return b


def ort_memory_bytes(base_used: int, base_torch: int) -> int:
    free, total = torch.cuda.mem_get_info()
    return (total - free - base_used) - (torch.cuda.memory_reserved() - base_torch)


# ----------------------------------------------------------------------------------------- helpers
def random_cache(cfg, batch, context, dtype, device, width=None):
    g = torch.Generator(device=device).manual_seed(context)
    shape = (batch, cfg.n_head, context, width or cfg.head_dim)
    return [torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype) for _ in
            range(2 * cfg.n_layer)]


def pairs(flat):
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def gib(n):
    return round(n / 2**30, 3)


def bench_ort(name, path, cfg, args, clock, results, device):
    """Prefill (batch 1) and decode (each batch) sweeps for one ONNX file; fresh session per sweep."""
    rng = np.random.default_rng(0)
    cuda = device == "cuda"
    for mode, batch in [(m, b) for m, b in [("prefill", 1)] + [("decode", b) for b in args.batches]
                        if m in args.modes]:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            base_used = torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0]
            base_torch = torch.cuda.memory_reserved()
        model = OrtModel(ort_session(path, device, args.ort_arena, args.ort_sdpa_kernel), cfg, device)
        for ctx in args.contexts:
            if mode == "prefill":
                if ctx > args.ort_prefill_max:
                    results.append(dict(runtime=name, mode=mode, batch=batch, context=ctx, skipped="--ort-prefill-max"))
                    continue
                ids = rng.integers(0, cfg.vocab_size, (1, ctx), dtype=np.int64)
                from onnxruntime import OrtValue

                # the empty cache is made once, as PyTorch's is: the timed call binds and runs
                empty = [OrtValue.ortvalue_from_numpy(np.zeros((1, cfg.n_head, 0, model.width), np.float16), device, 0)
                         for _ in model.past]
                binding = model.bind(ids, empty, False)  # ORT allocates the outputs on the device at each run
                sec, n = clock.time(lambda: model.s.run_with_iobinding(binding), 1, args.prefill_repeats)
                extra = 0
                row = dict(tokens_per_s=round(ctx / sec, 1), ms=round(1e3 * sec, 3))
            else:
                cache = random_cache(cfg, batch, ctx, torch.float16, device, model.width)
                ids = rng.integers(0, cfg.vocab_size, (batch, 1), dtype=np.int64)
                sec, n = clock.time(lambda: model.run(ids, cache, True), 3, args.decode_repeats)
                extra = sum(t.numel() * t.element_size() for t in cache)
                row = dict(ms_per_token=round(1e3 * sec, 3))
            if cuda:
                row["peak_gib"] = gib(ort_memory_bytes(base_used, base_torch) + extra)
            results.append(dict(runtime=name, mode=mode, batch=batch, context=ctx, repeats=n, **row))
            log(json.dumps(results[-1]))
            if mode == "decode":
                del cache
        model = None  # frees the session and its arena before the next sweep
    return results


def bench_torch(name, model, cfg, args, clock, results, device):
    cuda = device == "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)
    for mode, batch in [(m, b) for m, b in [("prefill", 1)] + [("decode", b) for b in args.batches]
                        if m in args.modes]:
        for ctx in args.contexts:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            if mode == "prefill":
                ids = torch.randint(0, cfg.vocab_size, (1, ctx), generator=g).to(device)
                empty = [(torch.zeros(1, cfg.n_head, 0, cfg.head_dim, device=device, dtype=args.torch_dtype),) * 2
                         for _ in range(cfg.n_layer)]

                def fn():
                    with torch.inference_mode():
                        return model(ids, past_key_values=empty)

                sec, n = clock.time(fn, 1, args.prefill_repeats)
                row = dict(tokens_per_s=round(ctx / sec, 1), ms=round(1e3 * sec, 3))
            else:
                cache = pairs(random_cache(cfg, batch, ctx, args.torch_dtype, device))
                ids = torch.randint(0, cfg.vocab_size, (batch, 1), generator=g).to(device)

                def fn():
                    with torch.inference_mode():
                        logits, _ = model(ids, past_key_values=cache)
                        return logits[:, -1].float().cpu()  # the new token's logits to the host, as ORT's

                sec, n = clock.time(fn, 3, args.decode_repeats)
                row = dict(ms_per_token=round(1e3 * sec, 3))
                del cache
            if cuda:
                row["peak_gib"] = gib(torch.cuda.max_memory_allocated())
            results.append(dict(runtime=name, mode=mode, batch=batch, context=ctx, repeats=n, **row))
            log(json.dumps(results[-1]))
    return results


def try_optimizer(path: Path, cfg, out: Path, use_gpu: bool) -> dict:
    """onnxruntime.transformers optimizer on the export; returns what it fused and where it saved."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    info = {}
    before = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        before[node.op_type] = before.get(node.op_type, 0) + 1
    for model_type in ("gpt2", "bert"):
        try:
            t0 = time.perf_counter()
            opt = optimize_model(str(path), model_type=model_type, num_heads=cfg.n_head, hidden_size=cfg.d_model,
                                 opt_level=0, use_gpu=use_gpu)
            stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
            after = {}
            for node in opt.model.graph.node:
                after[node.op_type] = after.get(node.op_type, 0) + 1
            target = out / f"optimized-{model_type}.onnx"
            opt.save_model_to_file(str(target))
            info[model_type] = dict(fused=stats, nodes_before=sum(before.values()), nodes_after=sum(after.values()),
                                    new_ops=sorted(set(after) - set(before)), path=str(target),
                                    seconds=round(time.perf_counter() - t0, 1))
        except Exception as e:  # report, keep going
            info[model_type] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        log(model_type, json.dumps(info[model_type]))
    return info


def table(results) -> str:
    lines = []
    rts = list(dict.fromkeys(r["runtime"] for r in results))
    ctxs = sorted({r["context"] for r in results})
    for mode, batch, key, unit in [("prefill", 1, "tokens_per_s", "prefill tokens/s, batch 1")] + \
            [("decode", b, "ms_per_token", f"decode ms/step, batch {b}")
             for b in sorted({r["batch"] for r in results if r["mode"] == "decode"})]:
        lines.append(f"\n{unit} (peak GiB)")
        lines.append("| runtime | " + " | ".join(f"{c // 1024}k" if c >= 1024 else str(c) for c in ctxs) + " |")
        lines.append("|---" * (len(ctxs) + 1) + "|")
        for rt in rts:
            cells = []
            for c in ctxs:
                r = next((r for r in results if r["runtime"] == rt and r["mode"] == mode and r["batch"] == batch
                          and r["context"] == c), None)
                if r is None or "skipped" in r:
                    cells.append("—")
                else:
                    cells.append(f"{r[key]:g}" + (f" ({r['peak_gib']:.2f})" if "peak_gib" in r else ""))
            if any(c != "—" for c in cells):
                lines.append(f"| {rt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="tiny model, tiny contexts, CPU allowed (smoke test)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prefill-repeats", type=int, default=5)
    p.add_argument("--decode-repeats", type=int, default=20)
    p.add_argument("--ort-prefill-max", type=int, default=1 << 20)
    p.add_argument("--torch-dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--skip-optimizer", action="store_true")
    p.add_argument("--ort-sdpa-kernel", type=int, default=0,
                   help="CUDA EP sdpa_kernel bitmask for the timed sessions (0: ORT's choice; 1 flash, 2 efficient)")
    p.add_argument("--modes", nargs="+", default=["prefill", "decode"], choices=["prefill", "decode"])
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS),
                   help="KV-cache export forms to time (onnx: the standard Attention op, ALiBi folded into extra "
                        "head dimensions; onnx-fused: that with --ort-fusions)")
    p.add_argument("--ort-arena", default="next-power-of-two", choices=sorted(ARENA),
                   help="ORT CUDA arena_extend_strategy for the timed sessions (ORT's default: next-power-of-two)")
    args = p.parse_args(argv)
    args.torch_dtype = getattr(torch, args.torch_dtype)
    if args.quick:
        args.layers, args.d_model, args.heads, args.vocab = 2, 64, 4, 4096
        args.contexts, args.batches = [64, 128], [1, 2]
        args.prefill_repeats, args.decode_repeats = 2, 3
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clock = Clock(device == "cuda")
    import onnxruntime as ort

    if device == "cuda" and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as e:
            log("preload_dlls:", e)
    t_start = time.perf_counter()

    # ---- the random model, saved as a checkpoint (shipped tokenizer) and exported fp16 with a KV cache
    from tokenizers import Tokenizer

    cfg = ModelConfig(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, d_model=args.d_model,
                      d_ff=4 * args.d_model, train_len=1024, max_positions=1024)
    torch.manual_seed(0)
    model = AlibiLM(cfg).eval()
    work = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    save(model, Tokenizer.from_file(str(default_model() / "tokenizer.json")), work / "ckpt")
    t0 = time.perf_counter()
    if device == "cpu" and set(args.forms) - {"decomposed"}:
        args.forms = [f for f in args.forms if f == "decomposed"]  # fp16 onnx form: float32 accumulation needed
        log("skipping the onnx attention form on the CPU")
    paths = {form: export_onnx(load(work / "ckpt"), work / f"model-fp16-kv-{form}.onnx", kv_cache=True,
                               dtype="float16", **FORMS[form]).path for form in args.forms}
    onnx_path = paths[args.forms[0]]
    export_s = time.perf_counter() - t0
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, onnxruntime=ort.__version__, config=cfg.to_dict(),
                parameters=model.num_parameters(), weights="random (torch.manual_seed(0))",
                onnx_mb=round(onnx_path.stat().st_size / 1e6, 1), export_s=round(export_s, 1),
                torch_dtype=str(args.torch_dtype), ort_arena=args.ort_arena, argv=sys.argv[1:])
    log(json.dumps(meta))

    results = []
    # ---- the transformer optimizer: what it fuses; parity with the plain export before it is timed
    prefix = "ort-cuda-fp16" if device == "cuda" else "ort-cpu-fp16"
    name_of = {"decomposed": prefix, "onnx": f"{prefix}-onnx-attention", "onnx-fused": f"{prefix}-onnx-attention-fused"}
    variants = [(name_of[form], path) for form, path in paths.items()]
    meta["optimizer"] = {}
    # ORT's optimizer with its default options, as a user would first try it (onnx-fused is the tuned use)
    for form, path in ([] if args.skip_optimizer else [(f, p) for f, p in paths.items() if f != "onnx-fused"]):
        base = name_of[form]
        (work / form).mkdir(exist_ok=True)
        meta["optimizer"][form] = info_of = try_optimizer(path, cfg, work / form, device == "cuda")
        ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 300), dtype=np.int64)
        plain = OrtModel(ort_session(path, device), cfg, device)
        empty = [torch.zeros(1, cfg.n_head, 0, plain.width, dtype=torch.float16)] * (2 * cfg.n_layer)
        ref = plain.run(ids, empty, True).get_outputs()[0].numpy()
        added = []
        for model_type, info in info_of.items():
            if "path" not in info:
                continue
            try:
                got = OrtModel(ort_session(info["path"], device), cfg, device).run(ids, empty, True)
                got = got.get_outputs()[0].numpy()
                info["max_abs_vs_plain"] = float(np.abs(got.astype(np.float32) - ref.astype(np.float32)).max())
                info["runs"] = True
                if info.get("nodes_after") != info.get("nodes_before") and info["max_abs_vs_plain"] < 0.1:
                    added.append((info.get("nodes_after"), (f"{base}-opt-{model_type}", Path(info["path"]))))
            except Exception as e:
                info["runs"] = False
                info["run_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            log(form, model_type, json.dumps(info))
        # one optimized variant is enough when both model types produced the same graph
        if len(added) == 2 and added[0][0] == added[1][0]:
            added.pop()
        variants += [v for _, v in added]

    # ---- the API end to end on the device (GenerationSession, prompt 1000 tokens, 64 new)
    from alibi_export.runtime.generate import GenerationSession

    prompt = np.random.default_rng(2).integers(1, cfg.vocab_size, (1, 1000)).tolist()
    meta["generation_session"] = {}
    for form, path in paths.items():
        gs = GenerationSession(path, provider=device)
        gs.generate_ids(prompt, 4, stop_tokens=[])  # warm-up
        r = gs.generate_ids(prompt, 64, stop_tokens=[])
        meta["generation_session"][form] = dict(
            prompt=1000, new_tokens=r.new_tokens, prefill_ms=round(1e3 * r.prefill_seconds, 2),
            decode_ms_per_step=round(r.decode_ms_per_step, 3), tokens_per_s=round(r.tokens_per_s, 1),
            cache_device=gs.step(np.array([[1]]), np.ones((1, 1), np.int64), gs.new_cache(1))[1][0].device_name())
        log("GenerationSession", form, json.dumps(meta["generation_session"][form]))
        del gs

    for name, path in variants:
        bench_ort(name, path, cfg, args, clock, results, device)
        log(f"[{time.perf_counter() - t_start:.0f}s] done {name}")

    # ---- PyTorch: fp16 (or bf16) on the device
    tmodel = copy.deepcopy(model).to(device=device, dtype=args.torch_dtype).eval()
    del model
    impls = [] if args.skip_torch else ["sdpa"] + (["triton"] if device == "cuda" else [])
    for impl in impls:
        tmodel.set_attention(impl)
        bench_torch(f"torch-{impl}", tmodel, cfg, args, clock, results, device)
        log(f"[{time.perf_counter() - t_start:.0f}s] done torch-{impl}")

    meta["total_s"] = round(time.perf_counter() - t_start, 1)
    write_record(args.out / "bench_generate_gpu.json", dict(meta=meta, results=results))
    text = table(results)
    (args.out / "bench_generate_gpu.md").write_text(text + "\n")
    log(json.dumps({k: v for k, v in meta.items() if k != "config"}, indent=None))
    log(text)


if __name__ == "__main__":
    main()
