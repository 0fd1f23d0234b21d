"""int8 recipes of ONNX Runtime's own tools, measured on this machine's CPU kernel path (issue 19).

ONNX Runtime's dynamic int8 multiplies u8 activations by the weights. With int8 weights (u8s8), its AVX2 and
AVX-512BW kernels (no VNNI) add pairs of u8*s8 products into int16 with saturation (VPMADDUBSW); VNNI and AMX
accumulate into int32. So the same file is accurate on one server and not on another. Recipes compared:

  u8s8        quantize_dynamic, int8 weights per channel (--quantize int8 before issue 19; the control)
  u8s8-7bit   the same with reduce_range=True (7-bit weights: 2 * 255 * 64 < 32767, no pair can saturate)
  u8u8        quantize_dynamic, uint8 weights per channel (MLAS's U8U8 kernels widen to int16 first)
  nbits8-a4   MatMulNBits bits=8, block 32, accuracy_level 4 (int8 activations per block in the kernel;
              --quantize int8 since issue 19)
  nbits8-a0   MatMulNBits bits=8, block 32, accuracy_level 0 (weights dequantized, float32 products)

For each: the perplexity gate's ratios (the file over the float32 PyTorch model) at the lengths given, argmax
agreement, file size, and ms per forward of --prefill tokens and per decoding step through a KV-cache export
(sessions interleaved in one process, median, so that a shared machine's load falls on all alike).

Models: the shipped alibi-small on the shipped excerpt (1x/4x/16x its training length, as the CLI gate), and
--hf: tiny random Hugging Face models built like tests/test_hf_models.py's fast variants (BLOOM post-LN, MPT
with clip_qkv, Falcon multi-query), on the excerpt through a 300-token tokenizer, at 1x/4x (as the tests).

usage: python tools/compare_int8_recipes.py [--hf] [--recipes u8s8,u8s8-7bit,...] [--no-speed | --no-gate]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _dynamic(weight_type: str, reduce_range: bool):
    def recipe(proto, block_size=32):
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "q.onnx"
            quantize_dynamic(proto, out, op_types_to_quantize=["MatMul"], per_channel=True,
                             reduce_range=reduce_range, weight_type=getattr(QuantType, weight_type),
                             extra_options={"MatMulConstBOnly": True})
            return onnx.load(str(out))
    return recipe


def _nbits8(accuracy_level: int):
    def recipe(proto, block_size=32):
        from alibi_export.export.quantize import _nbits

        return _nbits(proto, 8, block_size, accuracy_level, op_types=("MatMul",), quant_axes=(("MatMul", 0),))
    return recipe


RECIPES = {"u8s8": _dynamic("QInt8", False), "u8s8-7bit": _dynamic("QInt8", True), "u8u8": _dynamic("QUInt8", False),
           "nbits8-a4": _nbits8(4), "nbits8-a0": _nbits8(0)}


@contextmanager
def recipe_as_int8(name):
    """``--quantize int8`` exports through ``name``'s recipe (everything else of the export path unchanged)."""
    from alibi_export.export import quantize

    if name == "current":
        yield
        return
    with mock.patch.object(quantize, "_int8", RECIPES[name]):
        yield


def hf_models(root: Path):
    """The fast variants of tests/test_hf_models.py, built the same way (configs, seeds, weight scales)."""
    import torch
    import transformers

    from alibi_export import load
    from alibi_export.data import train_tokenizer
    from alibi_export.runtime.transformers_ref import configured_mpt_bias
    from alibi_export.shipped import default_text

    text = root / "train.txt"
    text.write_text(default_text().read_text()[:20000])
    tokenizer = train_tokenizer([text], 300)
    common = dict(vocab_size=300, eos_token_id=0, bos_token_id=0)
    variants = {
        "bloom-6h-postln": transformers.BloomForCausalLM(transformers.BloomConfig(
            hidden_size=48, n_layer=2, seq_length=32, n_head=6, apply_residual_connection_post_layernorm=True,
            **common)),
        "mpt-6h-max16-clip-scale": transformers.MptForCausalLM(transformers.MptConfig(
            d_model=48, n_layers=2, max_seq_len=32, n_heads=6,
            attn_config=dict(alibi_bias_max=16, clip_qkv=2.0, softmax_scale=0.3), **common)),
        "falcon-6h-mq-parallel-nobias": transformers.FalconForCausalLM(transformers.FalconConfig(
            hidden_size=48, num_hidden_layers=2, alibi=True, max_position_embeddings=32, num_attention_heads=6,
            multi_query=True, parallel_attn=True, bias=False, **common)),
    }
    for variant, hf in variants.items():
        g = torch.Generator().manual_seed(sum(map(ord, variant)))
        with torch.no_grad():
            for name, p in hf.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                if p.dim() == 2:
                    p.copy_(noise if "emb" in name or "wte" in name else noise * 1.5 / math.sqrt(p.shape[1]))
                else:
                    p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
        if variant.startswith("mpt"):
            configured_mpt_bias(hf)
        hf.save_pretrained(root / variant)
        tokenizer.save(str(root / variant / "tokenizer.json"))
        yield variant, load(root / variant)


def speed(paths: dict, kv_paths: dict, prefill: int, steps: int, repeats: int) -> dict:
    """ms per forward of ``prefill`` tokens, and ms per decoding step after it, per recipe (interleaved)."""
    from alibi_export.runtime.generate import GenerationSession
    from alibi_export.runtime.onnxruntime import create_session

    ids = np.random.default_rng(0).integers(0, 256, size=(1, prefill), dtype=np.int64)
    sessions = {k: create_session(p, threads=2) for k, p in paths.items()}
    gens = {k: GenerationSession(p, threads=2) for k, p in kv_paths.items()}
    times = {k: [] for k in sessions}
    decode = {k: [] for k in gens}
    for k in sessions:  # warm-up
        sessions[k].run(None, {"input_ids": ids})
        gens[k].generate_ids(ids[:, :32].tolist(), 2, stop_tokens=[])
    for _ in range(repeats):
        for k in sessions:
            t = time.perf_counter()
            sessions[k].run(None, {"input_ids": ids})
            times[k].append(time.perf_counter() - t)
            r = gens[k].generate_ids(ids[:, :prefill // 4].tolist(), steps, stop_tokens=[])
            decode[k].append(r.decode_seconds / r.steps)
    return {k: (1e3 * statistics.median(times[k]), 1e3 * statistics.median(decode[k])) for k in sessions}


def measure(name, ckpt, tokens, lengths, recipes, out: Path, args):
    from alibi_export.export.onnx import export_onnx
    from alibi_export.validate import perplexity_gate

    paths, kv_paths = {}, {}
    if not args.no_speed:
        paths["fp32"] = export_onnx(ckpt, out / f"{name}-fp32.onnx").path
        kv_paths["fp32"] = export_onnx(ckpt, out / f"{name}-fp32-kv.onnx", kv_cache=True).path
    print(f"\n{name}: perplexity ratio (int8 file / float32 PyTorch) and argmax agreement at "
          + ", ".join(map(str, lengths)) + " tokens", flush=True)
    for recipe in recipes:
        with recipe_as_int8(recipe):
            path = export_onnx(ckpt, out / f"{name}-{recipe}.onnx", quantize="int8").path
            if not args.no_speed:
                kv_paths[recipe] = export_onnx(ckpt, out / f"{name}-{recipe}-kv.onnx", quantize="int8",
                                               kv_cache=True).path
        paths[recipe] = path
        if args.no_gate:
            continue
        gate = perplexity_gate(path, ckpt.model, tokens, lengths, tolerance=1.02)
        print(f"  {recipe:>10}: " + "  ".join(f"{r.ratio:.4f} ({r.argmax_agreement:.1%})" for r in gate.rows)
              + f"  size {path.stat().st_size / 1e6:.2f} MB  gate {'PASS' if gate else 'FAIL'}", flush=True)
    if not args.no_speed:
        print(f"  fp32 size {paths['fp32'].stat().st_size / 1e6:.2f} MB; ms per forward of {args.prefill} tokens / "
              f"per decoding step (median of {args.repeats}, 2 threads):")
        for k, (fwd, step) in speed(paths, kv_paths, args.prefill, args.steps, args.repeats).items():
            print(f"  {k:>10}: {fwd:8.2f} ms  {step:6.3f} ms/step", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--hf", action="store_true", help="also the tiny random Hugging Face models")
    parser.add_argument("--no-shipped", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--no-gate", action="store_true", help="speed only")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    recipes = args.recipes.split(",")

    import onnxruntime

    from alibi_export import load
    from alibi_export.data import encode_text, read_text
    from alibi_export.runtime.onnxruntime import cpu_kernel_path
    from alibi_export.shipped import default_model, default_text

    print(f"onnxruntime {onnxruntime.__version__}, CPU kernel path {cpu_kernel_path()}")
    out = Path(tempfile.mkdtemp(prefix="int8-recipes-"))
    if not args.no_shipped:
        ckpt = load(default_model())
        lengths = [ckpt.config.train_len * m for m in (1, 4, 16)]
        tokens = encode_text(ckpt.tokenizer, read_text(default_text()))[: 4 * max(lengths) + 1]
        measure("alibi-small", ckpt, tokens, lengths, recipes, out, args)
    if args.hf:
        for variant, ckpt in hf_models(out):
            tokens = encode_text(ckpt.tokenizer, read_text(default_text()))[: 8 * 32 + 1]
            measure(variant, ckpt, tokens, [32, 128], recipes, out, args)


if __name__ == "__main__":
    main()
