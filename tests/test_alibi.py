import math

import pytest
import torch

from alibi_export import alibi_bias, alibi_slopes


def expected_slopes(h: int) -> list[float]:
    """The paper's rule written out: 2^(-8i/n) for the largest power of two n <= h, then the odd
    members of the sequence for 2n (2^(-8(2i-1)/2n), i = 1..h-n) interleaved in."""
    n = 2 ** int(math.floor(math.log2(h)))
    base = [2 ** (-8 * i / n) for i in range(1, n + 1)]
    extra = [2 ** (-8 * (2 * i - 1) / (2 * n)) for i in range(1, h - n + 1)]
    return base + extra


@pytest.mark.parametrize("heads", range(1, 65))
def test_slopes_match_formula(heads):
    got = alibi_slopes(heads)
    assert len(got) == heads
    assert got == pytest.approx(expected_slopes(heads), rel=1e-12)
    if heads & (heads - 1) == 0:
        assert got == pytest.approx([2 ** (-8 * h / heads) for h in range(1, heads + 1)], rel=1e-12)


def test_slopes_known_values():
    assert alibi_slopes(8) == pytest.approx([1 / 2 ** i for i in range(1, 9)])
    # 12 heads (BLOOM-560m): the 8-head sequence, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
    assert alibi_slopes(12)[8:] == pytest.approx([2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5])


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_slopes_reject_bad_heads(bad):
    with pytest.raises(ValueError):
        alibi_slopes(bad)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len,k_len,past", [(7, 7, 0), (3, 10, 7), (1, 33, 32), (5, 5, 0)])
def test_bias_matches_direct_loop(q_len, k_len, past, causal):
    heads = 5
    slopes = torch.tensor(alibi_slopes(heads))
    bias = alibi_bias(slopes, q_len, k_len, past_len=past, causal=causal)
    assert bias.shape == (heads, q_len, k_len)
    for h in range(heads):
        for i in range(q_len):
            for j in range(k_len):
                pos_i = past + i
                if causal and j > pos_i:
                    assert bias[h, i, j] == float("-inf")
                else:
                    want = slopes[h] * ((j - pos_i) if causal else -abs(j - pos_i))
                    assert bias[h, i, j].item() == pytest.approx(want.item(), abs=1e-6)


@pytest.mark.parametrize("heads", [1, 3, 4, 6, 8, 12, 16, 71])
@pytest.mark.parametrize("bias_max", [8, 16, 4.5])
def test_mpt_slopes_equal_transformers_builder(heads, bias_max):
    """MPT's own rule, bit for bit in float32. With bias max 8 it is the paper's rule for every head count
    (its odd-then-even reordering of the next power of two's slopes is the paper's interleaving); any
    other bias max gives other slopes."""
    mpt = pytest.importorskip("transformers.models.mpt.modeling_mpt")
    from alibi_export.alibi import mpt_alibi_slopes

    ref = mpt.build_mpt_alibi_tensor(heads, 5, bias_max)  # (H, 1, 5): m_h (j - 4)
    mine = torch.tensor(mpt_alibi_slopes(heads, bias_max))[:, None, None] * torch.arange(-4, 1)
    assert torch.equal(ref.float(), mine)
    if bias_max == 8:
        assert mpt_alibi_slopes(heads, bias_max) == pytest.approx(alibi_slopes(heads), rel=1e-6)
    else:  # negative control: the bias max moves every slope
        assert mpt_alibi_slopes(heads, bias_max) != pytest.approx(alibi_slopes(heads), rel=1e-3)


@pytest.mark.parametrize("heads", [1, 3, 4, 6, 8, 12, 71])
def test_paper_slopes_equal_bloom_and_falcon_builders(heads):
    """BLOOM's and Falcon's slopes are the paper's (within float32 rounding: they take powers in float32);
    Falcon's bias is then bf16(bf16(m) bf16(j)), which alibi_bias_bf16 reproduces exactly."""
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    falcon = pytest.importorskip("transformers.models.falcon.modeling_falcon")
    from alibi_export.alibi import alibi_bias_bf16

    mask = torch.ones(2, 600, dtype=torch.long)
    ref = bloom.build_alibi_tensor(mask, heads, torch.float32).view(2, heads, 600)[0]  # m_h j
    mine = torch.tensor(alibi_slopes(heads))[:, None] * torch.arange(600)
    torch.testing.assert_close(ref, mine, rtol=2e-7 * 4, atol=0)  # a float32 ulp or two of m_h
    ref_falcon = falcon.build_alibi_tensor(mask, heads, torch.float32).view(2, heads, 600)[0]
    assert torch.equal(ref_falcon, alibi_bias_bf16(torch.tensor(alibi_slopes(heads)), torch.arange(600))[:, 0])
    assert not torch.equal(ref_falcon, mine)  # negative control: the float32 bias is not Falcon's
