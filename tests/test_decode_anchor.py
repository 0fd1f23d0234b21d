"""The GPU decode anchor of tools/bench_generate_gpu.py (--anchor): the model on a static in-place KV cache gives
the eager model's logits. Checked here on the CPU without the CUDA graph (the capture replays this same step)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from bench_generate_gpu import AnchorStep  # noqa: E402

from alibi_export import AlibiLM, ModelConfig  # noqa: E402

CFG = ModelConfig(vocab_size=97, n_layer=2, n_head=6, d_model=48, d_ff=96, train_len=32, max_positions=32)
B, CTX, LMAX = 2, 11, 20


def _eager_logits(model, ids, past):
    """The reference: attend_eager on the cache concatenated, as AlibiLM.forward does it."""
    saved = [b.attn.attend for b in model.blocks]
    model.set_attention("eager")
    try:
        with torch.no_grad():
            logits, presents = model(ids, past_key_values=past)
    finally:
        for b, fn in zip(model.blocks, saved):
            b.attn.attend = fn
    return logits[:, -1], presents


@pytest.mark.parametrize("variant", ["sliced-sdpa", "sliced-eager", "masked-sdpa", "masked-eager"])
def test_anchor_steps_equal_the_eager_model(variant, torch_rng):
    torch.manual_seed(0)
    model = AlibiLM(CFG).eval()
    shape = (B, CFG.n_head, LMAX, CFG.head_dim)
    buffers = [(torch.randn(shape, generator=torch_rng), torch.randn(shape, generator=torch_rng))
               for _ in range(CFG.n_layer)]
    past = [(k[:, :, :CTX].clone(), v[:, :, :CTX].clone()) for k, v in buffers]
    untouched = buffers[0][0][:, :, CTX + 2:].clone()
    for position in (CTX, CTX + 1):  # two steps: the second reads the column the first wrote
        ids = torch.randint(0, CFG.vocab_size, (B, 1), generator=torch_rng)
        expected, past = _eager_logits(model, ids, past)
        got = AnchorStep(model, buffers, B, position, variant, graph=False)(ids)
        # float32, the same products summed in a different order (SDPA's kernel against matmul + softmax)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()
        # the new column written in place (the last layer's keys: they depend on the first layer's attention)
        assert torch.allclose(buffers[-1][0][:, :, :position + 1], past[-1][0], atol=1e-5)
        # negative control: the same step one position late (a column of random keys read, the bias shifted)
        late = AnchorStep(model, [(k.clone(), v.clone()) for k, v in buffers], B, position + 1, variant, False)(ids)
        assert (late - expected).abs().max() > 1e-3
    assert torch.equal(buffers[0][0][:, :, CTX + 2:], untouched)  # nothing past the written columns moved
