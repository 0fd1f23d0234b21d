"""CPU decode against llama.cpp (issue 23 section 3): one random BLOOM, both engines, interleaved fresh processes.

The model: a random BLOOM built with transformers from a config (12 layers, d 1024, 16 heads, vocab 32,000, seed
0, tied embedding; the shipped model's byte-level tokenizer), saved as a local Hugging Face folder. Exported by us
with the CLI (`alibi-export onnx FOLDER --kv-cache [--static-cache LMAX] [--quantize int8|int4] --no-validate`)
and converted by llama.cpp (its vendored `convert_hf_to_gguf.py` to f32, then `llama_model_quantize` to q8_0 and
q4_0). Each measurement runs in its own fresh process, 2 threads; the rounds interleave every file (round r runs
each once), and each number is the median over rounds. What one timing process does, the same on both engines:

  warm-up   16 tokens and 2 decode steps, then a fresh cache
  prefill   one pass of 512 tokens into an empty cache (ms)
  decode    a pass to 128 tokens, 8 single-token steps (median ms/step); a second pass to 1024 tokens, 8 more

llama.cpp computes the last position's logits in a prefill (its default); our graph returns every position's
logits (1 x 512 x 32,000 floats) and they are copied to the host: a real cost of our file, counted. With
--logits-to-keep our static files are exported with that option (what `alibi-export serve` exports), and a
timed pass asks for the last position's logits only, as llama.cpp's does.

Logits error: each file alone, 128 random tokens in one pass, every position's logits; a quantized file against
its own engine's f32 (max |difference| and the mean over positions of KL(f32 || quantized)), and our f32 against
llama.cpp's f32 (same weights: a check that the two engines run one model).

llama.cpp is never a dependency of this package: it lives in its own venv (the peer), built from source with the
local compiler, and this script drives it through that venv's python in subprocesses:

    python3 -m venv /work/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" /work/llama-venv/bin/pip install llama-cpp-python==0.3.36
    /work/llama-venv/bin/pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36   # the converter's source
    # unpack it; --llama-cpp points at its vendor/llama.cpp

The converter runs in this project's python (it needs torch and transformers) with the vendored gguf-py first on
sys.path; our tokenizer is unknown to it, so this script maps its pre-tokenizer hash to "bloom" in the running
converter (LOCAL_PRE below), leaving the vendored files as they are.

usage: python tools/bench_llamacpp.py [--work DIR] [--repeats 3] [--json out.json] [--profile 1024]
       python tools/bench_llamacpp.py --prefill 32 --contexts 16,48 --steps 2 --repeats 1 --tiny   # dry run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from hashlib import sha256
from pathlib import Path

from harness import ROOT, out_path, write_record

THREADS = 2
SEED = 0
ERROR_TOKENS = 128
WARMUP_TOKENS = 16
# Our tokenizer (the shipped byte-level BPE) is not in llama.cpp's table of pre-tokenizer hashes: the hash of its
# encoding of the converter's check text, mapped to the pre-tokenizer whose rules it follows. Local to this script.
LOCAL_PRE = {"b0b88cbca661464af7a60c7a0e0f831ac31eac2c267f78b1c8166f2f3444e26b": "bloom"}
PRECISIONS = (("f32", None, "f32"), ("int8", "int8", "q8_0"), ("int4", "int4", "q4_0"))  # name, ours, theirs
FTYPES = {"q8_0": 7, "q4_0": 2}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_0


# ------------------------------------------------------------------ the model (this project's python)
def build_model(folder: Path, tiny: bool) -> Path:
    """A random BLOOM of the issue's shape from transformers' config class (no download), saved with safetensors."""
    import shutil

    import torch
    import transformers

    from alibi_export.shipped import default_model

    if (folder / "config.json").is_file():
        return folder
    shape = dict(hidden_size=64, n_layer=2, n_head=4) if tiny else dict(hidden_size=1024, n_layer=12, n_head=16)
    config = transformers.BloomConfig(vocab_size=32000, bos_token_id=0, eos_token_id=0, pad_token_id=0, **shape)
    torch.manual_seed(SEED)
    model = transformers.BloomForCausalLM(config).eval()
    staging = folder.with_name(folder.name + ".partial")
    model.save_pretrained(staging, safe_serialization=True)
    shutil.copy(Path(default_model()) / "tokenizer.json", staging / "tokenizer.json")
    (staging / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    staging.rename(folder)
    return folder


def export_ours(folder: Path, work: Path, lmax: int, keep_last: bool = False) -> dict:
    """Our six files through the CLI (no validation: a random model has no perplexity to hold). ``keep_last``:
    the static files with ``--logits-to-keep`` (a prefill computes the last position's logits only, as llama.cpp's
    does by default), named ``-static-last`` so that the all-logits files of an earlier run stay beside them."""
    files = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    forms = [("static", ["--static-cache", str(lmax)]), ("concat", [])]
    if keep_last:  # the timed static file; the one without the option stays as a row of its own
        forms.append(("static-last", ["--static-cache", str(lmax), "--logits-to-keep"]))
    for name, quantize, _ in PRECISIONS:
        for form, extra in forms:
            out = work / f"ours-{name}-{form}.onnx"
            if not out.is_file():
                cmd = [sys.executable, "-m", "alibi_export", "onnx", str(folder), "-o", str(out), "--kv-cache",
                       *extra, *(["--quantize", quantize] if quantize else []), "--no-validate", "--lengths", "128"]
                print("$", " ".join(cmd[1:]), flush=True)
                subprocess.run(cmd, env=env, check=True)
            files[f"ours-{name}-{form}"] = out
        if keep_last:  # the table's "ours" is the static file with the option; the other is compared beside it
            files[f"prev-{name}-static"], files[f"ours-{name}-static"] = files[f"ours-{name}-static"], \
                files.pop(f"ours-{name}-static-last")
    return files


def convert_theirs(folder: Path, work: Path, llama_cpp: Path, peer: Path) -> dict:
    """llama.cpp's f32 conversion (in this python, see stage_convert), then its quantizer (in the peer venv)."""
    files = {"llama-f32": work / "llama-f32.gguf"}
    if not files["llama-f32"].is_file():
        subprocess.run([sys.executable, __file__, "--stage", "convert", "--llama-cpp", str(llama_cpp),
                        "--model", str(folder), "--out", str(files["llama-f32"])], check=True)
    for _, _, kind in PRECISIONS[1:]:
        files[f"llama-{kind}"] = work / f"llama-{kind}.gguf"
        if not files[f"llama-{kind}"].is_file():
            _peer(peer, ["--stage", "quantize", "--file", str(files["llama-f32"]), "--kind", kind,
                         "--out", str(files[f"llama-{kind}"])])
    return files


def stage_convert(llama_cpp: Path, model: Path, out: Path) -> None:
    """convert_hf_to_gguf.py --outtype f32, with LOCAL_PRE added to its pre-tokenizer table in this process."""
    sys.path[:0] = [str(llama_cpp / "gguf-py"), str(llama_cpp)]
    import convert_hf_to_gguf
    from conversion.base import TextModel

    upstream = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        seen = []

        class Recording:  # the tokenizer, recording what the check text encodes to (the hash's input)
            def encode(self, *args, **kwargs):
                seen.append(tokenizer.encode(*args, **kwargs))
                return seen[-1]

            def __getattr__(self, name):
                return getattr(tokenizer, name)

        try:
            return upstream(self, Recording())
        except NotImplementedError:
            digest = sha256(str(seen[-1]).encode()).hexdigest() if seen else None
            if digest in LOCAL_PRE:
                return LOCAL_PRE[digest]
            raise SystemExit(f"Error: unknown pre-tokenizer hash {digest}. Note: add it to LOCAL_PRE") from None

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    staging = out.with_name(out.name + ".partial")
    sys.argv = ["convert_hf_to_gguf.py", str(model), "--outtype", "f32", "--outfile", str(staging)]
    convert_hf_to_gguf.main()
    staging.rename(out)


# ------------------------------------------------------------------ the peer's side (its venv's python)
def stage_quantize(src: Path, kind: str, out: Path) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = FTYPES[kind], THREADS
    staging = out.with_name(out.name + ".partial")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(staging).encode(), params) != 0:
        raise SystemExit(f"Error: llama_model_quantize {kind} failed")
    staging.rename(out)


class LlamaEngine:
    """llama-cpp-python's Llama over one GGUF: feed tokens into its cache, or start a fresh cache."""

    def __init__(self, path: Path, flash_attn: bool, all_logits: bool, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=THREADS, n_threads_batch=THREADS,
                         flash_attn=flash_attn, logits_all=all_logits, verbose=False, seed=SEED)

    def fresh(self, total: int) -> None:
        self.llm.reset()  # the next eval drops every cached position past n_tokens (0)

    def feed(self, ids, last_only: bool = False):  # last_only: set by all_logits at construction
        self.llm.eval([int(t) for t in ids])
        return self.llm.scores[self.llm.n_tokens - len(ids):self.llm.n_tokens] if self.llm._logits_all else None


class OurEngine:
    """GenerationSession over one KV-cache export: the same feed/fresh protocol (static or concatenating cache)."""

    def __init__(self, path: Path, n_ctx: int):
        from alibi_export.runtime.generate import GenerationSession

        self.session = GenerationSession(path, threads=THREADS)

    def fresh(self, total: int) -> None:
        import numpy as np

        self.cache, self.mask = self.session.new_cache(1, total), np.zeros((1, 0), dtype=np.int64)

    def feed(self, ids, last_only: bool = False):
        """``last_only``: the timed passes read the last position's logits only (a ``--logits-to-keep`` file then
        computes only those; any other file all of them, as before)."""
        import numpy as np

        self.mask = np.ones((1, self.mask.shape[1] + len(ids)), dtype=np.int64)
        logits, self.cache = self.session.step(np.asarray(ids, dtype=np.int64)[None], self.mask, self.cache,
                                               last_only=last_only)
        return logits[0]


def child(engine: str, path: Path, task: str, args) -> dict:
    """One fresh process's measurements (``task`` "time" or "logits"), as a JSON-able dict."""
    import numpy as np

    contexts = [int(c) for c in args.contexts.split(",")]
    n_ctx = max(args.prefill, max(contexts) + args.steps + 1, ERROR_TOKENS)
    if engine == "ours":
        sys.path.insert(0, str(ROOT))
        eng = OurEngine(path, n_ctx)
    else:
        eng = LlamaEngine(path, engine == "llama-fa", task == "logits", n_ctx)
    ids = np.random.default_rng(SEED).integers(3, 4000, n_ctx + WARMUP_TOKENS).tolist()
    if task == "logits":
        eng.fresh(ERROR_TOKENS)
        np.save(args.out, np.asarray(eng.feed(ids[:ERROR_TOKENS]), dtype=np.float32))
        return {}
    eng.fresh(WARMUP_TOKENS + 2)
    eng.feed(ids[:WARMUP_TOKENS], last_only=True)
    for t in ids[WARMUP_TOKENS:WARMUP_TOKENS + 2]:
        eng.feed([t], last_only=True)
    eng.fresh(args.prefill)
    t0 = time.perf_counter()
    eng.feed(ids[:args.prefill], last_only=True)
    out = {"prefill_ms": 1e3 * (time.perf_counter() - t0)}
    eng.fresh(n_ctx)
    done = 0
    for c in contexts:
        eng.feed(ids[done:c], last_only=True)
        steps = []
        for t in ids[c:c + args.steps]:
            t0 = time.perf_counter()
            eng.feed([t], last_only=True)
            steps.append(time.perf_counter() - t0)
        done = c + args.steps
        out[f"decode_ms@{c}"] = 1e3 * statistics.median(steps)
    return out


# ------------------------------------------------------------------ the driver (this project's python)
def _peer(peer: Path, argv: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = str(THREADS)
    done = subprocess.run([str(peer / "bin" / "python"), __file__, *argv], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"Error: the llama.cpp peer failed: {(done.stderr.strip() or 'no output').splitlines()[-1]}")
    return done.stdout


def run_child(peer: Path, engine: str, path: Path, task: str, args, out: Path | None = None) -> dict:
    argv = ["--stage", "child", "--engine", engine, "--file", str(path), "--task", task, "--prefill",
            str(args.prefill), "--contexts", args.contexts, "--steps", str(args.steps)]
    if out is not None:
        argv += ["--out", str(out)]
    if engine == "ours":
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(THREADS)}
        done = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"Error: our child failed: {(done.stderr.strip() or 'no output').splitlines()[-1]}")
        stdout = done.stdout
    else:
        stdout = _peer(peer, argv)
    return json.loads(stdout.strip().splitlines()[-1])


def file_mb(path: Path) -> float:
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.is_file() else 0)) / 1e6


def logits_error(reference, other) -> dict:
    """max |difference| and the mean over positions of KL(softmax(reference) || softmax(other)), in float64."""
    import numpy as np

    a, b = reference.astype(np.float64), other.astype(np.float64)
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    return {"max_abs": float(np.abs(a - b).max()), "kl": float((np.exp(la) * (la - lb)).sum(-1).mean())}


def timed_configs(files: dict, names) -> list[tuple[str, str, Path]]:
    """(label, engine, file) for every timed process of a round, ours and theirs alternating per precision."""
    configs = []
    for name, _, kind in (p for p in PRECISIONS if p[0] in names):
        configs += [(f"ours-{name}-static", "ours", files[f"ours-{name}-static"]),
                    (f"llama-{kind}", "llama", files[f"llama-{kind}"]),
                    (f"ours-{name}-concat", "ours", files[f"ours-{name}-concat"]),
                    (f"llama-{kind}-fa", "llama-fa", files[f"llama-{kind}"])]
        if f"prev-{name}-static" in files:
            configs.append((f"prev-{name}-static", "ours", files[f"prev-{name}-static"]))
    return configs


def table(times: dict, sizes: dict, errors: dict, contexts: list[int], prefill: int, names,
          prev_note: str = "--compare-ours") -> str:
    """The issue's table: ours over llama.cpp as speed ratios (their ms / our ms; > 1: ours faster)."""
    cols = ["prefill_ms"] + [f"decode_ms@{c}" for c in contexts]
    lines = [f"| precision (ours vs llama.cpp) | file size (ours / theirs) | prefill @{prefill} | "
             + " | ".join(f"decode @{c} context" for c in contexts)
             + " | logits error vs own f32: max abs (ours / theirs) | KL (ours / theirs) |",
             "|---" * (5 + len(contexts)) + "|"]
    for name, _, kind in (p for p in PRECISIONS if p[0] in names):
        cells = []
        for col in cols:
            ours = times[f"ours-{name}-static"][col]
            theirs = min(times[f"llama-{kind}"][col], times[f"llama-{kind}-fa"][col])
            concat = times[f"ours-{name}-concat"][col]
            cells.append(f"{theirs / ours:.2f}x ({ours:.1f} / {theirs:.1f} ms; concat {theirs / concat:.2f}x)")
        size = f"{sizes[f'ours-{name}-static'] / sizes[f'llama-{kind}']:.2f}x ({sizes[f'ours-{name}-static']:.0f} / " \
               f"{sizes[f'llama-{kind}']:.0f} MB)"
        if name == "f32":
            err, kl = "-", "-"
        else:
            o, t = errors[f"ours-{name}"], errors[f"llama-{kind}"]
            err, kl = f"{o['max_abs']:.4f} / {t['max_abs']:.4f}", f"{o['kl']:.1e} / {t['kl']:.1e}"
        label = "f32" if name == "f32" else f"{name} vs {kind}"
        lines.append(f"| {label} | {size} | " + " | ".join(cells) + f" | {err} | {kl} |")
        if f"prev-{name}-static" in times:  # the same precision from --compare-ours (static form only)
            cells = [f"{min(times[f'llama-{kind}'][c], times[f'llama-{kind}-fa'][c]) / times[f'prev-{name}-static'][c]:.2f}x"
                     f" ({times[f'prev-{name}-static'][c]:.1f} ms)" for c in cols]
            o = errors[f"prev-{name}"]
            lines.append(f"| {label} ({prev_note}) | {sizes[f'prev-{name}-static'] / sizes[f'llama-{kind}']:.2f}x "
                         f"({sizes[f'prev-{name}-static']:.0f} MB) | " + " | ".join(cells)
                         + f" | {o['max_abs']:.4f} | {o['kl']:.1e} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["all", "convert", "quantize", "child"], default="all")
    ap.add_argument("--work", type=Path, help="folder for the model and the files (kept; default: a temp folder)")
    ap.add_argument("--peer", type=Path, default=Path("/work/llama-venv"), help="llama-cpp-python's venv")
    ap.add_argument("--llama-cpp", type=Path,
                    default=Path("/work/llama-src/llama_cpp_python-0.3.36/vendor/llama.cpp"),
                    help="llama.cpp's source (the sdist's vendor/llama.cpp): its converter")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of fresh processes (medians over them; 0: "
                    "only the file sizes and the logits check)")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--contexts", default="128,1024")
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed at each context (median)")
    ap.add_argument("--profile", type=int, metavar="CONTEXT", help="also ONNX Runtime's profile of our static "
                    "files' decode step at this context (tools/bench_kv_buffer.py's profile)")
    ap.add_argument("--profile-prefill", action="store_true", help="also ONNX Runtime's profile of our static "
                    "files' prefill of --prefill tokens (op shares, and the LM head's share)")
    ap.add_argument("--compare-ours", type=Path, metavar="DIR", help="also time and check our static files of "
                    "another build, DIR/ours-{f32,int8,int4}-static.onnx where present (e.g. exported by an earlier "
                    "commit), as extra rows in the same interleaved rounds")
    ap.add_argument("--logits-to-keep", action="store_true", help="our static files exported with --logits-to-keep "
                    "(ours-*-static-last.onnx): a prefill computes the last position's logits only, as llama.cpp's "
                    "does; the static files without it are timed beside, as the --compare-ours rows")
    ap.add_argument("--only", default="f32,int8,int4", help="the precisions timed (the logits check runs all)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer d 64 BLOOM: checks the whole path in a minute")
    ap.add_argument("--json", default=None)
    # the stages' own arguments
    ap.add_argument("--model", type=Path)
    ap.add_argument("--file", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--kind", choices=list(FTYPES))
    ap.add_argument("--engine", choices=["ours", "llama", "llama-fa"])
    ap.add_argument("--task", choices=["time", "logits"])
    args = ap.parse_args()
    if args.stage == "convert":
        stage_convert(args.llama_cpp, args.model, args.out)
        return 0
    if args.stage == "quantize":
        stage_quantize(args.file, args.kind, args.out)
        return 0
    if args.stage == "child":
        print(json.dumps(child(args.engine, args.file, args.task, args)))
        return 0

    if not (args.peer / "bin" / "python").is_file():
        sys.exit(f"Error: no llama-cpp-python venv at {args.peer}. Note: make it as this script's docstring says")
    if not (args.llama_cpp / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"Error: no convert_hf_to_gguf.py in {args.llama_cpp}. Note: pass --llama-cpp SDIST/vendor/llama.cpp")
    if args.logits_to_keep and args.compare_ours:
        sys.exit("Error: --logits-to-keep already times the all-logits static files beside; drop --compare-ours")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    contexts = [int(c) for c in args.contexts.split(",")]
    lmax = max(args.prefill, max(contexts) + args.steps + 1, ERROR_TOKENS)
    folder = build_model(work / "bloom", args.tiny)
    files = {**export_ours(folder, work, lmax, args.logits_to_keep),
             **convert_theirs(folder, work, args.llama_cpp, args.peer)}
    for name, _, _ in PRECISIONS if args.compare_ours else ():
        if (args.compare_ours / f"ours-{name}-static.onnx").is_file():
            files[f"prev-{name}-static"] = args.compare_ours / f"ours-{name}-static.onnx"
    sizes = {k: file_mb(p) for k, p in files.items()}

    import numpy as np

    logits = {}
    for name, _, kind in PRECISIONS:
        for label, engine in ((f"ours-{name}", "ours"), (f"llama-{kind}", "llama"), (f"prev-{name}", "ours")):
            key = f"{label}-static" if engine == "ours" else label
            if key in files:
                path = work / f"logits-{label}.npy"
                run_child(args.peer, engine, files[key], "logits", args, path)
                logits[label] = np.load(path)
    errors = {k: logits_error(logits["llama-f32" if k.startswith("llama") else "ours-f32"], v)
              for k, v in logits.items() if k not in ("ours-f32", "llama-f32")}
    errors["ours-f32 vs llama-f32"] = logits_error(logits["llama-f32"], logits["ours-f32"])
    print("logits error:", json.dumps(errors), flush=True)

    if args.repeats == 0:  # the sizes and the logits check only
        path = out_path("bench_llamacpp.json", args.json)
        if path:
            write_record(path, {"sizes_mb": sizes, "errors": errors, "work": str(work)})
        return 0
    load = [os.getloadavg()[0]]
    names = args.only.split(",")
    samples = {label: [] for label, _, _ in timed_configs(files, names)}
    for r in range(args.repeats):
        for label, engine, path in timed_configs(files, names):
            samples[label].append(run_child(args.peer, engine, path, "time", args))
            print(f"round {r + 1} {label}: " + ", ".join(f"{k} {v:.1f}" for k, v in samples[label][-1].items()),
                  flush=True)
        load.append(os.getloadavg()[0])
    times = {label: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for label, runs in samples.items()}
    print(f"\nload average (1 min) at the start and after each round: {', '.join(f'{x:.1f}' for x in load)}")
    prev_note = "all logits: without --logits-to-keep" if args.logits_to_keep else "--compare-ours"
    print(table(times, sizes, errors, contexts, args.prefill, names, prev_note))
    profiled = None
    if args.profile:
        sys.path.insert(0, str(ROOT / "tools"))
        from bench_kv_buffer import profile

        profiled = profile({f"{name}-static": files[f"ours-{name}-static"] for name, _, _ in PRECISIONS}, 1,
                           args.profile, THREADS)
    if args.profile_prefill:
        sys.path.insert(0, str(ROOT / "tools"))
        from bench_kv_buffer import profile

        profiled = {"decode": profiled, "prefill": profile(
            {f"{name}-static": files[f"ours-{name}-static"] for name, _, _ in PRECISIONS}, 1, 0, THREADS, steps=3,
            prefill=args.prefill)}
    path = out_path("bench_llamacpp.json", args.json)
    if path:
        write_record(path, {"sizes_mb": sizes, "errors": errors, "samples": samples, "medians": times,
                            "load_average": load, "profile": profiled, "work": str(work)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
