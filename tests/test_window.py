"""The rolling KV window (GenerationSession kv_window, ppl --kv-window): cutting the cache and the mask together
keeps ALiBi's distances exact, so decoding through the cut cache equals a banded forward pass; the form whose
cache holds absolute positions, and an off-by-one window, do not."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from alibi_export import load
from alibi_export.cli import main
from alibi_export.errors import AlibiExportError
from alibi_export.export.onnx import export_onnx
from alibi_export.perplexity import perplexity
from alibi_export.runtime import runner_for
from alibi_export.runtime import window as window_module
from alibi_export.runtime.generate import GenerationSession
from alibi_export.runtime.pytorch import TorchRunner, windowed_logits
from alibi_export.runtime.window import trim_window, window_mask
from tests.conftest import make_tiny

# fp32 logits of the same math through ONNX Runtime and PyTorch (different summation orders): the KV-cache
# parity tests of the tiny model agree to ~1e-5; the controls below move the logits by > 1e-1.
ATOL = 2e-4
N, W = 72, 9  # 8 windows' worth of tokens past the first window; W not a divisor of anything here


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load(tiny_dir).model.eval()


def _ids(rng, n=N, batch=1, vocab=300):
    return rng.integers(0, vocab, (batch, n), dtype=np.int64)


def _banded(model, ids, window):
    with torch.inference_mode():
        return windowed_logits(model, torch.from_numpy(ids), window).float().numpy()


def _decode(path, ids, window, **options):
    """Prefill the first window, then one token per step through the rolling cache."""
    session = GenerationSession(path, kv_window=window, **options)
    return session.step_pieces(ids, [window] + [1] * (ids.shape[1] - window))


def test_rolling_cache_decoding_equals_a_banded_forward(tiny, tiny_kv_export, rng):
    ids = _ids(rng)
    got, cache = _decode(tiny_kv_export.path, ids, W)
    assert cache[0].shape()[2] == W  # the cache never holds more than the window
    np.testing.assert_allclose(got, _banded(tiny, ids, W), atol=ATOL, rtol=0)
    # Negative controls: the window one token wider or narrower, and no window at all, are other numbers.
    for other in (W - 1, W + 1, N):
        assert np.abs(got - _banded(tiny, ids, other)).max() > 100 * ATOL, other


def test_slack_cuts_less_often_and_gives_the_same_logits(tiny_kv_export, rng):
    ids = _ids(rng)
    exact, _ = _decode(tiny_kv_export.path, ids, W)
    lengths = []
    session = GenerationSession(tiny_kv_export.path, kv_window=W, window_slack=5)
    original = session.step

    def step(input_ids, mask, cache):
        lengths.append(mask.shape[1])
        return original(input_ids, mask, cache)

    session.step = step
    got, _ = session.step_pieces(ids, [W] + [1] * (N - W))
    # Same graph and keys; the masked columns change only the softmax's summation length (fp32: ~1e-6 on logits ~20).
    np.testing.assert_allclose(got, exact, atol=2e-5, rtol=0)
    assert max(lengths) == W + 5 and len(set(lengths)) > 2  # held up to the slack, then cut
    # Control: masking the old columns is what keeps it exact; without it the slack columns are attended.
    session.window = lambda cache, mask, n: trim_window(cache, mask, W + 5, incoming=n)
    assert np.abs(session.step_pieces(ids, [W] + [1] * (N - W))[0] - exact).max() > 100 * ATOL


def test_left_padded_rows_see_their_own_last_tokens(tiny_kv_export, rng):
    """A padded batch with a window shorter than its prompts gives each row what it gives alone."""
    from alibi_export.runtime.generate import left_pad

    rows = [list(_ids(rng, 20)[0]), list(_ids(rng, 13)[0])]
    session = GenerationSession(tiny_kv_export.path, kv_window=W)
    together = session.prefill(*left_pad(rows))[0][:, -1]
    alone = [session.prefill(*left_pad([row]))[0][0, -1] for row in rows]
    np.testing.assert_allclose(together, np.stack(alone), atol=ATOL, rtol=0)
    # Control: without the window the rows' last logits are other numbers (the window is what they saw).
    full = GenerationSession(tiny_kv_export.path).prefill(*left_pad(rows))[0][:, -1]
    assert np.abs(full - together).max() > 100 * ATOL


def test_windowed_perplexity_equals_token_by_token_decoding(tiny_dir, tiny_kv_export, rng):
    tokens = _ids(rng, 3 * 40 + 1)[0]
    banded = perplexity(runner_for(tiny_dir, kv_window=W), tokens, [40])[0].ppl
    decoded = perplexity(runner_for(tiny_kv_export.path, kv_window=W), tokens, [40])[0].ppl
    assert banded == pytest.approx(decoded, rel=1e-5)  # fp32 sums of 120 terms; the controls move it >= 1e-3


def test_windowed_perplexity_of_the_shipped_model(shipped):
    """On real text with the trained model: a window covering the evaluation length changes nothing; a short
    window, and the same window one token wider, are measurably other numbers (the controls)."""
    from alibi_export.data import encode_text
    from tests.conftest import EXCERPT

    tokens = encode_text(shipped.tokenizer, EXCERPT.read_text())[: 256 + 1]
    model = shipped.model.eval()

    def ppl(window):
        return perplexity(TorchRunner(model, kv_window=window), tokens, [256])[0].ppl

    full = perplexity(TorchRunner(model), tokens, [256])[0].ppl
    assert ppl(256) == pytest.approx(full, rel=1e-5)
    assert ppl(300) == pytest.approx(full, rel=1e-5)
    short = ppl(8)
    assert short / full > 1.05  # 8 tokens of context cost more than 5% on this text
    assert abs(ppl(9) / short - 1) > 1e-3  # off by one is visible


@pytest.mark.slow  # an onnx-form export: ~30 s on 2 cores
def test_the_onnx_form_is_refused_because_its_keys_hold_absolute_positions(tiny, tiny_dir, tmp_path, rng,
                                                                           monkeypatch):
    path = export_onnx(load(tiny_dir), tmp_path / "op.onnx", kv_cache=True, attention="onnx").path
    with pytest.raises(AlibiExportError, match="onnx attention form"):
        GenerationSession(path, kv_window=W)
    # Why: cut anyway, its new tokens' positions restart while the cached keys keep theirs.
    monkeypatch.setattr(window_module, "check_window_form", lambda *a: None)
    ids = _ids(rng, 30)
    cut, _ = _decode(path, ids, W)
    np.testing.assert_allclose(cut[:, :W], _banded(tiny, ids, W)[:, :W], atol=ATOL, rtol=0)  # before any cut
    assert np.abs(cut[:, W:] - _banded(tiny, ids, W)[:, W:]).max() > 100 * ATOL


def test_refusals(tiny_tokenizer, tmp_path, tiny_kv_export):
    sinusoidal = load(make_tiny(tmp_path / "sin", tiny_tokenizer, position="sinusoidal")).model
    with pytest.raises(AlibiExportError, match="ALiBi only"):
        windowed_logits(sinusoidal, torch.zeros(1, 4, dtype=torch.int64), 2)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(AlibiExportError, match="positive number"):
            GenerationSession(tiny_kv_export.path, kv_window=bad)
    with pytest.raises(AlibiExportError, match="do not fit"):
        window_mask(np.ones((1, 4), dtype=np.int64), 2, incoming=3)


def test_cli(tiny_dir, tiny_kv_export, tmp_path):
    runner = CliRunner()
    text = tmp_path / "t.txt"
    text.write_text("The king said that the queen would come. " * 40)
    out = runner.invoke(main, ["ppl", str(tiny_dir), "--text", str(text), "--lengths", "64", "--kv-window", "16"])
    assert out.exit_code == 0, out.output
    full = runner.invoke(main, ["ppl", str(tiny_dir), "--text", str(text), "--lengths", "64"])
    assert out.output.splitlines()[-1] != full.output.splitlines()[-1]  # the window changed the score
    plain = export_onnx(load(tiny_dir), tmp_path / "plain.onnx").path
    refused = runner.invoke(main, ["ppl", str(plain), "--text", str(text), "--lengths", "64", "--kv-window", "16"])
    assert refused.exit_code != 0 and "has no KV cache" in refused.output and "Traceback" not in refused.output
    gen = runner.invoke(main, ["generate", str(tiny_kv_export.path), "-p", "The king", "-n", "20", "--kv-window", "4"])
    assert gen.exit_code == 0, gen.output
    bad = runner.invoke(main, ["generate", str(tiny_kv_export.path), "-p", "The king", "--kv-window", "0"])
    assert bad.exit_code != 0 and "kv-window" in bad.output


def test_the_cut_on_the_device_equals_the_cut_through_the_host(tiny_kv_export, rng):
    """GenerationSession and the engine cut the window with DeviceOps.cut (a Slice graph on the session's provider,
    so on CUDA the cache stays on the GPU): the same columns as the host path's copy, bit for bit."""
    from alibi_export.runtime.device_ops import DeviceOps

    session = GenerationSession(tiny_kv_export.path)
    ids = _ids(rng, 30)
    _, cache, mask = session.prefill(ids, np.ones_like(ids))
    ops = DeviceOps(session, session.n_past)
    host, host_mask = trim_window(cache, mask, 12, incoming=1)
    device, device_mask = trim_window(cache, mask, 12, incoming=1, cut=ops.cut)
    assert np.array_equal(host_mask, device_mask) and host_mask.shape == (1, 11)
    for h, d in zip(host, device):
        assert d.shape() == h.shape() == [1, h.shape()[1], 11, h.shape()[3]]
        assert np.array_equal(d.numpy(), h.numpy())
    # control: a cut one column later keeps other columns, and is told apart
    late = ops.cut(list(cache), 30 - 11 + 1)
    assert late[0].shape()[2] == 10 and not np.array_equal(late[0].numpy(), host[0].numpy()[:, :, :10])
