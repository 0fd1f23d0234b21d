"""How much of the fused backward's work the ALiBi window skips on a real model and real text.

The window (alibi_export/kernels/triton_alibi_bwd.py) skips the (query, key) tiles whose every P
is provably below 2^-gap. Its reach depends on the data: the slopes, and the norms of q and k
(the Cauchy-Schwarz term of its bound). tools/bench_attention_train.py times it on random
normal q and k; this tool measures the share of tiles it keeps in one training step (forward +
backward, all layers) of a checkpoint on a text, at each length, and of the same architecture
freshly initialised (what tools/bench_train_gpu.py times). It also checks that the step's
parameter gradients do not change when the window is off.

Usage (repo root, CUDA GPU): PYTHONPATH=. python tools/window_share.py [--model DIR]
  [--text FILE] [--lengths 1024,2048,...] [--tokens 16384]
Defaults: the shipped alibi-small checkpoint (trained at 256 tokens) and the shipped books test
excerpt. Writes $OUT/window_share.json when $OUT is set.
"""
from __future__ import annotations

import argparse
import json

import torch
from harness import out_path, write_record

from alibi_export import checkpoint as ckpt  # noqa: E402
from alibi_export import shipped  # noqa: E402
from alibi_export.data import encode_text, read_text  # noqa: E402
from alibi_export.kernels import triton_alibi_bwd as kb  # noqa: E402
from alibi_export.model import AlibiLM  # noqa: E402


def step(model, ids, gap):
    """Tiles (dK/dV, dQ) of one forward + backward, and the parameter gradients."""
    model.zero_grad(set_to_none=True)
    kb._SKIP_GAP, kb._TILE_COUNTS = gap, torch.zeros(2, dtype=torch.int32, device="cuda")
    try:
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        torch.cuda.synchronize()
        return kb._TILE_COUNTS.tolist(), torch.cat([p.grad.float().flatten() for p in model.parameters()])
    finally:
        kb._SKIP_GAP, kb._TILE_COUNTS = None, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(shipped.default_model()))
    ap.add_argument("--text", default=str(shipped.default_text()))
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step (B = tokens / L)")
    a = ap.parse_args()
    c = ckpt.load(a.model, device="cuda")
    stream = torch.tensor(encode_text(c.tokenizer, read_text(a.text)).astype("int64"), device="cuda")
    torch.manual_seed(0)
    models = {"trained": c.model, "init": AlibiLM(c.model.config).to("cuda")}
    rows = []
    for name, m in models.items():
        m = m.to(torch.bfloat16).train().set_attention("triton")
        for L in (int(x) for x in a.lengths.split(",")):
            B = max(1, a.tokens // L)
            if B * (L + 1) > stream.numel():
                print(f"skip L={L}: the text has {stream.numel()} tokens", flush=True)
                continue
            ids = stream[:B * (L + 1)].view(B, L + 1)
            (kept, g_win), (full, g_full) = step(m, ids, None), step(m, ids, float("inf"))
            diff = ((g_win - g_full).abs().max() / g_full.abs().max()).item()
            row = {"model": name, "L": L, "B": B, "tiles": kept, "tiles_nowin": full,
                   "kept": round(sum(kept) / sum(full), 3), "grad_max_rel_diff": diff}
            rows.append(row)
            print(json.dumps(row), flush=True)
    path = out_path("window_share.json")
    if path:
        write_record(path, {"model": a.model, "text": a.text, "rows": rows})


if __name__ == "__main__":
    main()
