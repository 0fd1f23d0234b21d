import pytest

from alibi_export.data import encode_text, read_text
from alibi_export.errors import DataError
from alibi_export.perplexity import _windows, evaluate_model, perplexity
from alibi_export.runtime import make_runner
from alibi_export.runtime.pytorch import TorchRunner
from tests.conftest import EXCERPT, SHIPPED


@pytest.fixture(scope="module")
def tokens(shipped):
    return encode_text(shipped.tokenizer, read_text(EXCERPT))[:8 * 1024 + 1]


@pytest.mark.parametrize("stride", [None, 128])
def test_onnxruntime_perplexity_equals_pytorch(shipped, shipped_onnx, tokens, stride):
    lengths = [256, 1024, 2048]  # up to 8x the training length
    ort = perplexity(make_runner(shipped_onnx), tokens, lengths, stride=stride, max_tokens=4096)
    ref = perplexity(TorchRunner(shipped.model), tokens, lengths, stride=stride, max_tokens=4096)
    for a, b in zip(ort, ref):
        assert a.ppl == pytest.approx(b.ppl, rel=1e-3)
        assert a.tokens == b.tokens
    assert 10 < ref[0].ppl < 200  # a trained model on English prose


def test_alibi_extrapolates(shipped, tokens):
    """The paper's claim on the shipped model: at 16x the training length perplexity does not grow."""
    rows = perplexity(TorchRunner(shipped.model), tokens, [256, 4096])
    assert rows[1].ppl <= rows[0].ppl * 1.02


def test_windows_cover_every_token_once():
    scored = []
    for start, first in _windows(1001, 100, 30):
        scored.extend(range(start + 1 + first, start + 101))
    assert scored == list(range(1, len(scored) + 1))
    assert [s for s, _ in _windows(1001, 100, None)] == list(range(0, 901, 100))


def test_text_too_short(shipped, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    with pytest.raises(DataError, match="text too short"):
        evaluate_model(SHIPPED, short, [256])


def test_bad_lengths_and_stride(shipped, tokens):
    runner = TorchRunner(shipped.model)
    with pytest.raises(DataError, match="positive"):
        perplexity(runner, tokens, [0])
    with pytest.raises(DataError, match="stride"):
        perplexity(runner, tokens, [64], stride=65)
