"""The paper's Figure 1 and Figure 2 with fair baselines, and its train-short claim, in one GPU call (issue 22).

All five position methods are trained by train_short_claim.train_one (alibi_export.train: bf16 autocast, the
fused kernel where the method can use it) with ONE shared recipe: the same architecture (6 layers, d 384),
tokenizer, seed, token budget, learning-rate schedule, and token embeddings times sqrt(d) (the paper's fairseq
recipe, ModelConfig.embed_scale) for every method. Two more runs: ALiBi with the recipe of the runs before
issue 22 (embeddings x 1, a control of what the shared recipe costs or gives ALiBi), and sinusoidal trained at
2L (the train-short claim: ALiBi at L against sinusoidal at 2L at the same budget).

Stages, in this order (the JSON is rewritten after each, so a run cut short keeps what it finished; a stage
that would start after --budget-s is skipped and says so):
  1. train each run, recording its loss curve; books test-split perplexity at --lengths (Figure 1)
  2. training and inference tokens/s and peak memory at L for each method on three attention paths
     (Figure 2): eager (scores materialized: the paper's setting), sdpa (PyTorch SDPA; ALiBi and T5 pass
     a materialized bias, the others none) and fused (the Triton kernel; T5 cannot use it)
  3. with --retrain-shipped: sinusoidal-small retrained with the recipe its trainer_state.json records,
     the token embeddings x sqrt(d) aside, to $OUT/sinusoidal-small; test perplexity of it, the shipped
     one and alibi-small

Usage (repo root):
  python tools/fair_baselines.py corpus ../shared/data/books .data/books-fair   # here: a < 30 MB copy
  PYTHONPATH=. python tools/fair_baselines.py run --corpus .data/books-fair --retrain-shipped   # the GPU
  python tools/fair_baselines.py plot docs/fair_baselines.json     # here: the two PNGs beside the JSON
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import out_path, write_record
from train_short_claim import model_config, train_one

import alibi_export.train as train_module  # noqa: E402
from alibi_export.data import corpus_split, encode_text, read_text, train_tokenizer  # noqa: E402
from alibi_export.model import PAPER_EMBED_SCALE, AlibiLM, ModelConfig, embed_scale_of  # noqa: E402
from alibi_export.train import TrainConfig, evaluate, train  # noqa: E402

METHODS = ("alibi", "sinusoidal", "rotary", "learned", "t5")
PATHS = ("eager", "sdpa", "fused")
JSON_NAME = "fair_baselines.json"


# ------------------------------------------------------------------------------------------------ corpus
def copy_corpus(src: Path, dst: Path, train_mb: float, valid_mb: float) -> dict:
    """The books corpus cut to fit the device's carry: the first ``train_mb`` MB of train.txt and ``valid_mb``
    of valid.txt (each cut after a newline; training reads 65,536 validation tokens, about 0.3 MB), test.txt
    whole (every figure evaluates all of it)."""
    if dst.exists() and any(dst.iterdir()):
        raise SystemExit(f"Error: {dst} is not empty; choose a new folder")
    limits = {"train.txt": train_mb, "valid.txt": valid_mb, "test.txt": None}
    dst.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, mb in limits.items():
        data = (src / name).read_bytes()
        if mb is not None and len(data) > mb * 1e6:
            data = data[:data.rindex(b"\n", 0, int(mb * 1e6)) + 1]
        (dst / name).write_bytes(data)
        sizes[name] = len(data)
    return sizes


# ------------------------------------------------------------------------------------------------ run
def memoize_encoding() -> None:
    """train() tokenizes the whole train split for every model it trains; the runs here share one tokenizer,
    so each text is tokenized once (seconds per model on the device, minutes here)."""
    cache, original = {}, train_module.encode_text

    def encode(tokenizer, text):
        key = (hash(tokenizer.to_str()), hash(text), len(text))
        if key not in cache:
            cache[key] = original(tokenizer, text)
        return cache[key]

    train_module.encode_text = encode


def autocast_for(device):
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def test_perplexity(model, tokens, lengths, device) -> dict:
    """Books test-split perplexity at each length the model can run (learned stops at its table) and the test
    split covers; every token of each non-overlapping window scored."""
    cfg = model.config
    out = {}
    for length in lengths:
        if (cfg.position == "learned" and length > cfg.max_positions) or length >= len(tokens):
            continue
        out[str(length)] = {"ppl": evaluate(model, tokens, length, device, autocast_for(device)),
                            "tokens": (len(tokens) - 1) // length * length}
    return out


def runs_of(args) -> list[dict]:
    """The trained runs: the five methods at L with the shared recipe, then the two extra runs."""
    runs = [{"name": m, "position": m, "train_len": args.train_len, "recipe": args.embed_scale} for m in METHODS]
    runs.append({"name": f"sinusoidal@{2 * args.train_len}", "position": "sinusoidal",
                 "train_len": 2 * args.train_len, "recipe": args.embed_scale})
    if args.control:
        runs.append({"name": "alibi, embeddings x 1", "position": "alibi", "train_len": args.train_len,
                     "recipe": "1"})
    if args.only:  # a later call finishing what a budget cut off, e.g. --only learned,t5 --steps 2400
        names = {r["name"] for r in runs}
        unknown = sorted(set(args.only) - names)
        if unknown:
            raise SystemExit(f"Error: --only {','.join(unknown)}: not a run of this call ({', '.join(sorted(names))})")
        runs = [r for r in runs if r["name"] in args.only]
    return runs


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def measure_speed(args, position: str, path: str, device, train_len: int) -> dict:
    """Training (the step alibi_export.train takes: bf16 autocast, cross-entropy, backward, clip, fused
    AdamW) and inference (a no-grad forward) on random tokens at ``train_len``, batch tokens_per_step / it;
    timed after --speed-warmup steps; peak memory of the timed steps, weights and optimizer state included."""
    torch.manual_seed(args.seed)
    model = AlibiLM(model_config(args, position, train_len)).to(device).train()
    model.set_attention({"eager": "eager", "sdpa": "sdpa", "fused": "triton"}[path])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    L, B = train_len, args.tokens_per_step // train_len
    ids = torch.randint(0, args.vocab_size, (B, L + 1), generator=torch.Generator().manual_seed(0)).to(device)
    x, y = ids[:, :-1], ids[:, 1:]
    autocast = autocast_for(device)

    def train_step():
        with autocast():
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    @torch.no_grad()
    def infer_step():
        with autocast():
            model(x)

    out = {"position": position, "attention": path, "train_len": L, "batch_size": B,
           # whether the fused kernel really ran (T5 and every CPU run take SDPA on this path)
           "fused_kernel": path == "fused" and device.type == "cuda" and model.pos.fused_kernel_ok}
    for what, step in (("train", train_step), ("inference", infer_step)):
        for _ in range(args.speed_warmup):
            step()
        _sync(device)
        _peak_reset(device)
        t = time.perf_counter()
        for _ in range(args.speed_steps):
            step()
        _sync(device)
        dt = (time.perf_counter() - t) / args.speed_steps
        out[what] = {"tokens_per_s": B * L / dt, "step_ms": 1e3 * dt, "peak_GiB": _peak(device)}
    return out


def retrain_shipped(args, name: str, dst: Path, scratch: Path, test_text: str, device) -> dict:
    """``name`` retrained with the TrainConfig its shipped trainer_state.json records (architecture, budget,
    schedule, seed, save dtype, its own tokenizer), token embeddings x sqrt(d) aside; only the corpus (this
    run's, see its sizes in the JSON), output and device differ. The checkpoint's files are copied flat to
    ``dst`` (no links: the device's return folder takes plain files only)."""
    from alibi_export import load
    from alibi_export.shipped import shipped_model

    folder = shipped_model(name)
    recorded = json.loads((folder / "trainer_state.json").read_text())["train_config"]
    model = {**recorded["model"]}
    model["embed_scale"] = embed_scale_of(args.embed_scale, model["d_model"])
    cfg = TrainConfig(**{**recorded, "model": ModelConfig.from_dict(model), "corpus": str(args.corpus),
                         "out": str(scratch / name), "device": str(device),
                         "tokenizer": str(folder / "tokenizer.json"),
                         "steps": args.retrain_steps or recorded["steps"]})  # fewer: the CPU dry run
    curve = []

    def on_progress(p):
        if p.step % 50 == 0 or p.step == p.steps:
            curve.append([p.step, p.loss])
        if p.val_ppl is not None:
            print(f"  {name} step {p.step}/{p.steps} loss {p.loss:.3f} val ppl {p.val_ppl:.2f}", flush=True)

    t0 = time.perf_counter()
    train(cfg, overwrite=True, on_progress=on_progress)
    train_s = time.perf_counter() - t0
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json"):
        shutil.copyfile(scratch / name / f, dst / f)  # follows the checkpoint's links to its current set
    lengths = [n for n in (256, 512, 1024, 2048, 4096) if n <= args.lengths[-1]]
    ppl = {}
    for label, path in ((f"{name} (retrained)", dst), (f"{name} (shipped)", folder),
                        ("alibi-small (shipped)", shipped_model("alibi-small"))):
        ckpt = load(path, device=str(device))
        tokens = encode_text(ckpt.tokenizer, test_text)
        ppl[label] = {k: v["ppl"] for k, v in test_perplexity(ckpt.model, tokens, lengths, device).items()}
        del ckpt
    return {"name": name, "train_config": {**cfg.__dict__, "model": cfg.model.to_dict()}, "train_s": train_s,
            "loss_curve": curve, "test_ppl": ppl, "files": str(dst)}


def run(args) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_all = time.perf_counter()
    json_path = out_path(JSON_NAME, args.json)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    scratch = Path(tempfile.mkdtemp(prefix="fair-baselines-"))
    memoize_encoding()
    res = {"recipe": {
        "shared": f"every method: {args.layers} layers, d {args.d_model}, {args.heads} heads, d_ff 4d, vocab "
                  f"{args.vocab_size} byte-level BPE trained on the train split, seed {args.seed}, "
                  f"{args.tokens_per_step} tokens per step, {args.steps} steps, AdamW (0.9, 0.95), weight decay "
                  f"0.1, lr {args.lr} with {args.steps // 20} warm-up steps then cosine to lr/10, grad clip 1, "
                  f"bf16 autocast, token embeddings x {args.embed_scale} (ModelConfig.embed_scale "
                  f"{embed_scale_of(args.embed_scale, args.d_model):.4g}); init N(0, 0.02), residual "
                  "projections N(0, 0.02/sqrt(2 n_layer)), tied input/output embeddings",
        "embed_scale": embed_scale_of(args.embed_scale, args.d_model)},
        "args": {k: str(v) for k, v in vars(args).items() if k != "func"},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "runs": [], "speed": [], "skipped": []}

    def save():
        res["total_s"] = time.perf_counter() - t_all
        if json_path:
            write_record(json_path, res)

    def time_left(stage: str, need_s: float) -> bool:
        if time.perf_counter() - t_all + need_s <= args.budget_s:
            return True
        res["skipped"].append(f"{stage}: would end past the {args.budget_s:.0f} s budget")
        print("skipped:", res["skipped"][-1], flush=True)
        return False

    t0 = time.perf_counter()
    tokenizer = train_tokenizer([corpus_split(args.corpus, "train")], args.vocab_size)
    tokenizer_file = scratch / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    test_text = read_text(corpus_split(args.corpus, "test"))
    test_tokens = encode_text(tokenizer, test_text)
    res["corpus"] = {s: os.path.getsize(corpus_split(args.corpus, s)) for s in ("train", "valid", "test")}
    res["test_tokens"] = len(test_tokens)
    print(f"tokenizer and test split {time.perf_counter() - t0:.1f} s; {len(test_tokens):,} test tokens; "
          f"{res['device']}", flush=True)
    need = 0.0
    for spec in runs_of(args):
        if not time_left(f"run {spec['name']}", need):
            continue
        t0 = time.perf_counter()
        record, model = train_one(args, spec["position"], spec["train_len"], tokenizer_file, scratch, device,
                                  embed_scale=embed_scale_of(spec["recipe"], args.d_model),
                                  name=spec["name"].replace(" ", "_").replace(",", ""),
                                  curve_every=max(1, args.steps // args.curve_points))
        record.update(name=spec["name"], recipe=spec["recipe"])
        record["test_ppl"] = test_perplexity(model, test_tokens, args.lengths, device)
        record["with_eval_s"] = time.perf_counter() - t0
        need = record["with_eval_s"]
        res["runs"].append(record)
        print(f"{spec['name']}: loss {record['final_loss']:.3f}, "
              + ", ".join(f"{k}: {v['ppl']:.2f}" for k, v in record["test_ppl"].items())
              + f" ({record['with_eval_s']:.0f} s, train {record['tokens_per_s']:,.0f} tok/s)", flush=True)
        del model
        _peak_reset(device)
        save()
    by_name = {r["name"]: r for r in res["runs"]}
    a, s = by_name.get("alibi"), by_name.get(f"sinusoidal@{2 * args.train_len}")
    long = str(2 * args.train_len)
    if a and s and long in a["test_ppl"] and long in s["test_ppl"]:
        res["train_short_claim"] = {
            "test_ppl_at_2L": {"alibi@L": a["test_ppl"][long]["ppl"], "sinusoidal@2L": s["test_ppl"][long]["ppl"]},
            "alibi_loop_time_vs_sinusoidal@2L": a["loop_s"] / s["loop_s"],
            "alibi_peak_memory_vs_sinusoidal@2L": (a["peak_GiB"] / s["peak_GiB"]
                                                   if a["peak_GiB"] and s["peak_GiB"] else None)}
        print("train-short claim:", json.dumps(res["train_short_claim"]), flush=True)
    save()
    # every method at L, then sinusoidal at 2L: the train-short claim's speed and memory on each path
    speed_runs = [(m, args.train_len) for m in METHODS] + [("sinusoidal", 2 * args.train_len)]
    for position, train_len in speed_runs if args.speed else []:
        for path in PATHS:
            if path == "fused" and position == "t5" and device.type == "cuda":
                continue  # a learned bias per bucket: the kernel takes slopes only (the JSON has its sdpa row)
            if not time_left(f"speed {position}@{train_len} {path}", args.speed_need_s):
                continue
            try:
                row = measure_speed(args, position, path, device, train_len)
            except torch.cuda.OutOfMemoryError:
                row = {"position": position, "attention": path, "train_len": train_len, "error": "out of memory"}
            res["speed"].append(row)
            _peak_reset(device)
            print("speed", json.dumps(row), flush=True)
        save()
    claim = {}
    for path in PATHS:
        a, s = (next((r for r in res["speed"] if r["position"] == p and r["attention"] == path and
                      r.get("train_len") == n and "error" not in r), None)
                for p, n in (("alibi", args.train_len), ("sinusoidal", 2 * args.train_len)))
        if a and s:
            claim[path] = {"alibi@L_train_tokens_per_s_vs_sinusoidal@2L": a["train"]["tokens_per_s"] /
                           s["train"]["tokens_per_s"],
                           "alibi@L_train_peak_vs_sinusoidal@2L": (a["train"]["peak_GiB"] / s["train"]["peak_GiB"]
                                                                  if a["train"]["peak_GiB"] else None)}
    if claim and "train_short_claim" in res:
        res["train_short_claim"]["speed_by_attention"] = claim
        print("train-short claim, speed:", json.dumps(claim), flush=True)
    save()
    if args.retrain_shipped and time_left("retrain sinusoidal-small", args.retrain_need_s):
        dst = args.retrain_out or (out_dir or Path(".")) / "sinusoidal-small"
        res["retrain"] = retrain_shipped(args, "sinusoidal-small", dst, scratch, test_text, device)
        print("retrain", json.dumps(res["retrain"]["test_ppl"]), f"{res['retrain']['train_s']:.0f} s", flush=True)
    save()
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"total {time.perf_counter() - t_all:.0f} s; wrote {json_path}", flush=True)


# ------------------------------------------------------------------------------------------------ plot
def plot(json_file: Path, out_dir: Path) -> list[Path]:
    """Figure 1 (perplexity against length, one line per model trained at L), Figure 2 (training speed,
    inference speed, peak memory per method and attention path) and the loss curves, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alibi_export._io import atomic_path
    from alibi_export.perplexity import PerplexityRow, plot_perplexity

    res = json.loads(json_file.read_text())["results"]
    L = int(res["args"]["train_len"])
    curves = {r["name"]: [PerplexityRow(int(k), v["ppl"], v["tokens"], v["tokens"] // int(k))
                          for k, v in r["test_ppl"].items()]
              for r in res["runs"] if r["train_len"] == L}
    stem = json_file.stem  # fair_baselines.json -> fair_baselines_figure1.png; other runs keep their own names
    fig1 = out_dir / f"{stem}_figure1.png"
    plot_perplexity(curves, fig1, train_len=L, title=f"Books test split, all trained at L = {L} "
                                                     f"({res['runs'][0]['tokens'] / 1e6:.1f}M tokens each)")
    losses = out_dir / f"{stem}_loss.png"  # whether each curve has flattened
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for r in res["runs"]:
        ax.plot(*zip(*r["loss_curve"]), label=f"{r['name']} (L = {r['train_len']})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean since the previous point)")
    ax.set_title("Training loss, the same tokens per step for every run")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(losses) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": "alibi-export"})
    plt.close(fig)
    rows = [r for r in res["speed"] if "error" not in r and r["train_len"] == L]
    if not rows:  # a --no-speed run: no Figure 2 rather than empty axes
        return [fig1, losses]
    fig2 = out_dir / f"{stem}_figure2.png"
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), dpi=110)
    width = 0.8 / len(PATHS)
    for ax, (what, key, label) in zip(axes, (("train", "tokens_per_s", "training tokens/s"),
                                             ("inference", "tokens_per_s", "inference tokens/s"),
                                             ("train", "peak_GiB", "training peak memory (GiB)"))):
        for i, path in enumerate(PATHS):
            vals = []
            for m in METHODS:
                cell = next((r for r in rows if r["position"] == m and r["attention"] == path), None)
                vals.append((cell[what][key] or 0) if cell else 0)
            ax.bar([j + (i - 1) * width for j in range(len(METHODS))], vals, width, label=path)
        ax.set_xticks(range(len(METHODS)), METHODS)
        ax.set_title(f"{label}, L = {L}")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(title="attention")
    fig.suptitle(f"{res['device']}: {res['speed'][0]['batch_size'] if res['speed'] else '?'} x {L} tokens per step, "
                 "bf16 autocast (eager: scores materialized; fused: T5 cannot use the kernel)")
    fig.tight_layout()
    with atomic_path(fig2) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": "alibi-export"})
    plt.close(fig)
    return [fig1, fig2, losses]


def tables(json_file: Path) -> str:
    """The JSON's numbers as the Markdown tables of BENCHMARKS.md (pasted, never typed)."""
    res = json.loads(json_file.read_text())["results"]
    lengths = [int(n) for n in json.loads(res["args"]["lengths"].replace("'", '"'))]
    out = [f"Recipe: {res['recipe']['shared']}.", "",
           "| run | trained at | embed scale | final loss | train tok/s | peak GiB | "
           + " | ".join(f"test ppl @ {n}" for n in lengths) + " |",
           "|---" * (6 + len(lengths)) + "|"]
    for r in res["runs"]:
        ppl = [f"{r['test_ppl'][str(n)]['ppl']:.2f}" if str(n) in r["test_ppl"] else "-" for n in lengths]
        peak = f"{r['peak_GiB']:.2f}" if r["peak_GiB"] else "-"
        out.append(f"| {r['name']} | {r['train_len']} | {r['embed_scale']:.3g} | {r['final_loss']:.3f} | "
                   f"{r['tokens_per_s']:,.0f} | {peak} | " + " | ".join(ppl) + " |")
    if res["speed"]:
        out += ["", "| method | trained at | attention | fused kernel ran | train tok/s | train peak GiB | "
                    "inference tok/s | inference peak GiB |", "|---" * 8 + "|"]
    for r in res["speed"]:
        if "error" in r:
            out.append(f"| {r['position']} | {r.get('train_len', '')} | {r['attention']} | | {r['error']} | | | |")
            continue
        gib = [f"{r[w]['peak_GiB']:.2f}" if r[w]["peak_GiB"] else "-" for w in ("train", "inference")]
        out.append(f"| {r['position']} | {r['train_len']} | {r['attention']} | {r['fused_kernel']} | "
                   f"{r['train']['tokens_per_s']:,.0f} | {gib[0]} | {r['inference']['tokens_per_s']:,.0f} | "
                   f"{gib[1]} |")
    if "train_short_claim" in res:
        out += ["", "Train-short claim: " + json.dumps(res["train_short_claim"])]
    if "retrain" in res:
        rt = res["retrain"]["test_ppl"]
        ns = sorted({int(n) for v in rt.values() for n in v})
        out += ["", "| model | " + " | ".join(f"test ppl @ {n}" for n in ns) + " |", "|---" * (1 + len(ns)) + "|"]
        out += [f"| {k} | " + " | ".join(f"{v[str(n)]:.2f}" if str(n) in v else "-" for n in ns) + " |"
                for k, v in rt.items()]
    if res.get("skipped"):
        out += ["", "Skipped: " + "; ".join(res["skipped"])]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ main
def lengths_arg(text: str) -> list[int]:
    return sorted(int(n) for n in text.split(","))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corpus", help="copy the books corpus, cut to fit the device's carry")
    c.add_argument("src", type=Path)
    c.add_argument("dst", type=Path)
    c.add_argument("--train-mb", type=float, default=26.0)
    c.add_argument("--valid-mb", type=float, default=0.5)
    r = sub.add_parser("run", help="train, evaluate and measure (the GPU call)")
    r.add_argument("--corpus", type=Path, required=True, help="folder with train.txt, valid.txt, test.txt")
    r.add_argument("--train-len", type=int, default=512)
    r.add_argument("--steps", type=int, default=1200)
    r.add_argument("--tokens-per-step", type=int, default=32768)
    r.add_argument("--layers", type=int, default=6)
    r.add_argument("--heads", type=int, default=6)
    r.add_argument("--d-model", type=int, default=384)
    r.add_argument("--vocab-size", type=int, default=8192)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--embed-scale", default=PAPER_EMBED_SCALE, help="the shared recipe's factor on the token "
                   "embeddings: sqrt-d or a number")
    r.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the ALiBi run with embeddings x 1")
    r.add_argument("--only", type=lambda t: [n.strip() for n in t.split(",") if n.strip()], default=None,
                   help="train only these runs (comma-separated names: alibi, sinusoidal, rotary, learned, t5, "
                        "sinusoidal@2L as e.g. sinusoidal@1024; the 'alibi, embeddings x 1' control cannot be "
                        "named here and is left out)")
    r.add_argument("--no-speed", dest="speed", action="store_false", help="skip the speed and memory stage")
    r.add_argument("--lengths", type=lengths_arg, default=[512, 1024, 2048, 4096, 8192, 16384])
    r.add_argument("--curve-points", type=int, default=50, help="loss-curve points per run")
    r.add_argument("--speed-steps", type=int, default=10)
    r.add_argument("--speed-warmup", type=int, default=3)
    r.add_argument("--speed-need-s", type=float, default=8.0, help="time kept for one speed measurement")
    r.add_argument("--retrain-shipped", action="store_true", help="also retrain sinusoidal-small")
    r.add_argument("--retrain-need-s", type=float, default=70.0, help="time kept for the retrain")
    r.add_argument("--retrain-steps", type=int, default=None, help="default: the recorded steps (4000)")
    r.add_argument("--retrain-out", type=Path, default=None, help="default: $OUT/sinusoidal-small")
    r.add_argument("--budget-s", type=float, default=540.0, help="skip a stage that would end past this")
    r.add_argument("--device", default=None)
    r.add_argument("--json", type=Path, default=None, help=f"default $OUT/{JSON_NAME}")
    p = sub.add_parser("plot", help="the PNGs from the JSON (needs matplotlib), and its Markdown tables")
    p.add_argument("json", type=Path)
    p.add_argument("--out-dir", type=Path, default=None, help="default: the JSON's folder")
    args = ap.parse_args(argv)
    if args.command == "corpus":
        print(json.dumps(copy_corpus(args.src, args.dst, args.train_mb, args.valid_mb)))
    elif args.command == "run":
        run(args)
    else:
        for f in plot(args.json, args.out_dir or args.json.parent):
            print("wrote", f)
        print(tables(args.json))


if __name__ == "__main__":
    sys.exit(main())
