"""Perplexity of checkpoints on a text at several lengths (non-overlapping windows), on one device.
Used once on the GPU machine for the model cards' full-test-split tables.
usage: python3 tools/eval_lengths_gpu.py TEXT OUT.json CKPT [CKPT ...]"""
import json
import sys

import torch

from alibi_export import load
from alibi_export.data import encode_text, read_text
from alibi_export.train import evaluate

text, out, ckpts = sys.argv[1], sys.argv[2], sys.argv[3:]
device = "cuda" if torch.cuda.is_available() else "cpu"
results = {}
for path in ckpts:
    ck = load(path, device=device)
    tokens = encode_text(ck.tokenizer, read_text(text))
    n = ck.config.train_len
    row = {}
    for mult in (1, 2, 4, 8, 16, 32):
        row[n * mult] = evaluate(ck.model, tokens, n * mult, device, lambda: torch.autocast(device, enabled=False))
        print(path, n * mult, round(row[n * mult], 3), flush=True)
    results[path] = {"tokens": int(len(tokens)), "ppl": row}
json.dump(results, open(out, "w"), indent=2)
