"""The paper's "train short, test long" claim, reproduced small on one GPU.

Two models of the same architecture, token budget, tokenizer, data order and seed:
  alibi      trained at L = --short (512)
  sinusoidal trained at L = 2 x --short (1024)
each through alibi_export.train (bf16 autocast, attention "auto": the fused Triton kernel on CUDA
for both; the sinusoidal model runs it with zero slopes). Then perplexity at 1024 (and at 512) on
the corpus' test split (non-overlapping windows, every token scored), wall time of each training
loop (steady-state step time x steps: the first steps compile kernels, which the second run
would find compiled) and its peak GPU memory. The paper's claim: ALiBi at L matches or beats sinusoidal at 2L in
perplexity at 2L, ~11% faster and with ~11% less memory. Whatever it measures, it reports.

Usage (repo root; the corpus is a folder with train.txt, valid.txt, test.txt):
  PYTHONPATH=. python tools/train_short_claim.py --corpus .data/books [--steps 800]
Prints progress and timings; writes JSON to --json, or to $OUT/train_short_claim.json when $OUT is
set. Sized for < 8 minutes on one H200: 800 steps x 32768 tokens = 26M tokens per model.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from harness import out_path, write_record

from alibi_export.data import corpus_split, encode_text, read_text, train_tokenizer  # noqa: E402
from alibi_export.model import PAPER_EMBED_SCALE, ModelConfig, embed_scale_of  # noqa: E402
from alibi_export.train import TrainConfig, evaluate, train  # noqa: E402


def model_config(args, position: str, train_len: int, embed_scale: float | None = None) -> ModelConfig:
    """The architecture of every model here (``embed_scale`` default: the recipe of ``args.embed_scale``)."""
    if embed_scale is None:
        embed_scale = embed_scale_of(args.embed_scale, args.d_model)
    return ModelConfig(vocab_size=args.vocab_size, n_layer=args.layers, n_head=args.heads, d_model=args.d_model,
                       d_ff=4 * args.d_model, position=position, train_len=train_len, max_positions=train_len,
                       embed_scale=embed_scale)


def train_one(args, position: str, train_len: int, tokenizer_file: Path, out: Path, device, *,
              embed_scale: float | None = None, name: str | None = None, curve_every: int = 0) -> dict:
    """One model through alibi_export.train; its record and the trained model.

    ``embed_scale``: default the recipe of ``args.embed_scale``; ``name``: the checkpoint's folder under
    ``out`` (default the position); ``curve_every`` > 0 records the mean training loss of every block of
    that many steps (the loss curve)."""
    model_cfg = model_config(args, position, train_len, embed_scale)
    embed_scale = model_cfg.embed_scale
    batch = args.tokens_per_step // train_len  # the same tokens per step for both models
    cfg = TrainConfig(corpus=str(args.corpus), out=str(out / (name or position)), model=model_cfg,
                      batch_size=batch, steps=args.steps, lr=args.lr, min_lr=args.lr / 10,
                      warmup=args.steps // 20, eval_every=args.steps, save_every=args.steps,
                      seed=args.seed, device=str(device), tokenizer=str(tokenizer_file),
                      save_optimizer=False)
    last, stamps, curve, block = {}, {}, [], []

    def on_progress(p):
        last["p"] = p
        stamps[p.step] = time.perf_counter()
        block.append(p.loss)
        if curve_every and (p.step % curve_every == 0 or p.step == p.steps):
            curve.append([p.step, sum(block) / len(block)])
            block.clear()
        if p.step % max(1, args.steps // 10) == 0 or p.step == p.steps:
            print(f"  {name or position} step {p.step}/{p.steps} loss {p.loss:.3f} "
                  f"{p.tokens_per_s:,.0f} tok/s", flush=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model, _ = train(cfg, overwrite=True, on_progress=on_progress)  # replaces only its own files
    wall = time.perf_counter() - t0
    p = last["p"]
    tokens = args.steps * batch * train_len
    # steady-state step time: from step 10 (kernels compiled, allocator warm) to the step before
    # the last (whose callback comes after the final validation): the same for both models
    first, end = min(10, args.steps // 4), args.steps - 1
    step_s = (stamps[end] - stamps[first]) / max(1, end - first)
    run = {"position": position, "train_len": train_len, "embed_scale": embed_scale, "batch_size": batch,
           "steps": args.steps, "tokens": tokens, "step_ms": 1e3 * step_s, "loop_s": args.steps * step_s,
           "tokens_per_s": batch * train_len / step_s, "train_call_s": wall, "final_loss": p.loss,
           "val_ppl_at_train_len": p.val_ppl,
           "peak_GiB": (torch.cuda.max_memory_allocated(device) / 2**30
                        if device.type == "cuda" else None),
           "parameters": model.num_parameters()}
    if curve_every:
        run["loss_curve"] = curve  # [step, mean training loss of the steps since the previous point]
    return run, model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path(".data/books"))
    ap.add_argument("--short", type=int, default=512, help="ALiBi's training length (sinusoidal: 2x)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--tokens-per-step", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embed-scale", default=PAPER_EMBED_SCALE,
                    help="factor on the token embeddings: sqrt-d (the paper's recipe) or a number (1: the recipe "
                         "of the run in BENCHMARKS, before the option)")
    ap.add_argument("--out", type=Path, default=None, help="keep the checkpoints here")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_all = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="short-claim-"))
    out = args.out or scratch  # train() refuses a folder that holds anything but its checkpoint
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokenizer = train_tokenizer([corpus_split(args.corpus, "train")], args.vocab_size)
    tokenizer_file = scratch / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    test_tokens = encode_text(tokenizer, read_text(corpus_split(args.corpus, "test")))
    print(f"tokenizer {time.perf_counter() - t0:.1f} s; test split {len(test_tokens):,} tokens; "
          f"{device} {torch.cuda.get_device_name() if device.type == 'cuda' else ''}", flush=True)
    runs = []
    for position, train_len in (("alibi", args.short), ("sinusoidal", 2 * args.short)):
        t0 = time.perf_counter()
        run, model = train_one(args, position, train_len, tokenizer_file, out, device)
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16,  # noqa: E731
                                          enabled=device.type == "cuda")
        for length in (args.short, 2 * args.short):
            run[f"test_ppl_{length}"] = evaluate(model, test_tokens, length, device, autocast)
        runs.append(run)
        print(json.dumps(run), f"({time.perf_counter() - t0:.0f} s with evaluation)", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    a, s = runs
    long = 2 * args.short
    summary = {
        "test_ppl_at_2L": {"alibi": a[f"test_ppl_{long}"], "sinusoidal": s[f"test_ppl_{long}"]},
        "alibi_loop_time_vs_sinusoidal": a["loop_s"] / s["loop_s"],
        "alibi_peak_memory_vs_sinusoidal": (a["peak_GiB"] / s["peak_GiB"]
                                            if a["peak_GiB"] and s["peak_GiB"] else None),
    }
    res = {"args": {k: str(v) for k, v in vars(args).items()},
           "runs": runs, "summary": summary, "total_s": time.perf_counter() - t_all}
    print(f"\nperplexity at {long} on the test split: ALiBi@{args.short} "
          f"{a[f'test_ppl_{long}']:.2f}, sinusoidal@{long} {s[f'test_ppl_{long}']:.2f}; "
          f"ALiBi loop time {100 * summary['alibi_loop_time_vs_sinusoidal']:.0f}% of sinusoidal's"
          + (f", peak memory {100 * summary['alibi_peak_memory_vs_sinusoidal']:.0f}%"
             if summary["alibi_peak_memory_vs_sinusoidal"] else "")
          + f"; total {res['total_s']:.0f} s", flush=True)
    path = out_path("train_short_claim.json", args.json)
    if path:
        write_record(path, res)
        print("wrote", path)


if __name__ == "__main__":
    main()
