"""Large-model export: wall time and peak RSS of `alibi-export onnx` on a real-size random checkpoint.

Writes a random-weights Hugging Face BLOOM folder of BLOOM-560m's (or BLOOM-1b1's) shape with
safetensors (config.json, model.safetensors, a small local tokenizer.json), exports it with
`alibi-export onnx DIR --dynamic-len --no-validate` (fp32, weights as external data: the pair is past
protobuf's 2 GB) in a child process, and records the child's wall time and peak resident memory
(ru_maxrss from os.wait4, the child's own), the weights' size and the outputs' sizes. The issue's bar:
peak RSS within about 2.5x the weights' size.

``--format native`` writes the same shape in this project's own checkpoint format instead (for a tree
without the Hugging Face loaders). Nothing is downloaded. Needs ~3x the weights in free RAM and ~3x on
disk under --work (default: a temporary folder, removed at the end unless --keep).

usage: python tools/bench_large_export.py [--shape 560m|1b1|tiny] [--format hf|native] [--work DIR] [--keep]
                                          [--json out.json] [--attention decomposed|onnx]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, time_one, write_record

SHAPES = {  # bigscience/bloom-560m and bloom-1b1's config.json (the fields that set the weights' shapes)
    "560m": dict(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16),
    "1b1": dict(vocab_size=250880, hidden_size=1536, n_layer=24, n_head=16),
    "tiny": dict(vocab_size=1000, hidden_size=64, n_layer=2, n_head=4),  # a smoke test of this tool only
}


def _random(shape, std: float = 0.02):
    import torch

    return torch.randn(*shape) * std


def bloom_state(vocab_size: int, hidden_size: int, n_layer: int, **_) -> dict:
    """A random BloomForCausalLM state dict under the names its safetensors use (tied LM head)."""
    import torch

    d, s = hidden_size, {}
    s["transformer.word_embeddings.weight"] = _random((vocab_size, d))
    for ln in ("transformer.word_embeddings_layernorm", "transformer.ln_f"):
        s[f"{ln}.weight"], s[f"{ln}.bias"] = torch.ones(d), torch.zeros(d)
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            s[p + ln + ".weight"], s[p + ln + ".bias"] = torch.ones(d), torch.zeros(d)
        for name, (n_out, n_in) in {"self_attention.query_key_value": (3 * d, d), "self_attention.dense": (d, d),
                                    "mlp.dense_h_to_4h": (4 * d, d), "mlp.dense_4h_to_h": (d, 4 * d)}.items():
            s[p + name + ".weight"], s[p + name + ".bias"] = _random((n_out, n_in)), _random((n_out,))
    return s


def bloom_config(vocab_size: int, hidden_size: int, n_layer: int, n_head: int) -> dict:
    return dict(model_type="bloom", architectures=["BloomForCausalLM"], vocab_size=vocab_size,
                hidden_size=hidden_size, n_layer=n_layer, n_head=n_head, layer_norm_epsilon=1e-5,
                apply_residual_connection_post_layernorm=False, hidden_dropout=0.0, attention_dropout=0.0,
                initializer_range=0.02, use_cache=True, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                tie_word_embeddings=True, torch_dtype="float32")


def write_checkpoint(folder: Path, shape: str, fmt: str) -> int:
    """Write the random checkpoint; returns the weights file's size in bytes."""
    from safetensors.torch import save_file

    from alibi_export.data import train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    dims = SHAPES[shape]
    if fmt == "hf":
        state, config = bloom_state(**dims), bloom_config(**dims)
    else:
        import torch

        from alibi_export import AlibiLM, ModelConfig

        cfg = ModelConfig(vocab_size=dims["vocab_size"], n_layer=dims["n_layer"], n_head=dims["n_head"],
                          d_model=dims["hidden_size"], d_ff=4 * dims["hidden_size"], train_len=2048,
                          max_positions=2048)
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in AlibiLM(cfg).state_dict().items()}
        state, config = {k: _random(v) for k, v in shapes.items()}, cfg.to_dict()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del state
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    text = folder / "corpus.txt"
    from alibi_export.shipped import default_text

    text.write_text(default_text().read_text()[:20000])
    train_tokenizer([text], 300).save(str(folder / "tokenizer.json"))
    text.unlink()
    return (folder / "model.safetensors").stat().st_size


def run_export(folder: Path, out: Path, attention: str) -> dict:
    """The CLI in a child process; its own peak RSS from wait4."""
    cmd = [sys.executable, "-m", "alibi_export", "onnx", str(folder), "-o", str(out), "--dynamic-len",
           "--no-validate", "--dtype", "float32", "--attention", attention]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = {}

    def export():
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        done["output"] = proc.stdout.read()
        _, status, done["usage"] = os.wait4(proc.pid, 0)
        done["returncode"] = os.waitstatus_to_exitcode(status)

    wall = time_one(export, warmup=0, repeats=1).median  # one export: it is the measurement, not a warm-up
    return dict(command=" ".join(["alibi-export"] + cmd[3:]), returncode=done["returncode"],
                output=done["output"].strip(), wall_s=round(wall, 1),
                peak_rss_bytes=done["usage"].ru_maxrss * 1024)  # ru_maxrss is in KiB on Linux


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="560m")
    ap.add_argument("--format", choices=["hf", "native"], default="hf")
    ap.add_argument("--attention", choices=["decomposed", "onnx"], default="decomposed")
    ap.add_argument("--work", type=Path, help="where the checkpoint and the export go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the export")
    ap.add_argument("--json", type=Path, help="also write the record here")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-large-"))
    try:
        folder, out = work / f"bloom-{args.shape}-random", work / f"bloom-{args.shape}.onnx"
        t0 = time.perf_counter()
        weights = write_checkpoint(folder, args.shape, args.format)
        print(f"wrote {folder} ({weights / 1e9:.2f} GB of weights, {args.format} format) in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        rec = run_export(folder, out, args.attention)
        data = sorted(work.glob(f"{out.name}.*.data"))  # the one data file, named after its content
        rec.update(shape=args.shape, format=args.format, attention=args.attention, weights_bytes=weights,
                   onnx_bytes=out.stat().st_size if out.exists() else None,
                   data_files=[d.name for d in data], data_bytes=sum(d.stat().st_size for d in data) or None,
                   peak_over_weights=round(rec["peak_rss_bytes"] / weights, 2))
        print(rec.pop("output"))
        print(json.dumps(rec, indent=1))
        print(f"| BLOOM-{args.shape} random ({args.format}) | {weights / 1e9:.2f} GB | {rec['wall_s']:.0f} s | "
              f"{rec['peak_rss_bytes'] / 1e9:.2f} GB | {rec['peak_over_weights']:.2f}x | "
              f"{(rec['onnx_bytes'] or 0) / 1e6:.1f} MB + {(rec['data_bytes'] or 0) / 1e9:.2f} GB |")
        if args.json:
            write_record(args.json, rec)
        return rec["returncode"]
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
