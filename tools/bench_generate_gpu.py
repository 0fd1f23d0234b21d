#!/usr/bin/env python3
"""Prefill and decode speed and peak GPU memory: ONNX Runtime CUDA (fp16 KV-cache export, IO binding,
cache on the GPU) against PyTorch eager (SDPA with a materialized ALiBi bias) and PyTorch with the fused
Triton ALiBi kernel. Issue 5, "GPU".

The model is RANDOMLY INITIALIZED (torch.manual_seed(0)); speed does not depend on the weights. Default:
12 layers, d_model 768, 12 heads, d_ff 3072, vocab 4096 (the shipped tokenizer), ALiBi.

    python tools/bench_generate_gpu.py --out results/          # on the GPU machine
    python tools/bench_generate_gpu.py --quick --out /tmp/b    # CPU smoke test, tiny model
    python tools/bench_generate_gpu.py --anchor --contexts 1024 4096 16384 --out results/   # issue 23 §2 only

--anchor: decode against a strong PyTorch anchor (a static in-place KV cache, each step one CUDA graph) and ORT's
static-cache export with and without ORT's CUDA graphs; see anchor_main and BENCHMARKS.md.

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


# ----------------------------------------------------------------------------------------- the anchor (issue 23 §2)
# What a serious PyTorch deployment runs for decoding: the same model in fp16 with a STATIC KV cache (buffers of
# (B, H, Lmax, D) allocated once; each step writes its column in place) and the whole step captured in one CUDA
# graph, so the host launches nothing but the replay. Attention is the model's own attend (AlibiLM's eager,
# sdpa or triton path, whose ALiBi bias comes from alibi.alibi_bias) over a view of the buffers: "sliced" reads
# the first position + 1 columns (one graph per context, as the measurement did), "masked" the whole
# buffer (one graph could serve every position; alibi_bias masks the unwritten columns as the future).
ANCHOR_VARIANTS = ("sliced-sdpa", "sliced-eager", "masked-sdpa", "sliced-triton")


def static_attend(position: int, impl: str, sliced: bool):
    """A block-level attend for AlibiLM.forward(past_key_values=buffers, past_len=position): writes the new
    keys and values at column ``position`` of the block's buffers and attends with the model's ``impl``."""
    from alibi_export.model import _ATTEND

    attend = _ATTEND[impl]

    def attend_block(attn, x, pos, past, key_mask=None):
        B, S, C = x.shape
        q, k, v = attn.project(x)
        q = q.view(B, S, attn.n_head, attn.head_dim).transpose(1, 2)
        k, v = (t.view(B, S, attn.n_kv_head, attn.head_dim).transpose(1, 2) for t in (k, v))
        kb, vb = past
        kb[:, :, position:position + S] = k  # in place: the cache never moves
        vb[:, :, position:position + S] = v
        n = position + S if sliced else kb.shape[2]
        y = attend(q, kb[:, :, :n], vb[:, :, :n], pos, position)
        return attn.proj(y.transpose(1, 2).reshape(B, S, C)), past

    attend_block.owns_block = True
    return attend_block


class AnchorStep:
    """One decode step (one token per row at ``position``) of ``model`` on the static buffers; ``graph``:
    captured once in a CUDA graph, each call copies the ids in, replays, and copies the logits out."""

    def __init__(self, model, buffers, batch: int, position: int, variant: str, graph: bool):
        layout, impl = variant.split("-")
        self.model, self.buffers, self.position = model, buffers, position
        self.attend = static_attend(position, impl, layout == "sliced")
        self.device = buffers[0][0].device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.graph = None
        if graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # Triton compiles, cuBLAS picks its kernels, before the capture
                    self._forward()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._forward()

    def _forward(self):
        saved = [b.attn.attend for b in self.model.blocks]
        for b in self.model.blocks:
            b.attn.attend = self.attend
        try:
            with torch.no_grad():
                return self.model(self.ids, past_key_values=self.buffers, past_len=self.position)[0]
        finally:
            for b, fn in zip(self.model.blocks, saved):
                b.attn.attend = fn

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` (B, 1) on the host -> the new token's logits (B, V) float32 on the host, as ORT's step."""
        self.ids.copy_(ids)
        if self.graph is None:
            out = self._forward()
        else:
            self.graph.replay()
            out = self.out
        return out[:, -1].float().cpu()


def anchor_parity(model, cfg, batch, ctx, variants, dtype, device, graph) -> dict:
    """Max |logits| difference of each anchor variant's step against the eager model (attend_eager, the cache
    concatenated) on the same random cache and ids, in the same dtype; and the logits' scale."""
    buffers = pairs(random_cache(cfg, batch, ctx + 1, dtype, device))
    ids = torch.randint(0, cfg.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(ctx))
    saved = [b.attn.attend for b in model.blocks]
    model.set_attention("eager")
    with torch.no_grad():
        ref = model(ids.to(device), past_key_values=[(k[:, :, :ctx], v[:, :, :ctx]) for k, v in buffers])[0]
    for b, fn in zip(model.blocks, saved):
        b.attn.attend = fn
    ref = ref[:, -1].float().cpu()
    out = dict(batch=batch, context=ctx, logits_max_abs=round(float(ref.abs().max()), 4))
    for variant in variants:
        try:
            got = AnchorStep(model, buffers, batch, ctx, variant, graph)(ids)
            out[variant] = float((got - ref).abs().max())
        except Exception as e:  # reported; bench_anchor reports the same variant as skipped
            out[variant] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return out


def bench_anchor(model, cfg, args, clock, results, device, dtype, variants):
    """ms/step of each anchor variant at every batch and context, variant by variant (a variant that breaks the
    device runs after the others have been measured), and the first variant without the graph."""
    cuda = device == "cuda"
    for variant in variants:
        rng = torch.Generator().manual_seed(0)  # the same ids for every variant: comparable logits sums
        for batch in args.batches:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            buffers = pairs(random_cache(cfg, batch, max(args.contexts) + 1, dtype, device))
            for ctx in args.contexts:
                ids = torch.randint(0, cfg.vocab_size, (batch, 1), generator=rng)
                # the CPU smoke test runs the same step eagerly: the capture needs CUDA
                for graph in ([True, False] if cuda and variant == ANCHOR_VARIANTS[0] else [cuda]):
                    name = f"anchor-{variant}" + ("" if graph or not cuda else "-no-graph")
                    try:
                        step = AnchorStep(model, buffers, batch, ctx, variant, graph)
                        sec, n = clock.time(lambda: step(ids), 3, args.decode_repeats)
                        # every variant sees the same buffers and ids: the sums agree to fp16 rounding
                        row = dict(ms_per_token=round(1e3 * sec, 3), repeats=n,
                                   logits_l1=float(step(ids).abs().sum()))
                    except Exception as e:  # a variant the device cannot run: say why, keep the others
                        row = dict(skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                    step = None
                    results.append(dict(runtime=name, mode="decode", batch=batch, context=ctx, **row))
                    log(json.dumps(results[-1]))
            del buffers
    return results


# ----------------------------------------------------------------------------------------- ORT static cache
def ort_static_session(path, device: str, cuda_graph: bool, arena: str, optimized: Path | None = None,
                       sdpa_kernel: int = 0):
    """``optimized``: where ONNX Runtime saves the graph it runs (after partitioning: with any Memcpy nodes
    it inserted between the providers, which its CUDA graphs refuse). ``sdpa_kernel``: the CUDA EP's attention
    kernel bitmask (0: ONNX Runtime's choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    if device != "cuda":
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    cuda = {"use_tf32": "0", "arena_extend_strategy": ARENA[arena]}
    if cuda_graph:
        cuda["enable_cuda_graph"] = "1"
    if sdpa_kernel:
        cuda["sdpa_kernel"] = str(sdpa_kernel)
    return ort.InferenceSession(str(path), options, providers=[("CUDAExecutionProvider", cuda)])


def memcpy_nodes(optimized: Path) -> dict:
    """The host-device copies ONNX Runtime put into the graph it runs, each with what it feeds: why a CUDA
    graph cannot be captured (and a per-step synchronization) when there are any."""
    import onnx

    graph = onnx.load(str(optimized), load_external_data=False).graph
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    copies = [dict(op=n.op_type, input=n.input[0], feeds=sorted(set(consumers.get(n.output[0], []))))
              for n in graph.node if n.op_type.startswith("Memcpy")]
    return dict(nodes=len(graph.node), memcpy=len(copies), copies=copies[:12])


class OrtStaticStep:
    """One decode step of the static-cache export through IO binding, the buffers bound as both past and
    present (updated in place). ``graph``: ONNX Runtime's CUDA graph, one graph id per context (the mask's
    width is fixed per graph): ids, mask and logits live in device OrtValues bound once; each call copies the
    ids in, runs (a replay once captured) and copies the logits out."""

    def __init__(self, session, buffers, ids: np.ndarray, ctx: int, device: str, graph_id: int | None,
                 vocab_size: int):
        import onnxruntime as ort

        self.s, self.graph = session, graph_id is not None
        B = ids.shape[0]
        mask = self.mask = np.ones((B, ctx + 1), np.int64)  # kept alive with the binding
        past = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        present = [o.name for o in session.get_outputs() if o.name.startswith("present.")]
        b = self.b = session.io_binding()
        dt = np.float16 if buffers[0].dtype == torch.float16 else np.float32
        self.run_options = None
        if self.graph:
            self.ids = ort.OrtValue.ortvalue_from_numpy(ids, device, 0)
            b.bind_ortvalue_input("input_ids", self.ids)
            self.mask_value = ort.OrtValue.ortvalue_from_numpy(mask, device, 0)
            b.bind_ortvalue_input("attention_mask", self.mask_value)
            vocab = int(self.s.get_outputs()[0].shape[-1]) if isinstance(self.s.get_outputs()[0].shape[-1], int) \
                else vocab_size
            self.logits = ort.OrtValue.ortvalue_from_shape_and_type([B, 1, vocab], dt, device, 0)
            b.bind_ortvalue_output("logits", self.logits)
            self.run_options = ort.RunOptions()
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        else:
            b.bind_cpu_input("input_ids", ids)
            b.bind_cpu_input("attention_mask", mask)
            b.bind_output("logits", "cpu")  # bound first: get_outputs() lists the outputs in binding order
        for pname, oname, t in zip(past, present, buffers):
            b.bind_input(pname, device, 0, dt, list(t.shape), t.data_ptr())
            b.bind_output(oname, device, 0, dt, list(t.shape), t.data_ptr())

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        if self.graph:
            self.ids.update_inplace(ids)
            self.s.run_with_iobinding(self.b, self.run_options)
            return self.logits.numpy()[:, -1].astype(np.float32)
        self.b.bind_cpu_input("input_ids", ids)
        self.s.run_with_iobinding(self.b)
        return self.b.get_outputs()[0].numpy()[:, -1].astype(np.float32)


def bench_ort_static(name, path, cfg, args, clock, results, device, graph: bool, meta: dict):
    """ms/step of the static-cache export at every batch and context; one session per batch (with graphs,
    one graph id per context). Without graphs, the first session saves the graph it runs and ``meta`` gets
    its Memcpy nodes."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    rng = np.random.default_rng(0)
    for batch in args.batches:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        optimized = None if graph or "ort_static_placement" in meta else Path(path).with_suffix(".optimized.onnx")
        try:
            if optimized is not None:
                try:  # a diagnostic: its failure must not cost the timings
                    session = ort_static_session(path, device, graph, args.ort_arena, optimized)
                    meta["ort_static_placement"] = memcpy_nodes(optimized)
                except Exception as e:
                    meta["ort_static_placement"] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                    session = ort_static_session(path, device, graph, args.ort_arena)
                log("ort static placement", json.dumps(meta["ort_static_placement"]))
            else:
                session = ort_static_session(path, device, graph, args.ort_arena)
        except Exception as e:
            for ctx in args.contexts:
                results.append(dict(runtime=name, mode="decode", batch=batch, context=ctx,
                                    skipped=f"session: {type(e).__name__}: {str(e).splitlines()[0][:300]}"))
            log(json.dumps(results[-1]))
            continue
        width = session.get_inputs()[2].shape[-1]
        buffers = random_cache(cfg, batch, max(args.contexts) + 1, dtype, device, width)
        for i, ctx in enumerate(args.contexts):
            ids = rng.integers(0, cfg.vocab_size, (batch, 1), dtype=np.int64)
            try:
                step = OrtStaticStep(session, buffers, ids, ctx, device, i + 1 if graph else None, cfg.vocab_size)
                sec, n = clock.time(lambda: step(ids), 3, args.decode_repeats)
                # the same buffers and ids in every sweep of this batch: equal sums say a replay computes the step
                row = dict(ms_per_token=round(1e3 * sec, 3), repeats=n, logits_l1=float(np.abs(step(ids)).sum()))
            except Exception as e:
                row = dict(skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            step = None
            results.append(dict(runtime=name, mode="decode", batch=batch, context=ctx, **row))
            log(json.dumps(results[-1]))
        session = None
        del buffers
    return results


def ort_static_parity(path, model, cfg, device, prompt: int = 300) -> dict:
    """The static export against the eager model (float32 copy) on one real prompt: the prefill's last logits
    and one decode step's, through GenerationSession (the buffers bound in place); max |difference|."""
    from alibi_export.runtime.generate import GenerationSession

    gs = GenerationSession(path, provider=device)
    ids = np.random.default_rng(3).integers(1, cfg.vocab_size, (1, prompt + 1))
    cache = gs.new_cache(1, prompt + 1)
    first, cache = gs.step(ids[:, :prompt], np.ones((1, prompt), np.int64), cache)
    second, _ = gs.step(ids[:, prompt:], np.ones((1, prompt + 1), np.int64), cache)
    ref_model = copy.deepcopy(model).float().to(device).eval()
    ref_model.set_attention("eager")
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids).to(device)).float().cpu().numpy()  # (1, L, V)
    del ref_model
    return dict(prompt=prompt, logits_max_abs=round(float(np.abs(ref).max()), 4),
                prefill_last=float(np.abs(first[:, -1] - ref[:, prompt - 1]).max()),
                decode_step=float(np.abs(second[:, -1] - ref[:, prompt]).max()))


def anchor_table(results, contexts, batches) -> tuple[str, list]:
    """Markdown: ms/step per runtime, and ORT / anchor (the best anchor variant with a graph, the best ORT)."""
    lines, ratios = [], []
    rts = list(dict.fromkeys(r["runtime"] for r in results))
    head = "| runtime | " + " | ".join(f"{c // 1024}k" if c >= 1024 else str(c) for c in contexts) + " |"

    def ms(rt, b, c):
        r = next((r for r in results if r["runtime"] == rt and r["batch"] == b and r["context"] == c), None)
        return None if r is None or "skipped" in r else r["ms_per_token"]

    for b in batches:
        lines += [f"\ndecode ms/step, batch {b}", head, "|---" * (len(contexts) + 1) + "|"]
        for rt in rts:
            lines.append(f"| {rt} | " + " | ".join("—" if ms(rt, b, c) is None else f"{ms(rt, b, c):g}"
                                                   for c in contexts) + " |")
        cells = []
        for c in contexts:
            anchors = [ms(rt, b, c) for rt in rts if rt.startswith("anchor-") and not rt.endswith("-no-graph")]
            orts = [(ms(rt, b, c), rt) for rt in rts if rt.startswith("ort-")]
            anchors, orts = [a for a in anchors if a], [o for o in orts if o[0]]
            if anchors and orts:
                best = min(orts)
                ratios.append(dict(batch=b, context=c, anchor_ms=min(anchors), ort_ms=best[0], ort=best[1],
                                   ratio=round(best[0] / min(anchors), 3)))
                cells.append(f"{ratios[-1]['ratio']:.2f}x")
            else:
                cells.append("—")
        lines.append("| **best ORT / best anchor** | " + " | ".join(cells) + " |")
    return "\n".join(lines), ratios


def random_checkpoint(args, prefix: str):
    """(config, model, work folder) of the seeded random model both parts of the tool measure, saved as
    ``work/ckpt`` with the shipped tokenizer (the exports are made from that folder)."""
    from tokenizers import Tokenizer

    cfg = ModelConfig(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, d_model=args.d_model,
                      d_ff=4 * args.d_model, train_len=1024, max_positions=1024)
    torch.manual_seed(0)
    model = AlibiLM(cfg).eval()
    work = Path(tempfile.mkdtemp(prefix=prefix))
    save(model, Tokenizer.from_file(str(default_model() / "tokenizer.json")), work / "ckpt")
    return cfg, model, work


def anchor_main(args, device: str, clock) -> None:
    """Issue 23 §2 in one run: the anchor, ORT's static-cache export (IO binding; CUDA graphs), and ORT's
    concatenating export for reference; parity of each against the eager model; one JSON under --out, rewritten
    after every section (a section that fails is recorded in meta.errors and the others still run)."""
    import onnxruntime as ort
    t_start = time.perf_counter()
    cuda = device == "cuda"
    dtype = args.torch_dtype if cuda else torch.float32  # fp16 matmuls on a CPU are neither fast nor the point
    if not cuda:  # the CPU run is a smoke test; a shared 2-core machine's spinning threads made its steps 50x slower
        torch.set_num_threads(1)
    cfg, model, work = random_checkpoint(args, "bench-anchor-")
    ort_dtype = "float16" if cuda else "float32"  # the onnx form in fp16 runs on CUDA only
    meta = dict(device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                torch=torch.__version__, onnxruntime=ort.__version__, config=cfg.to_dict(),
                parameters=model.num_parameters(), weights="random (torch.manual_seed(0))",
                torch_dtype=str(dtype), ort_dtype=ort_dtype, argv=sys.argv[1:], exports={}, errors={})
    results, paths = [], {}
    args.anchor_variants = [v for v in args.anchor_variants if cuda or not v.endswith("triton")]
    args.modes = ["decode"]
    prefix = "ort-cuda" if cuda else "ort-cpu"

    def save_record():
        text, ratios = anchor_table(results, args.contexts, args.batches)
        meta["total_s"] = round(time.perf_counter() - t_start, 1)
        write_record(args.out / "bench_decode_anchor.json", dict(meta=meta, results=results, ratios=ratios))
        (args.out / "bench_decode_anchor.md").write_text(text + "\n")
        return text

    def anchor(variants):
        if not variants:
            return
        tmodel = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        parity = [anchor_parity(tmodel, cfg, b, args.contexts[0], variants, dtype, device, cuda) for b in args.batches]
        meta.setdefault("anchor_parity", []).extend(parity)
        log("anchor parity", json.dumps(parity))
        bench_anchor(tmodel, cfg, args, clock, results, device, dtype, variants)

    # the fused Triton kernel's variant runs last: were its capture to break the device, everything else is measured
    safe = [v for v in args.anchor_variants if not v.endswith("triton")]
    risky = [v for v in args.anchor_variants if v.endswith("triton")]

    def exports():
        lmax = max(args.contexts) + 1
        options = {"static": dict(kv_cache=True, static_cache=lmax, attention="onnx", ort_fusions=True,
                                  dtype=ort_dtype),
                   "concat": dict(kv_cache=True, dtype="float16",
                                  **(FORMS["onnx-fused"] if cuda else FORMS["decomposed"]))}
        for key, opts in options.items():
            t0 = time.perf_counter()
            paths[key] = export_onnx(load(work / "ckpt"), work / f"model-{key}.onnx", **opts).path
            meta["exports"][key] = dict(opts, seconds=round(time.perf_counter() - t0, 1),
                                        mb=round(paths[key].stat().st_size / 1e6, 1))
            log(f"[{time.perf_counter() - t_start:.0f}s] exported {key}", json.dumps(meta["exports"][key]))

    def static_parity():
        meta["ort_static_parity"] = ort_static_parity(paths["static"], model, cfg, device)
        log("ort static parity", json.dumps(meta["ort_static_parity"]))

    sections = [
        ("anchor", lambda: anchor(safe)), ("exports", exports), ("ort_static_parity", static_parity),
        ("ort_static_iobinding", lambda: bench_ort_static(f"{prefix}-static-iobinding", paths["static"], cfg, args,
                                                          clock, results, device, False, meta)),
        ("ort_concat", lambda: bench_ort(f"{prefix}-concat-{'onnx-fused' if cuda else 'decomposed'}",
                                         paths["concat"], cfg, args, clock, results, device)),
        # on a CPU the same device-bound inputs and per-context run options, without the graph (a smoke test)
        ("ort_static_graph", lambda: bench_ort_static(f"{prefix}-static-cuda-graph" if cuda else
                                                      f"{prefix}-static-bound-once", paths["static"], cfg, args,
                                                      clock, results, device, True, meta)),
        ("anchor_triton", lambda: anchor(risky)),
    ]
    for name, section in sections:
        try:
            section()
        except Exception as e:  # recorded; the next section still runs
            meta["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log(f"section {name} failed:", meta["errors"][name])
        if cuda:
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()
        save_record()
        log(f"[{time.perf_counter() - t_start:.0f}s] done {name}")
    log(save_record())
    log(f"total {meta['total_s']} s")


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
    p.add_argument("--anchor", action="store_true",
                   help="issue 23 §2 only: decode against the static-cache + CUDA-graph PyTorch anchor, ORT's "
                        "static-cache export (IO binding, CUDA graphs) and its concatenating export; "
                        "bench_decode_anchor.json")
    p.add_argument("--anchor-variants", nargs="+", default=list(ANCHOR_VARIANTS), choices=ANCHOR_VARIANTS)
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
    if args.anchor:
        return anchor_main(args, device, clock)
    t_start = time.perf_counter()

    # ---- the random model, saved as a checkpoint (shipped tokenizer) and exported fp16 with a KV cache
    cfg, model, work = random_checkpoint(args, "bench-gen-")
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
