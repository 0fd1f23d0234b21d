"""The static KV cache (`--kv-cache --static-cache LMAX`): equal to the concatenating form, updated in place."""
import numpy as np
import pytest

from alibi_export.artifacts import read_metadata
from alibi_export.checkpoint import load
from alibi_export.errors import AlibiExportError, ExportError
from alibi_export.export.onnx import export_onnx
from alibi_export.runtime.generate import GenerationSession, left_pad

LMAX = 64
LENGTHS = (3, 17, 9)  # a batch of different prompt lengths: left padding in the cache, masked by the bias
NEW = 8


@pytest.fixture(scope="module")
def static_export(tmp_path_factory, tiny_dir):
    return export_onnx(load(tiny_dir), tmp_path_factory.mktemp("static") / "tiny-static.onnx", kv_cache=True,
                       static_cache=LMAX)


@pytest.fixture(scope="module")
def sessions(tiny_kv_export, static_export):
    return GenerationSession(tiny_kv_export.path), GenerationSession(static_export.path)


def _greedy_logits(session, rows, new=NEW, shift=0):
    """Prefill the left-padded rows, then ``new`` greedy steps: (B, new + 1, V) logits at each row's last
    position. ``shift`` > 0 breaks the static form on purpose: after the prefill the mask gets that many extra
    leading 1s, so the op writes every new token ``shift`` columns late and attends an unwritten zero key."""
    ids, mask = left_pad(rows)
    cache = session.new_cache(len(rows), mask.shape[1] + shift + new)
    logits, cache = session.step(ids, mask, cache)
    mask = np.concatenate([np.ones((len(rows), shift), np.int64), mask], 1)
    out = [logits[:, -1]]
    for _ in range(new):
        mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], 1)
        logits, cache = session.step(out[-1].argmax(-1)[:, None], mask, cache)
        out.append(logits[:, -1])
    return np.stack(out, 1)


def _close(a, b) -> bool:
    # float32: the two forms sum the same products in different orders (GroupQueryAttention's kernel against
    # MatMul/Softmax), a few ulps per score; 1e-4 of the logits' scale is ~1000 ulps, far below the
    # 1e-2-scale changes a misplaced key makes (the controls below).
    return float(np.abs(a - b).max()) <= 1e-4 * max(1.0, float(np.abs(a).max()))


def test_static_form_equals_concat_form_batched(sessions, tiny_dir, rng):
    concat, static = sessions
    vocab = concat.config.vocab_size
    rows = [rng.integers(0, vocab, n).tolist() for n in LENGTHS]
    expected, got = _greedy_logits(concat, rows), _greedy_logits(static, rows)
    assert np.array_equal(expected.argmax(-1), got.argmax(-1))
    assert _close(expected, got)
    together = static.generate_ids(rows, NEW, stop_tokens=[])
    assert together.token_ids == concat.generate_ids(rows, NEW, stop_tokens=[]).token_ids
    # negative control: the same file with every write one column late fails the same comparison
    assert not _close(expected, _greedy_logits(static, rows, shift=1))


def test_cache_is_updated_in_place(sessions, rng):
    _, static = sessions
    ids = rng.integers(0, static.config.vocab_size, (2, 5))
    cache = static.new_cache(2, 8)
    before = [c.data_ptr() for c in cache]
    _, after = static.step(ids, np.ones_like(ids), cache)
    assert [c.data_ptr() for c in after] == before  # the outputs are the buffers the step was given
    assert np.abs(cache[0].numpy()[:, :, :5]).max() > 0 and not cache[0].numpy()[:, :, 5:].any()  # written there

    # negative control: presents bound to fresh memory leave the buffers stale; the check refuses them and
    # a session that kept feeding the stale buffers would attend zeros
    binding = static.session.io_binding()
    binding.bind_cpu_input("input_ids", ids)
    binding.bind_cpu_input("attention_mask", np.ones_like(ids))
    fresh = static.new_cache(2, 8)
    for name, value in zip(static._past_names, fresh):
        binding.bind_ortvalue_input(name, value)
    binding.bind_output("logits", "cpu")
    for name in static._present_names:
        binding.bind_output(name, "cpu")
    static.session.run_with_iobinding(binding)
    assert not fresh[0].numpy().any()
    with pytest.raises(AlibiExportError, match="in place"):
        static.static.updated(fresh, binding.get_outputs()[1:])


def test_metadata_records_the_form(tiny_kv_export, static_export):
    assert read_metadata(static_export.path).static_cache == LMAX
    assert read_metadata(tiny_kv_export.path).static_cache == 0  # the concatenating form


def test_prompt_and_generation_longer_than_lmax_is_refused(sessions):
    _, static = sessions
    with pytest.raises(AlibiExportError, match=f"exceed this file's static cache of {LMAX}"):
        static.generate_ids([[1] * 60], 5)
    assert static.generate_ids([[1] * 59], 5, stop_tokens=[]).new_tokens == 5  # 64: fits
    with pytest.raises(AlibiExportError, match="buffers hold 4 tokens; this step needs 5"):
        static.step(np.ones((1, 5), np.int64), np.ones((1, 5), np.int64), static.new_cache(1, 4))
    with pytest.raises(AlibiExportError, match="one row at a time"):  # GroupQueryAttention's limit
        static.step(np.ones((2, 3), np.int64), np.ones((2, 5), np.int64), static.new_cache(2, 8))


@pytest.mark.parametrize("options, message", [
    (dict(), "add --kv-cache"),
    (dict(kv_cache=True, dtype="float16"), "float32 only"),
    (dict(kv_cache=True, attention="plugin"), "drop --attention plugin"),
    (dict(kv_cache=True, static_cache_value=0), "positive number"),
])
def test_export_refusals(tiny_dir, tmp_path, options, message):
    length = options.pop("static_cache_value", LMAX)
    with pytest.raises(ExportError, match=message):
        export_onnx(load(tiny_dir), tmp_path / "x.onnx", static_cache=length, **options)
    assert not (tmp_path / "x.onnx").exists()


# The Hugging Face families' variants the block-level op must carry: Falcon's one key head (kv_num_heads 1) and
# bf16 bias added before the scale; MPT's clipped projections, own softmax scale and slope rule.
VARIANTS = {
    "falcon": dict(n_kv_head=1, parallel_attn=True, alibi_scaled=True, alibi_bf16=True),
    "mpt": dict(clip_qkv=0.5, softmax_scale=0.2, alibi_rule="mpt", alibi_bias_max=16.0),
}


@pytest.mark.slow  # two exports per variant
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_equal_concat_form(tmp_path, tiny_tokenizer, variant, rng):
    from tests.conftest import make_tiny

    ckpt = load(make_tiny(tmp_path / "model", tiny_tokenizer, **VARIANTS[variant]))
    concat = GenerationSession(export_onnx(ckpt, tmp_path / "concat.onnx", kv_cache=True).path)
    static = GenerationSession(export_onnx(ckpt, tmp_path / "static.onnx", kv_cache=True, static_cache=LMAX).path)
    rows = [rng.integers(0, ckpt.config.vocab_size, n).tolist() for n in LENGTHS]
    expected = _greedy_logits(concat, rows)
    assert _close(expected, _greedy_logits(static, rows))
    assert not _close(expected, _greedy_logits(static, rows, shift=1))  # negative control, as above


def test_the_server_serves_a_static_export_from_fixed_slots_but_refuses_a_window(sessions):
    """The engine serves a static export from fixed slots (tests/test_serve.py checks its results); a rolling
    window, which cuts cache columns, is refused for it in one line. Control: the concatenating export of the
    same model takes the window and the padded cache."""
    from alibi_export.errors import AlibiExportError
    from alibi_export.serve.engine import Engine, EngineConfig

    concat, static = sessions
    assert type(Engine(static).cache).__name__ == "SlotCache"
    with pytest.raises(AlibiExportError, match="--kv-window does not apply") as e:
        Engine(static, EngineConfig(kv_window=8))
    assert "\n" not in str(e.value)
    assert type(Engine(concat, EngineConfig(kv_window=8)).cache).__name__ == "BatchCache"


def test_a_rolling_window_is_refused_on_a_static_export(static_export, tiny_kv_export):
    """A rolling window cuts cache columns; a static buffer keeps them in place: refused in one line.
    Control: the concatenating export of the same model takes the window."""
    from alibi_export.errors import AlibiExportError

    with pytest.raises(AlibiExportError, match="--kv-window does not apply") as e:
        GenerationSession(static_export.path, kv_window=8)
    assert "\n" not in str(e.value)
    assert GenerationSession(tiny_kv_export.path, kv_window=8).kv_window == 8


def test_the_default_static_form_is_refused_on_cuda(static_export, tiny_kv_export):
    """On an H200 with onnxruntime-gpu 1.31.1 the default static form's first prefill stopped inside ONNX Runtime
    (2026-12-05): refused in one line before any session is made, so this holds on a machine without a GPU.
    Control: the concatenating export of the same model gets past the check (here to the missing-GPU error, on a
    GPU to a session)."""
    from alibi_export.errors import AlibiExportError

    with pytest.raises(AlibiExportError, match="does not run on ONNX Runtime's CUDA provider") as e:
        GenerationSession(static_export.path, provider="cuda")
    assert "\n" not in str(e.value) and "--attention onnx" in str(e.value)
    try:
        GenerationSession(tiny_kv_export.path, provider="cuda")
    except Exception as other:  # noqa: BLE001 - any error but the refusal: no GPU here
        assert "does not run on ONNX Runtime's CUDA provider" not in str(other)


@pytest.fixture(scope="module")
def folded_exports(tmp_path_factory, tiny_dir):
    """The folded static form (--attention onnx: ALiBi in extra head columns, no attention_bias, the form ONNX
    Runtime CUDA runs) in float32 (run here) and float16 (CUDA only: checked for its structure)."""
    d = tmp_path_factory.mktemp("folded")
    return {dt: export_onnx(load(tiny_dir), d / f"folded-{dt}.onnx", kv_cache=True, attention="onnx", dtype=dt,
                            static_cache=LMAX).path for dt in ("float32", "float16")}


@pytest.mark.slow  # two exports (~30-60 s on the 2-core machine)
def test_folded_form_equals_concat_form(sessions, folded_exports, rng):
    import onnx

    concat, _ = sessions
    rows = [rng.integers(0, concat.config.vocab_size, n).tolist() for n in LENGTHS]
    expected = _greedy_logits(concat, rows)
    folded = GenerationSession(folded_exports["float32"])
    assert folded.cache_width == concat.cache_width + 8  # the ALiBi columns travel in the cache
    assert _close(expected, _greedy_logits(folded, rows))
    assert not _close(expected, _greedy_logits(folded, rows, shift=1))  # negative control: writes one column late
    for path in folded_exports.values():  # no attention_bias: ONNX Runtime's CUDA GroupQueryAttention refuses one
        nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "GroupQueryAttention"]
        assert len(nodes) == 2 and all(len(n.input) == 7 for n in nodes)
    # The server serves it from fixed slots, filling the masked columns a step reads with the model's padding
    # entry, whose key carries the padding mark (PAD_SCORE against every query; tests/test_serve.py checks the
    # answers). Control: the default static form masks by its bias and needs no fill.
    from alibi_export.export.attention_op import _PAD, POS_BASE
    from alibi_export.serve.engine import Engine

    cache = Engine(folded).cache
    assert type(cache).__name__ == "SlotCache" and len(cache.holes) == len(cache.buffers)
    D = folded.config.head_dim
    key = cache.holes[0]  # (1, kv heads, width): the first layer's padding key
    assert np.allclose(key[..., D + _PAD], POS_BASE)
    assert Engine(sessions[1]).cache.holes is None
