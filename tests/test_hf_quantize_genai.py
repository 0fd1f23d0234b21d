"""Issue 12's options on Hugging Face folders: int8/int4 exports pass the perplexity gate, and --genai
folders of BLOOM and multi-query Falcon give onnxruntime-genai the same greedy tokens as GenerationSession.

The models are test_hf_models.py's tiny random ones (its fixtures, imported). Their logits are wide and
wrong (fp32 perplexity ~1e8-1e9 on English), so only the gate's ratio to the float32 model means anything
here; each gate has a negative control that must fail it. Gate tolerances are the defaults (int8 1.02,
int4 1.08), never widened here. The int8 cases are the ones that failed on AVX2 CPUs with the u8 x s8 recipe
(issue 19: ratios 1.03-1.31 there); with 8-bit MatMulNBits they measured 0.99-1.015 on AVX2
(tools/compare_int8_recipes.py --hf).
"""
from __future__ import annotations

import json
import shutil

import pytest

from alibi_export import load
from alibi_export.data import encode_text, read_text
from alibi_export.export.genai import export_genai
from alibi_export.export.onnx import export_onnx
from alibi_export.runtime.generate import GenerationSession
from alibi_export.runtime.onnxruntime import create_session
from alibi_export.validate import GateResult, perplexity_gate
from tests.conftest import EXCERPT
from tests.test_genai import check_genai_batch
from tests.test_hf_models import FAST, LEN, models  # noqa: F401  (models: the module fixture, reused)

LENGTHS = [LEN, 4 * LEN]  # 1x and 4x the training length
TOKENS = 8 * LEN + 1  # 8 windows at 1x, 2 at 4x: fewer make one window's noise the whole ratio
# (variant, quantize, kv_cache): each quantization in each form, spread over the variants to keep this fast.
CASES = [(FAST[0], "int8", False), (FAST[2], "int4", False), (FAST[2], "int4", True), (FAST[2], "int8", True),
         (FAST[1], "int8", False)]
# Different lengths (genai right-pads the batch), 20+ tokens apart: on these random models' near-constant
# output a shorter gap of attended padding does not change the short row's tokens (the negative control).
PROMPTS = ["It was a dark and stormy night, and the rain fell in torrents, except at occasional intervals, when it "
           "was checked", "The old"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tokens(models):
    """The shipped excerpt through the tiny models' own tokenizer (all FAST variants share it)."""
    return encode_text(models(FAST[0]).ckpt.tokenizer, read_text(EXCERPT))[:TOKENS]


@pytest.mark.parametrize("variant, quantize, kv", CASES)
def test_quantized_exports_run_and_pass_the_gate(models, tokens, tmp_path, variant, quantize, kv):
    m = models(variant)
    path = export_onnx(m.ckpt, tmp_path / "q.onnx", quantize=quantize, kv_cache=kv).path
    create_session(path)  # loads in ONNX Runtime (the gate below runs it)
    gate = perplexity_gate(path, m.ckpt.model, tokens, LENGTHS)
    detail = f"{variant} {quantize} kv={kv}: " + ", ".join(
        f"{r.length}: ratio {r.ratio:.4f} argmax {r.argmax_agreement:.3f}" for r in gate.rows)
    print(detail)
    assert gate.quantization == quantize and gate, detail
    # Negative control: the ratio is not exactly 1 (the file is really quantized), so a tolerance just
    # below the smallest ratio fails the gate.
    assert not GateResult(gate.rows, min(r.ratio for r in gate.rows) * (1 - 1e-6), quantize), detail


def test_the_gate_refuses_an_int4_export_over_its_tolerance(models, tokens, tmp_path):
    """BLOOM int4 on these random weights is over the default int4 gate (1.08) at 1x: measured ratio 1.101 with
    block 32 and the LM head at 8 bits (0.931 at 4x; 1.086 and 1.018 when the head was 4-bit too, 1.095 with
    block 16). Their logits are extreme (fp32 perplexity ~4e8 on English) and quantization noise moves them
    more than a trained model's (shipped model: 1.02). The gate says so, and a wider --ppl-tolerance lets it
    through: what the export command does with these numbers. The bounds bracket the deterministic measured
    value (fixed weights, fixed text); they say the file is over 1.08, not how far."""
    m = models(FAST[0])
    path = export_onnx(m.ckpt, tmp_path / "q.onnx", quantize="int4", kv_cache=True).path
    gate = perplexity_gate(path, m.ckpt.model, tokens, LENGTHS)
    worst = max(r.ratio for r in gate.rows)
    assert not gate and gate.tolerance == 1.08 and 1.08 < worst < 1.12, [r.ratio for r in gate.rows]
    assert perplexity_gate(path, m.ckpt.model, tokens, LENGTHS, tolerance=1.12)


# ----------------------------------------------------------------------------------------- genai
@pytest.fixture(scope="module")
def genai_folders(models, tmp_path_factory):
    """Falcon multi-query with eos_token_id moved to 7 (the config's, not the tokenizer's <|endoftext|>), and
    BLOOM as built; each as a genai folder, exported once."""
    built = {}

    def get(variant):
        if variant not in built:
            m, root = models(variant), tmp_path_factory.mktemp("genai")
            folder = root / "hf"
            shutil.copytree(m.folder, folder)
            cfg = json.loads((folder / "config.json").read_text())
            cfg["eos_token_id"] = 7
            (folder / "config.json").write_text(json.dumps(cfg))
            built[variant] = (m, load(folder), root / "out")
            export_genai(built[variant][1], root / "out", kv_cache=True, dynamic_len=True)
        return built[variant]

    return get


@pytest.mark.parametrize("variant", [FAST[2], FAST[0]])
def test_genai_config_comes_from_the_hf_config(genai_folders, variant):
    m, ckpt, out = genai_folders(variant)
    hf = m.hf.config
    decoder = json.loads((out / "genai_config.json").read_text())["model"]
    heads = hf.num_attention_heads if m.kind == "falcon" else hf.n_head
    kv_heads = 1 if getattr(hf, "multi_query", False) else heads
    assert (decoder["decoder"]["num_key_value_heads"], decoder["decoder"]["num_attention_heads"]) == (kv_heads, heads)
    assert decoder["decoder"]["head_size"] == hf.hidden_size // heads
    assert decoder["eos_token_id"] == 7 != ckpt.tokenizer.token_to_id("<|endoftext|>")


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("variant", [FAST[2], FAST[0]])
def test_genai_greedy_equals_generation_session(genai_folders, variant, batch):
    """genai pads a batch on the right and keeps the hole while it generates; ALiBi positions counted over
    real tokens make that padding invisible (test_kv_cache's right-padding tests), for BLOOM and Falcon too."""
    m, ckpt, out = genai_folders(variant)
    rows = [ckpt.tokenizer.encode(p).ids for p in PROMPTS[:batch]]
    assert len({len(r) for r in rows}) == batch  # the batch of 2 really has two lengths
    ours = GenerationSession(out / "model.onnx").generate_ids(rows, NEW_TOKENS, stop_tokens=[]).token_ids
    assert all(7 not in r for r in ours), ours  # genai stops at eos; GenerationSession here does not
    check_genai_batch(out, PROMPTS[:batch], ours, rows)
