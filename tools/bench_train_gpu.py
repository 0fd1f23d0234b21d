"""Training throughput of a 12-layer d 768 ALiBi LM on H200s: tokens/s and peak memory per attention.

--mode single (one GPU): train_len 512, 2048, 8192 with 16384 tokens per step (B = 16384 / L), in
four attention configurations of the same model:
  fused : the Triton kernel, forward + backward (attention "triton"; bias regenerated in-kernel)
  fused-nowin : the same with the backward's ALiBi window off (every causal tile computed)
  flex  : FlexAttention with an ALiBi score_mod and a causal block mask (torch.compile'd)
  sdpa  : PyTorch SDPA with the materialized (H, L, L) bias, as BLOOM/MPT training in transformers
--mode ddp: DistributedDataParallel over --gpus GPUs (NCCL) at train_len 2048, fused attention,
8 sequences (16384 tokens) per GPU per step, against the same per-GPU work on 1 GPU measured first
in the same run; scaling = tokens/s(N GPUs) / tokens/s(1 GPU) (target >= 1.8 for N = 2). Without
torchrun it spawns the processes itself; under `torchrun --nproc_per_node N` it uses those.

Each step is what alibi_export.train does: bf16 autocast over fp32 weights, cross-entropy, backward,
grad-norm clip, fused AdamW; random tokens (throughput does not depend on the data). --warmup steps,
then --steps timed steps between CUDA syncs. Peak memory: torch.cuda.max_memory_allocated over the
timed steps. NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set for everything this
launches (NVLink multicast stays off, as the device notes ask).

Usage (repo root): PYTHONPATH=. python tools/bench_train_gpu.py --mode single
                   PYTHONPATH=. python tools/bench_train_gpu.py --mode ddp --gpus 2
Writes $OUT/bench_train_gpu_<mode>.json when $OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
from harness import out_path, time_one, write_record  # noqa: E402

from alibi_export.kernels import triton_alibi_bwd as kb  # noqa: E402
from alibi_export.model import AlibiLM, ModelConfig  # noqa: E402

TOKENS_PER_GPU = 16384
MODEL = dict(vocab_size=32768, n_layer=12, n_head=12, d_model=768, d_ff=3072, position="alibi")


def make_flex_attend():
    """An attend function (model.py's signature) running FlexAttention with an ALiBi score_mod."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    cache = {}  # L -> (block mask, score_mod): one object each, so one compile per length

    def attend_flex(q, k, v, pos, past_len, key_mask=None):
        L = q.shape[2]
        if L not in cache:
            slopes = pos.head_slopes()

            def score_mod(score, b, h, qi, kv):
                return score + slopes[h] * (kv - qi)
            cache[L] = (create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, L, L,
                                          device=q.device), score_mod)
        mask, score_mod = cache[L]
        return flex(q, k, v, score_mod=score_mod, block_mask=mask)

    return attend_flex


def build(train_len: int, attention: str, device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = AlibiLM(ModelConfig(**MODEL, train_len=train_len, max_positions=train_len)).to(device)
    if attention == "flex":
        attend = make_flex_attend()
        for block in model.blocks:
            block.attn.attend = attend
    else:
        model.set_attention({"fused": "triton", "fused-nowin": "triton", "sdpa": "sdpa"}[attention])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    return model.train(), opt


def timed_steps(net, model, opt, B, L, device, warmup, steps) -> dict:
    g = torch.Generator(device).manual_seed(0)
    ids = torch.randint(0, MODEL["vocab_size"], (B, L + 1), device=device, generator=g)
    x, y = ids[:, :-1], ids[:, 1:]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    last = []

    def run(n):
        for _ in range(n):
            last[:] = [step()]

    sync = torch.cuda.synchronize
    warm_s = time_one(lambda: run(warmup), warmup=0, repeats=1, sync=sync).median  # compiles: reported apart
    torch.cuda.reset_peak_memory_stats(device)
    dt = time_one(lambda: run(steps), warmup=0, repeats=1, sync=sync).median  # one block of steps
    loss = last[0]
    return {"tokens_per_s": steps * B * L / dt, "step_ms": 1e3 * dt / steps,
            "peak_GiB": torch.cuda.max_memory_allocated(device) / 2**30,
            "loss": float(loss), "warmup_s": warm_s}


def single(args) -> dict:
    device = torch.device("cuda")
    rows = []
    for L in args.lengths:
        B = max(1, TOKENS_PER_GPU // L)
        for attention in args.attention:
            t0 = time.time()
            model = opt = None
            try:
                model, opt = build(L, attention, device)
                kb._SKIP_GAP = float("inf") if attention == "fused-nowin" else None
                r = timed_steps(model, model, opt, B, L, device, args.warmup, args.steps)
            except torch.cuda.OutOfMemoryError:
                r = {"tokens_per_s": float("nan"), "peak_GiB": float("nan"), "error": "OOM"}
            finally:
                kb._SKIP_GAP = None
            rows.append({"train_len": L, "B": B, "attention": attention, **r})
            print(json.dumps(rows[-1]), f"({time.time() - t0:.0f} s)", flush=True)
            del model, opt
            torch.cuda.empty_cache()
    print(f"\n12-layer d768 ALiBi LM, {TOKENS_PER_GPU} tokens/step, bf16 autocast, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'L':>6} {'B':>3} " + " ".join(f"{a + ' tok/s':>13} {'GiB':>6}" for a in args.attention))
    for L in args.lengths:
        cells = [r for r in rows if r["train_len"] == L]
        print(f"{L:>6} {cells[0]['B']:>3} " + " ".join(
            f"{r['tokens_per_s']:13,.0f} {r['peak_GiB']:6.1f}" for r in cells))
    return {"rows": rows}


def ddp_rank(rank: int, world: int, args, port: int, results: dict | None) -> None:
    import torch.distributed as dist

    if port:  # spawned by this script rather than torchrun
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    L, B = 2048, TOKENS_PER_GPU // 2048
    model, opt = build(L, "fused", device)
    one = None
    if rank == 0:  # the 1-GPU baseline, same per-GPU work, while the others wait
        one = timed_steps(model, model, opt, B, L, device, args.warmup, args.steps)
    dist.barrier()
    model, opt = build(L, "fused", device)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local])
    many = timed_steps(net, model, opt, B, L, device, args.warmup, args.steps)
    many["tokens_per_s"] *= world  # every rank ran B x L tokens per step
    if rank == 0:
        res = {"train_len": L, "per_gpu_batch": B, "gpus": world, "one_gpu": one,
               f"{world}_gpus": many, "scaling": many["tokens_per_s"] / one["tokens_per_s"]}
        print(json.dumps(res), flush=True)
        print(f"\nDDP fused, train_len {L}, {B} x {L} tokens per GPU per step: 1 GPU "
              f"{one['tokens_per_s']:,.0f} tok/s, {world} GPUs {many['tokens_per_s']:,.0f} tok/s, "
              f"scaling {res['scaling']:.2f}x", flush=True)
        if results is not None:
            results.update(res)
        _write(args, "ddp", res)
    dist.destroy_process_group()


def _write(args, mode, res) -> None:
    path = out_path(f"bench_train_gpu_{mode}.json")
    if path:
        write_record(path, {"args": dict(vars(args)), **res})
        print("wrote", path, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["single", "ddp"], required=True)
    ap.add_argument("--lengths", default="512,2048,8192")
    ap.add_argument("--attention", default="fused,fused-nowin,flex,sdpa")
    ap.add_argument("--gpus", type=int, default=2, help="ddp without torchrun: processes to spawn")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.attention = args.attention.split(",")
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.cache_size_limit = 64
    t0 = time.time()
    print(f"torch {torch.__version__}, {torch.cuda.device_count()} x {torch.cuda.get_device_name()}",
          flush=True)
    if args.mode == "single":
        _write(args, "single", single(args))
    elif "RANK" in os.environ:  # under torchrun
        ddp_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, 0, None)
    else:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(ddp_rank, args=(args.gpus, args, port, None), nprocs=args.gpus, join=True)
    print(f"total {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
