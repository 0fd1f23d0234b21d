"""KV-cache export and generation in ONNX Runtime: incremental decoding, padding, parity, bad input."""
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from alibi_export.errors import AlibiExportError, ExportError
from alibi_export.attention_contract import MASKED_OP_TYPE
from alibi_export.export.onnx import export_onnx
from alibi_export.runtime.generate import GenerationSession
from alibi_export.artifacts import read_metadata
from alibi_export.validate import TOLERANCES
from tests.conftest import EXCERPT

TRAIN_LEN = 256


@pytest.fixture(scope="module")
def kv_onnx(tmp_path_factory, shipped):
    return export_onnx(shipped, tmp_path_factory.mktemp("kv") / "alibi-small-kv.onnx", kv_cache=True).path


@pytest.fixture(scope="module")
def kv_onnx_fp16(tmp_path_factory, shipped):
    return export_onnx(shipped, tmp_path_factory.mktemp("kv16") / "kv16.onnx", kv_cache=True, dtype="float16").path


@pytest.fixture(scope="module")
def session(kv_onnx):
    return GenerationSession(kv_onnx)


@pytest.fixture(scope="module")
def op_session(tmp_path_factory, shipped):
    """The onnx attention form: the standard Attention op with ALiBi folded into extra head dims."""
    path = export_onnx(shipped, tmp_path_factory.mktemp("kv-op") / "kv-op.onnx", kv_cache=True, attention="onnx").path
    return GenerationSession(path)


@pytest.fixture(scope="module")
def fused_session(tmp_path_factory, shipped):
    """The onnx form with ONNX Runtime's fused SkipLayerNormalization and BiasGelu (--ort-fusions)."""
    path = export_onnx(shipped, tmp_path_factory.mktemp("kv-fused") / "kv-fused.onnx", kv_cache=True,
                       attention="onnx", ort_fusions=True).path
    return GenerationSession(path)


def _incremental(session, ids, pieces):
    return session.step_pieces(ids, pieces)[0]


def _torch_logits(model, ids, attention_mask=None):
    with torch.inference_mode():
        mask = None if attention_mask is None else torch.from_numpy(attention_mask)
        return model(torch.from_numpy(ids), attention_mask=mask).float().numpy()


# 1000 tokens take the function's whole-score path with past 0; the next 1000 (past 1000) its Loop over
# query chunks; 48 single-token steps then reach 2048 = 8x the training length.
PIECES = [1000, 1000] + [1] * 48


def test_incremental_decoding_fp32_matches_full_forward_at_8x(shipped, session, rng):
    ids = rng.integers(0, shipped.config.vocab_size, (1, sum(PIECES)))
    incremental = _incremental(session, ids, PIECES)
    full = _incremental(session, ids, [ids.shape[1]])  # one forward, past length 0
    reference = _torch_logits(shipped.model, ids)
    assert np.abs(incremental - full).max() < 1e-4, np.abs(incremental - full).max()  # observed ~1e-5
    assert np.abs(incremental - reference).max() < 1e-4, np.abs(incremental - reference).max()
    assert (incremental.argmax(-1) == reference.argmax(-1)).all()


def test_incremental_decoding_fp16_matches_pytorch_at_8x(shipped, kv_onnx_fp16, rng):
    """fp16 I/O, weights and cache; the ALiBi term (m*(j - i) up to ~1000 here) and softmax stay float32
    inside the attention function. Tolerance: TOLERANCES["float16"] (|logits| ~20, one fp16 ulp there is
    0.0156; a few ulps of rounding through 4 layers), as for the full-sequence fp16 export."""
    fp16 = GenerationSession(kv_onnx_fp16)
    assert fp16.cache_dtype == np.float16
    ids = rng.integers(0, shipped.config.vocab_size, (1, sum(PIECES)))
    incremental = _incremental(fp16, ids, PIECES)
    reference = _torch_logits(shipped.model, ids)
    tol = TOLERANCES["float16"]
    assert np.isfinite(incremental).all()
    np.testing.assert_allclose(incremental, reference, **tol)
    assert (incremental.argmax(-1) == reference.argmax(-1)).mean() > 0.99


@pytest.mark.parametrize("form", ["op_session", "fused_session"])
def test_onnx_attention_form_decoding_matches_pytorch_at_8x(request, shipped, form, rng):
    """The Attention op appends to its own cache (head_dim + 8 wide: the ALiBi columns travel with each
    key) and keeps the causal mask bottom-right aligned. fp32; the folded term m*j (up to ~1000 here) is
    summed into the scores, an ulp of ~1e-4 there: hence 1e-3 (the default fp32 tolerance), not 1e-4."""
    op_session = request.getfixturevalue(form)
    proto = onnx.load(op_session.path, load_external_data=False)
    attention = [n for n in proto.graph.node if n.op_type == "Attention"]
    assert len(attention) == shipped.config.n_layer
    for node in attention:
        assert len(node.input) == 6 and node.input[3] == ""  # past key/value, and no L x L mask at all
        assert {a.name: a.i for a in node.attribute if a.name == "is_causal"} == {"is_causal": 1}
    assert op_session.cache_width == shipped.config.head_dim + 8
    ids = rng.integers(0, shipped.config.vocab_size, (1, sum(PIECES)))
    incremental = _incremental(op_session, ids, PIECES)
    full = _incremental(op_session, ids, [ids.shape[1]])
    reference = _torch_logits(shipped.model, ids)
    assert np.abs(incremental - full).max() < 1e-3, np.abs(incremental - full).max()
    assert np.abs(incremental - reference).max() < 1e-3, np.abs(incremental - reference).max()
    assert (incremental.argmax(-1) == reference.argmax(-1)).all()


def test_ort_fusions_replace_the_layer_norm_tails(shipped, fused_session):
    """Every LayerNorm after a residual Add becomes one SkipLayerNormalization that also adds the
    projection bias and keeps the residual sum; every bias + GELU one BiasGelu. Only the first block's
    LayerNorm (no residual before it) stays, and no elementwise Add is left in the blocks."""
    graph = onnx.load(fused_session.path, load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    n_layer = shipped.config.n_layer
    assert ops.count("SkipLayerNormalization") == 2 * n_layer and ops.count("LayerNormalization") == 1
    assert ops.count("BiasGelu") == n_layer and ops.count("Gelu") == 0
    assert ops.count("Attention") == n_layer and ops.count("Add") <= 1  # the mask's past + sequence only
    assert read_metadata(fused_session.path).ort_fusions is True


def test_ort_fusions_need_the_onnx_form(shipped, tmp_path):
    with pytest.raises(ExportError, match="applies to the onnx attention form"):
        export_onnx(shipped, tmp_path / "f.onnx", kv_cache=True, ort_fusions=True)
    assert not (tmp_path / "f.onnx").exists()


def test_onnx_attention_form_has_no_rotary_cache(tiny_tokenizer, tmp_path):
    from alibi_export import load
    from tests.conftest import make_tiny

    ckpt = load(make_tiny(tmp_path, tiny_tokenizer, position="rotary"))
    with pytest.raises(ExportError, match="no KV cache for rotary"):
        export_onnx(ckpt, tmp_path / "r.onnx", kv_cache=True, attention="onnx")
    assert not (tmp_path / "r.onnx").exists()


def test_fp16_onnx_attention_form_is_refused_on_cpu(shipped, tmp_path):
    path = export_onnx(shipped, tmp_path / "op16.onnx", kv_cache=True, attention="onnx", dtype="float16").path
    with pytest.raises(AlibiExportError, match="CUDA or TensorRT only"):
        GenerationSession(path)


@pytest.mark.parametrize("form", ["session", "op_session", "fused_session"])
def test_left_padded_batch_matches_each_prompt_alone(request, shipped, form, rng):
    session = request.getfixturevalue(form)
    rows = [rng.integers(0, shipped.config.vocab_size, n).tolist() for n in (5, 40, 23)]
    from alibi_export.runtime.generate import _left_pad

    ids, mask = _left_pad(rows)
    batched, _ = session.step(ids, mask, session.new_cache(len(rows)))
    assert np.isfinite(batched).all()  # rows that are all padding stay finite (a finite mask value)
    torch_batched = _torch_logits(shipped.model, ids, mask)
    for i, row in enumerate(rows):
        alone, _ = session.step(np.array([row]), np.ones((1, len(row)), np.int64), session.new_cache(1))
        real = batched[i, ids.shape[1] - len(row):]
        assert np.abs(real - alone[0]).max() < 1e-4
        assert np.abs(torch_batched[i, ids.shape[1] - len(row):] - alone[0]).max() < 1e-4
    together = session.generate_ids(rows, 12, stop_tokens=[])
    for i, row in enumerate(rows):
        assert together.token_ids[i] == session.generate_ids([row], 12, stop_tokens=[]).token_ids[0]


# (5, 40, 23): the attention function's whole-score path; (700, 1100): its Loop over query chunks (1100² > 1024²).
@pytest.mark.parametrize("lengths", [(5, 40, 23), (700, 1100)], ids=["whole", "loop"])
@pytest.mark.parametrize("form", ["session", "op_session", "fused_session"])
def test_right_padded_batch_with_a_hole_matches_each_prompt_alone(request, shipped, form, lengths, rng):
    """onnxruntime-genai's batches: each prompt padded on the right, its generated tokens after the padding,
    so the mask has a hole. ALiBi counts positions over real tokens (alibi.token_positions): the hole is
    invisible, in the prefill and in the steps after it."""
    session = request.getfixturevalue(form)
    # fp32; the onnx form sums the folded m*j (j up to ~1100 here) into the scores: 1e-3 there, as in the 8x test
    tol = 1e-4 if form == "session" else 1e-3
    vocab, width, new = shipped.config.vocab_size, max(lengths), 6
    rows = [rng.integers(0, vocab, n).tolist() for n in lengths]
    steps = rng.integers(0, vocab, (len(rows), new))  # the same continuation fed to the batch and to each row
    ids, mask = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width + new), np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    mask[:, width:] = 1
    prefill, cache = session.step(ids, mask[:, :width], session.new_cache(len(rows)))
    after, _ = session.step(steps, mask, cache)  # six tokens at once after the hole, through the cache
    full_ids = np.concatenate([ids, steps], 1)
    torch_full = _torch_logits(shipped.model, full_ids, mask)
    all_ones, _ = session.step(full_ids, np.ones_like(mask), session.new_cache(len(rows)))
    for i, row in enumerate(rows):
        alone = _torch_logits(shipped.model, np.array([row + steps[i].tolist()]))[0]
        assert np.abs(prefill[i, len(row) - 1] - alone[len(row) - 1]).max() < tol
        assert np.abs(after[i] - alone[len(row):]).max() < tol
        assert np.abs(torch_full[i, width:] - alone[len(row):]).max() < 1e-4
        if len(row) < width:  # negative control: attending the padding changes the tokens after it
            assert np.abs(all_ones[i, width:] - alone[len(row):]).max() > 1e-2


def test_right_padding_needs_positions_over_real_tokens(shipped, monkeypatch, rng):
    """Negative control of the test above: with positions that count the padding (j - i on raw indices, the
    form before token_positions), the tokens after a hole get other logits."""
    from alibi_export.alibi import alibi_bias

    rows, steps = [rng.integers(0, 512, n).tolist() for n in (5, 40)], rng.integers(0, 512, (2, 6))
    ids = np.zeros((2, 40 + 6), np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], ids[i, 40:], mask[i, :len(row)], mask[i, 40:] = row, steps[i], 1, 1
    alone = _torch_logits(shipped.model, np.array([rows[0] + steps[0].tolist()]))[0, 5:]
    assert np.abs(_torch_logits(shipped.model, ids, mask)[0, 40:] - alone).max() < 1e-4
    raw = shipped.model.pos
    monkeypatch.setattr(raw, "bias", lambda q, k, past, key_mask=None: alibi_bias(raw.head_slopes(), q, k, past_len=past))
    assert np.abs(_torch_logits(shipped.model, ids, mask)[0, 40:] - alone).max() > 1e-2


def _torch_greedy(model, prompt: list[int], n: int) -> list[int]:
    cfg = model.config
    empty = [(torch.zeros(1, cfg.n_head, 0, cfg.head_dim),) * 2 for _ in range(cfg.n_layer)]
    out = []
    with torch.inference_mode():
        logits, cache = model(torch.tensor([prompt]), past_key_values=empty)
        for _ in range(n):
            out.append(int(logits[0, -1].argmax()))
            logits, cache = model(torch.tensor([[out[-1]]]), past_key_values=cache)
    return out


@pytest.mark.parametrize("form", ["session", "op_session"])
def test_greedy_generation_matches_pytorch(request, shipped, form, rng):
    session = request.getfixturevalue(form)
    text = EXCERPT.read_text()
    start = int(rng.integers(0, len(text) - 2000))
    prompts = [session.tokenizer.encode(text[start:start + 1500]).ids,  # real text
               rng.integers(0, shipped.config.vocab_size, 50).tolist()]  # random ids
    result = session.generate_ids(prompts, 32, stop_tokens=[])
    for prompt, got in zip(prompts, result.token_ids):
        assert got == _torch_greedy(shipped.model, prompt, 32)
    assert result.texts[0] == session.tokenizer.decode(result.token_ids[0], skip_special_tokens=True)
    assert result.steps == 31 and result.tokens_per_s > 0


def test_sampling_is_reproducible_with_a_seed(session):
    options = dict(greedy=False, temperature=0.9, top_k=50, top_p=0.95, stop_tokens=[])
    prompts = ["The old house", "She said that"]
    first = session.generate(prompts, 16, seed=7, **options)
    assert session.generate(prompts, 16, seed=7, **options).token_ids == first.token_ids
    others = [session.generate(prompts, 16, seed=s, **options).token_ids for s in (8, 9)]
    assert any(o != first.token_ids for o in others)
    greedy = session.generate(prompts, 16, stop_tokens=[]).token_ids
    assert session.generate(prompts, 16, greedy=False, top_k=1, seed=1, stop_tokens=[]).token_ids == greedy


def test_streaming_and_stop_tokens(session):
    pieces = []
    result = session.generate("It was a dark night", 20, stop_tokens=[], on_token=lambda r, t, s: pieces.append((t, s)))
    assert [t for t, _ in pieces] == result.token_ids[0]
    assert "".join(s for _, s in pieces) == result.texts[0]
    stop = result.token_ids[0][5]
    stopped = session.generate("It was a dark night", 20, stop_tokens=[stop])
    assert stopped.token_ids[0] == result.token_ids[0][:result.token_ids[0].index(stop)]


def test_streamed_text_never_splits_a_character():
    """Byte-level tokens that end inside a UTF-8 character are held back until it completes, and the pieces
    join to the whole text. Control: decoding each token alone gives replacement characters, so the text
    does split characters at token boundaries."""
    from tokenizers import Tokenizer

    from alibi_export.runtime.generate import TokenStream
    from tests.conftest import SHIPPED

    tokenizer = Tokenizer.from_file(str(SHIPPED / "tokenizer.json"))
    text = "Déjà vu — naïve façade, 日本語のテキスト, emoji 🙂🚀 and ½ ∑ ∞."
    ids = tokenizer.encode(text).ids
    pieces = []
    stream = TokenStream(tokenizer, 0, lambda row, token, piece: pieces.append(piece))
    for token in ids:
        stream.push(token, set())
    assert "".join(pieces) == tokenizer.decode(ids) == stream.text()
    assert not any("\ufffd" in p for p in pieces)
    assert sum("\ufffd" in tokenizer.decode([t]) for t in ids) > 0  # control


def test_export_graph_and_metadata(shipped, kv_onnx):
    model = onnx.load(kv_onnx)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["alibi_export.kv_cache"] == "true"
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    n, h, d = shipped.config.n_layer, shipped.config.n_head, shipped.config.head_dim
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "past_sequence + sequence"]
    assert dims["past_key_values.0.key"] == ["batch", h, "past_sequence", d]
    assert len(dims) == 2 + 2 * n
    assert [o.name for o in model.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    assert not any(node.op_type == MASKED_OP_TYPE for node in model.graph.node)  # decomposed: inlined


def test_plugin_form_keeps_the_masked_node(shipped, session, tmp_path, rng):
    path = export_onnx(shipped, tmp_path / "kv-plugin.onnx", kv_cache=True, attention="plugin").path
    model = onnx.load(path)
    assert sum(node.op_type == MASKED_OP_TYPE for node in model.graph.node) == shipped.config.n_layer
    assert [f.name for f in model.functions] == [MASKED_OP_TYPE]
    rows = [rng.integers(0, shipped.config.vocab_size, n).tolist() for n in (9, 3)]
    assert GenerationSession(path).generate_ids(rows, 6).token_ids == session.generate_ids(rows, 6).token_ids


def test_kv_cache_export_needs_dynamic_length(shipped, tmp_path):
    with pytest.raises(ExportError, match="dynamic length"):
        export_onnx(shipped, tmp_path / "m.onnx", kv_cache=True, dynamic_len=False)


@pytest.mark.parametrize("prompts", ["", ["fine", ""], []])
def test_empty_prompt(session, prompts):
    with pytest.raises(AlibiExportError, match="prompt"):
        session.generate(prompts, 4)


@pytest.mark.parametrize("bad", [[[1, 2, 4096]], [[-1]], [[]]])
def test_token_ids_outside_the_vocabulary(session, bad):
    with pytest.raises(AlibiExportError, match="vocabulary|empty"):
        session.generate_ids(bad, 4)


def test_model_without_kv_inputs(shipped_onnx):
    with pytest.raises(AlibiExportError, match="no KV-cache inputs"):
        GenerationSession(shipped_onnx)


def test_unknown_provider(kv_onnx):
    with pytest.raises(AlibiExportError, match="unknown provider"):
        GenerationSession(kv_onnx, provider="tpu")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "alibi_export", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_cli_generate_streams_and_reports_speed(kv_onnx):
    proc = _cli("generate", kv_onnx, "--prompt", "The king said", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The king said") and "tokens/s" in proc.stderr


# The command's one-line errors (empty prompt, provider, sampling parameters): tests/test_bad_input.py.


def test_cli_generate_refuses_a_model_without_kv_inputs(shipped_onnx):
    proc = _cli("generate", shipped_onnx, "--prompt", "hi")
    assert proc.returncode == 1 and proc.stderr.startswith("Error") and "no KV-cache inputs" in proc.stderr


def test_cli_export_with_kv_cache_validates(tiny_dir, tmp_path, seed):
    out = tmp_path / "tiny-kv.onnx"
    proc = _cli("onnx", tiny_dir, "--dynamic-len", "--kv-cache", "-o", out, "--lengths", "40,100", "--seed", seed)
    assert proc.returncode == 0, proc.stderr
    assert "KV-cache parity" in proc.stdout and "parity PASS" in proc.stdout
    proc = _cli("onnx", tiny_dir, "--fixed-len", "--kv-cache", "-o", tmp_path / "f.onnx")
    assert proc.returncode == 1 and "dynamic length" in proc.stderr
