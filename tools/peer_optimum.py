"""Against the peer: Hugging Face Optimum's ONNX export vs this project's, on the same tiny random models.

For BLOOM, MPT and Falcon-ALiBi (tiny configs with fixed seeds, built from transformers' own config
classes), both exports run in ONNX Runtime (CPU, fp32) at 1x, 4x and 16x the model's length, and each
is compared with transformers' forward on the same random token ids: max |dlogit| / max |logit|.
A row says "fails" when the export or the ONNX Runtime run raises, with the error's first line.

Optimum is never a dependency of this package or its CI: its pins (transformers 4.57) conflict with
this project's environment, so it lives in its own virtual environment, made once with

    python3 -m venv /work/venv-optimum
    /work/venv-optimum/bin/pip install torch==2.13.0          # first, so pip keeps the CPU build
    /work/venv-optimum/bin/pip install optimum-onnx==0.1.0 onnxruntime   # pulls transformers 4.57.x

The script runs in two stages. ``--stage optimum`` runs in that venv: it builds and saves each model
(safetensors, a local tokenizer.json), computes transformers' reference logits, exports with Optimum
and runs it. The default stage runs in this project's environment: it calls the first stage through
``--venv``'s python, then exports each saved folder with ``alibi-export onnx`` and runs it against the
same reference logits. Both exports are therefore judged against one transformers (the venv's 4.57).

transformers' MPT refuses inputs past ``max_seq_len``; its reference beyond that is the same model with
``max_seq_len`` raised in its config, which ALiBi's slopes do not read (Optimum's export keeps the
original config, as a user's would).

usage: python tools/peer_optimum.py [--venv /work/venv-optimum] [--work DIR] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import ROOT, write_record

LENGTH = 128  # "the model's length": MPT's max_seq_len, Falcon's max_position_embeddings (BLOOM has none)
MULTIPLES = (1, 4, 16)
SEED = 0
VOCAB = 300


def tiny_configs() -> dict:
    """transformers configs (kwargs per model_type): 6 heads (not a power of two), non-default options."""
    common = dict(vocab_size=VOCAB, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "bloom": dict(hidden_size=48, n_layer=2, n_head=6, apply_residual_connection_post_layernorm=False, **common),
        # expansion_ratio 4: transformers' MPT hard-codes a 4x MLP whatever the config says (4.57 and 5.x).
        "mpt": dict(d_model=48, n_heads=6, n_layers=2, expansion_ratio=4, max_seq_len=LENGTH, no_bias=True,
                    attn_config=dict(alibi=True, alibi_bias_max=8, clip_qkv=None, qk_ln=False),
                    **{k: v for k, v in common.items() if k != "initializer_range"}, initializer_range=0.2),
        "falcon": dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, alibi=True,
                       new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True,
                       max_position_embeddings=LENGTH, **common),
    }


# ------------------------------------------------------------------ stage 1: in Optimum's venv
def _build(arch: str, kwargs: dict, folder: Path):
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    _tokenizer().save(str(folder / "tokenizer.json"))
    return model


def _tokenizer():
    """A word-level tokenizer over VOCAB tokens: the folder needs one; the benchmark feeds ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _reference(arch: str, folder: Path, model, ids):
    """transformers' logits at each length, with its default attention (SDPA; see BENCHMARKS for Falcon's eager
    path, which adds the ALiBi bias twice in 4.57); MPT's with max_seq_len raised (see the module docstring)."""
    import torch
    import transformers

    if arch == "mpt":
        config = transformers.AutoConfig.from_pretrained(folder)
        config.max_seq_len = max(MULTIPLES) * LENGTH
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, config=config).eval()
    with torch.no_grad():
        return {n: model(torch.from_numpy(ids[n])).logits.float().numpy() for n in ids}


def _run_onnx(path: Path, ids):
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def _error(ref, got) -> float:
    import numpy as np

    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


def _measure(run, refs) -> dict:
    out = {}
    for n, ref in refs.items():
        try:
            out[n] = dict(ok=True, rel=_error(ref, run(n)))
        except Exception as e:  # an export that does not run is a result, not a crash
            out[n] = dict(ok=False, error=str(e).strip().splitlines()[0][:400])
    return out


def stage_optimum(work: Path) -> dict:
    import numpy as np
    from importlib.metadata import version

    import optimum.exporters.onnx as oe
    import transformers

    rng = np.random.default_rng(SEED)
    results = dict(versions=dict(transformers=transformers.__version__, optimum_onnx=version("optimum-onnx"),
                                 onnxruntime=version("onnxruntime")))
    for arch, kwargs in tiny_configs().items():
        folder = work / arch
        model = _build(arch, kwargs, folder)
        ids = {str(m * LENGTH): rng.integers(0, VOCAB, (1, m * LENGTH), dtype=np.int64) for m in MULTIPLES}
        refs = _reference(arch, folder, model, ids)
        np.savez(work / f"{arch}-ref.npz", **{f"ids{n}": ids[n] for n in ids}, **{f"ref{n}": refs[n] for n in refs})
        try:
            oe.main_export(str(folder), output=str(work / f"{arch}-optimum"), task="text-generation",
                           do_validation=False, no_post_process=True)
            path = work / f"{arch}-optimum" / "model.onnx"
            results[arch] = _measure(lambda n: _run_onnx(path, ids[n]), refs)
        except Exception as e:
            results[arch] = {n: dict(ok=False, error="export: " + str(e).strip().splitlines()[0][:160]) for n in ids}
    return results


# ------------------------------------------------------------------ stage 2: this project's environment
def stage_ours(work: Path, attention: str) -> dict:
    """``alibi-export onnx FOLDER --dynamic-len --no-validate --attention ATTENTION`` on each saved model."""
    import numpy as np

    results = {}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for arch in tiny_configs():
        saved = np.load(work / f"{arch}-ref.npz")
        lengths = [k[3:] for k in saved.files if k.startswith("ids")]
        out = work / f"{arch}-ours-{attention}.onnx"
        cmd = [sys.executable, "-m", "alibi_export", "onnx", str(work / arch), "-o", str(out), "--dynamic-len",
               "--no-validate", "--attention", attention]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            error = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1][:400]
            results[arch] = {n: dict(ok=False, error="export: " + error) for n in lengths}
            continue
        results[arch] = _measure(lambda n: _run_onnx(out, saved[f"ids{n}"]), {n: saved[f"ref{n}"] for n in lengths})
    return results


def _short(error: str) -> str:
    """An ONNX Runtime error's last sentences (what failed), without the source path and function."""
    return " ".join(error.split(". ")[-2:]) if "ONNXRuntimeError" in error else error


def table(optimum: dict, ours: dict) -> str:
    def cell(r):
        return f"runs, {r['rel']:.1e}" if r["ok"] else f"fails ({_short(r['error'])})"

    lines = ["| architecture | length | Optimum | alibi-export (default) | alibi-export --attention onnx |",
             "|---|---|---|---|---|"]
    for arch in tiny_configs():
        for n in sorted(ours["decomposed"][arch], key=int):
            lines.append(f"| {arch} | {int(n) // LENGTH}x ({n}) | {cell(optimum[arch][n])} | "
                         f"{cell(ours['decomposed'][arch][n])} | {cell(ours['onnx'][arch][n])} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["optimum", "all"], default="all")
    ap.add_argument("--venv", type=Path, default=Path("/work/venv-optimum"), help="Optimum's virtual environment")
    ap.add_argument("--work", type=Path, help="folder for the models and exports (default: a temp folder)")
    ap.add_argument("--json", type=Path, help="also write every number here")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="peer-optimum-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.stage == "optimum":
        (work / "optimum.json").write_text(json.dumps(stage_optimum(work), indent=1))
        return 0
    python = args.venv / "bin" / "python"
    if not python.is_file():
        sys.exit(f"Error: no Optimum venv at {args.venv}. Note: make it as this script's docstring says")
    subprocess.run([str(python), __file__, "--stage", "optimum", "--work", str(work)], check=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    optimum = json.loads((work / "optimum.json").read_text())
    ours = {form: stage_ours(work, form) for form in ("decomposed", "onnx")}
    versions = optimum.pop("versions")
    print(f"reference: transformers {versions['transformers']} (default attention, fp32); "
          f"optimum-onnx {versions['optimum_onnx']}; ONNX Runtime {versions['onnxruntime']} CPU; model length "
          f"{LENGTH}; max |dlogit| / max |logit|")
    print(table(optimum, ours))
    if args.json:
        write_record(args.json, dict(versions=versions, optimum=optimum, ours=ours))
    return 0


if __name__ == "__main__":
    sys.exit(main())
