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
