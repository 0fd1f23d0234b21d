"""--logits-to-keep: a KV-cache file whose prefill computes the last positions' logits only.

Each claim is checked against the same model exported without the input (every position's logits), and the
control is a variant the test builds from the same file that keeps the FIRST N positions instead of the last.
"""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from alibi_export import load
from alibi_export.artifacts import read_metadata
from alibi_export.errors import ExportError
from alibi_export.export.onnx import export_onnx
from alibi_export.runtime.generate import GenerationSession
from alibi_export.runtime.onnxruntime import create_session
from tests.conftest import make_tiny
from tests.test_cli import assert_one_line_error, run_cli

# float32: the kept positions' head product is the same dot products, but ONNX Runtime may block a 1-row product
# differently from an L-row one: ~1e-7 relative; int8 (MatMulNBits, int8 activations per block of a row): the
# same quantized values, a different kernel tiling: still float32 sums.
REL = {"float32": 1e-5, "int8": 1e-5}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer):
    return load(make_tiny(tmp_path_factory.mktemp("lk-tiny"), tiny_tokenizer))


@pytest.fixture(scope="module")
def untied(tmp_path_factory, tiny_tokenizer):
    return load(make_tiny(tmp_path_factory.mktemp("lk-untied"), tiny_tokenizer, tie_embeddings=False))


FORMS = {  # name -> export options beside kv_cache
    "decomposed": {},
    "onnx-fused": dict(attention="onnx", ort_fusions=True),
    "static": dict(static_cache=64),
    "int8": dict(quantize="int8"),
}


@pytest.fixture(scope="module")
def tied_pair(tiny, tmp_path_factory):
    return _pair(tiny, tmp_path_factory.mktemp("lk-pair"))


def _pair(ckpt, root, **options):
    every = export_onnx(ckpt, root / "every.onnx", kv_cache=True, **options).path
    kept = export_onnx(ckpt, root / "kept.onnx", kv_cache=True, logits_to_keep=True, **options).path
    return every, kept


def _feeds(session, ids, keep=None):
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((len(ids), i.shape[1], 0, i.shape[3]), np.float32)
    if keep is not None:
        feeds["logits_to_keep"] = np.array(keep, dtype=np.int64)
    return feeds


def _rel(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _keep_first(path, out):
    """The control: the same file, but its Slice keeps the first N positions (starts 0, ends N)."""
    proto = onnx.load(path)
    node = next(n for n in proto.graph.node if n.name == "logits_to_keep_slice")
    proto.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "first_start"))
    proto.graph.node.insert(list(proto.graph.node).index(node), onnx.helper.make_node(
        "Reshape", ["logits_to_keep", "logits_to_keep_shape"], ["first_end"]))
    node.input[1], node.input[2] = "first_start", "first_end"
    onnx.save(proto, out)
    return out


@pytest.mark.parametrize("untie", [False, True], ids=["tied", "untied"])
def test_kept_positions_are_the_last_ones(tiny, untied, tied_pair, tmp_path, untie, seed):
    ckpt = untied if untie else tiny
    every, kept = _pair(ckpt, tmp_path) if untie else tied_pair
    a, b = create_session(every), create_session(kept)
    ids = np.random.default_rng(seed).integers(0, ckpt.config.vocab_size, (2, 20))
    ref = a.run(["logits"], _feeds(a, ids))[0]  # (2, 20, V)
    for keep, want in ((0, ref), (1, ref[:, -1:]), (3, ref[:, -3:]), (50, ref)):
        got = b.run(["logits"], _feeds(b, ids, keep))[0]
        assert got.shape == want.shape, (keep, got.shape)
        assert _rel(got, want) <= REL["float32"], f"keep {keep} (seed {seed})"
    # the head's product reads the sliced rows: the positions not kept are never computed
    head = next(n for n in onnx.load(kept).graph.node if "logits_to_keep_hidden" in n.input)
    assert head.op_type == "MatMul"
    assert read_metadata(kept).logits_to_keep and not read_metadata(every).logits_to_keep
    # control: keeping the first positions gives the shape asked for but not the last positions' logits
    first = create_session(_keep_first(kept, tmp_path / "first.onnx"))
    got = first.run(["logits"], _feeds(first, ids, 1))[0]
    assert got.shape == (2, 1, ref.shape[-1]) and _rel(got, ref[:, -1:]) > 1e-2


@pytest.mark.parametrize("form", [f if f == "decomposed" else pytest.param(f, marks=pytest.mark.slow)
                                  for f in FORMS])
def test_generation_is_unchanged_in_every_form(tiny, tied_pair, tmp_path, form, seed):
    """GenerationSession feeds 1 to a prefill and 0 to step_pieces (the parity checks' path): the same tokens and
    the same logits as the file without the input."""
    pair = tied_pair if form == "decomposed" else _pair(tiny, tmp_path, **FORMS[form])
    every, kept = (GenerationSession(p) for p in pair)
    assert kept.keeps_logits and not every.keeps_logits
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 300, n).tolist() for n in (17, 5, 30)]
    ids = np.array([p[:5] for p in prompts])
    if form != "static":  # a static file's buffers are sized by generate; step_pieces runs the concatenating forms
        full_every, _ = every.step_pieces(ids, [3, 1, 1])
        full_kept, _ = kept.step_pieces(ids, [3, 1, 1])
        assert full_kept.shape == full_every.shape and _rel(full_kept, full_every) <= REL.get(form, 1e-5)
    a = every.generate_ids(prompts, 12, stop_tokens=[])
    b = kept.generate_ids(prompts, 12, stop_tokens=[])
    assert a.token_ids == b.token_ids, f"{form} (seed {seed})"
    ids = np.array([prompts[2]])
    la, _, _ = every.prefill(ids, np.ones_like(ids), 40)
    lb, _, _ = kept.prefill(ids, np.ones_like(ids), 40)
    assert la.shape[1] == 30 and lb.shape[1] == 1 and _rel(lb[:, -1], la[:, -1]) <= REL.get(form, 1e-5)


def test_refused_without_a_kv_cache_and_for_genai(tiny, tmp_path, tiny_dir):
    with pytest.raises(ExportError, match="--logits-to-keep applies to the KV-cache decoder"):
        export_onnx(tiny, tmp_path / "x.onnx", logits_to_keep=True)
    assert not (tmp_path / "x.onnx").exists()
    proc = run_cli("onnx", str(tiny_dir), "-o", str(tmp_path / "g"), "--kv-cache", "--genai", "--logits-to-keep")
    assert_one_line_error(proc, "feeds no logits_to_keep input")
    assert not (tmp_path / "g").exists()


def test_cli_export_validates_and_says_so(tiny_dir, tmp_path):
    out = tmp_path / "k.onnx"
    proc = run_cli("onnx", str(tiny_dir), "-o", str(out), "--kv-cache", "--logits-to-keep", "--lengths", "1x")
    assert proc.returncode == 0, proc.stderr
    assert "logits_to_keep input" in proc.stdout and "kv-cache parity" in proc.stdout.lower() + proc.stderr.lower()
    assert read_metadata(out).logits_to_keep
    session = create_session(out)
    assert [i.name for i in session.get_inputs()][-1] == "logits_to_keep"
