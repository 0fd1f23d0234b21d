"""Perplexity of checkpoints on a text at several lengths (non-overlapping windows), on one device.
Used on the GPU machine for the model cards' full-test-split tables; a CPU runs it too (slowly).
usage: python3 tools/eval_lengths_gpu.py TEXT OUT.json CKPT [CKPT ...] [--multiples 1,2,4,8,16,32]"""
from __future__ import annotations

import argparse

import torch

from harness import write_record

from alibi_export import load  # noqa: E402  (harness puts this checkout first on the path)
from alibi_export.data import encode_text, read_text  # noqa: E402
from alibi_export.train import evaluate  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text", help="UTF-8 text to evaluate on.")
    ap.add_argument("out", help="JSON record to write.")
    ap.add_argument("ckpts", nargs="+", help="Checkpoint folders.")
    ap.add_argument("--multiples", default="1,2,4,8,16,32", help="Evaluation lengths as multiples of each "
                                                                  "checkpoint's training length.")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for path in args.ckpts:
        ck = load(path, device=device)
        tokens = encode_text(ck.tokenizer, read_text(args.text))
        n = ck.config.train_len
        row = {}
        for mult in (int(m) for m in args.multiples.split(",")):
            row[n * mult] = evaluate(ck.model, tokens, n * mult, device,
                                     lambda: torch.autocast(device, enabled=False))
            print(path, n * mult, round(row[n * mult], 3), flush=True)
        results[path] = {"tokens": int(len(tokens)), "ppl": row}
    write_record(args.out, results)


if __name__ == "__main__":
    main()
