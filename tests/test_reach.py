"""The provable reach of each ALiBi head (alibi_export.reach): beyond it the keys of every row weigh less than
2^-gap together, for any input; a window of that many tokens (ppl --kv-window exact) changes nothing a float32
evaluation can see, and a bound that forgets the q.k term is broken on the same model."""
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from alibi_export import load
from alibi_export import reach as reach_module
from alibi_export.checkpoint import save
from alibi_export.cli import main
from alibi_export.errors import AlibiExportError
from alibi_export.model import AlibiLM, ModelConfig
from alibi_export.reach import provable_reach

GAP = 32.0
L = 640  # tokens per row: several times the short heads' reach, so the tails tested are long


def _content_driven(seed: int) -> AlibiLM:
    """A tiny ALiBi model whose q.k scores are large (the q and k projections scaled up), so that the bias alone
    would not bound its attention: the case the q.k term of the bound exists for. MPT's slope rule with a small
    alibi_bias_max gives slopes 2^-0.5 .. 2^-2, so the reach is a few hundred tokens, below L."""
    cfg = ModelConfig(vocab_size=300, n_layer=2, n_head=4, d_model=48, d_ff=96, train_len=32, max_positions=32,
                      alibi_rule="mpt", alibi_bias_max=2.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AlibiLM(cfg).eval()
    with torch.no_grad():
        model.wte.weight.mul_(20)
        for block in model.blocks:
            block.attn.qkv.weight[:2 * cfg.d_model].mul_(8)  # q and k rows
            block.ln_1.weight.uniform_(0.5, 1.5)  # a gamma that is not all ones, so G = max|gamma| matters
    return model


def _tail_mass(model: AlibiLM, ids: torch.Tensor) -> list[np.ndarray]:
    """Per layer, (heads, rows, distances) weights of every query's keys by distance, from a float64 forward
    whose attention this test computes itself (scores, ALiBi bias, causal softmax)."""
    recorded = []

    def attend(q, k, v, pos, past_len, key_mask=None):
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + pos.bias(q.shape[2], k.shape[2], past_len).to(q)
        p = torch.softmax(scores, dim=-1)
        recorded.append(p[0].numpy())  # (H, L, L)
        return p @ v

    model = model.double()
    for block in model.blocks:
        block.attn.attend = attend
    with torch.no_grad():
        model(ids)
    return recorded


def _worst_tail(p: np.ndarray, distances) -> np.ndarray:
    """Per head, the largest total weight any row puts on keys at distance >= that head's distance."""
    H, n, _ = p.shape
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    out = np.zeros(H)
    for h, d in enumerate(distances):
        far = (i - j) >= d  # causal: j <= i - d
        out[h] = (p[h] * far).sum(axis=1).max()
    return out


def test_no_row_puts_more_than_2_to_minus_gap_beyond_the_reach_and_a_bound_without_qk_fails(seed, monkeypatch):
    model = _content_driven(seed)
    reach = provable_reach(model, context=L, gap_bits=GAP)
    assert reach.window < L, f"the reach {reach.window} leaves no tail in {L} tokens: the test would test nothing"
    ids = torch.randint(0, 300, (1, L), generator=torch.Generator().manual_seed(seed))
    probs = _tail_mass(model, ids)
    for layer, p in enumerate(probs):
        worst = _worst_tail(p, reach.distances[layer])
        assert (worst < 2.0 ** -GAP).all(), f"layer {layer}: tail mass {worst} beyond {reach.distances[layer]}"

    # Control: the same bound without its q.k term (the bias alone) claims shorter reaches, and the model's
    # content-driven heads put real weight beyond them.
    monkeypatch.setattr(reach_module, "_score_bounds", lambda block, cfg: [0.0] * cfg.n_head)
    naive = provable_reach(model, context=L, gap_bits=GAP)
    worst = max(_worst_tail(p, naive.distances[layer]).max() for layer, p in enumerate(probs))
    # (over 20 seeds the worst tail beyond the bias-only reach is 12x to 100x the 2^-32 it claims)
    assert worst > 2.0 ** -GAP, f"the bias-only bound held here too (worst tail {worst}): no control"


def test_heads_without_a_usable_slope_need_the_full_context(seed):
    model = _content_driven(seed)
    model.pos.slopes[-1] = 0.0  # a head with no bias: nothing beyond any distance is negligible
    reach = provable_reach(model, context=4096)
    assert reach.full_heads == [(0, 3), (1, 3)] and reach.window == 4096
    assert "2 of 8 heads need the full context" in reach.report()


@pytest.fixture(scope="module")
def content_ckpt(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("reach")
    save(_content_driven(0), tiny_tokenizer, path)
    return path


def _ppl(runner, args) -> float:
    result = runner.invoke(main, ["ppl", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return float(result.stdout.strip().splitlines()[-1].split()[-1])


def test_ppl_with_the_exact_window_equals_the_full_cache_and_a_shorter_window_does_not(content_ckpt, tmp_path):
    length = 2048  # several times the reach, so that most queries lose keys to the window
    reach = provable_reach(load(content_ckpt).model, context=length)
    assert reach.window < length / 2
    runner = CliRunner()
    common = [str(content_ckpt), "--lengths", str(length), "--max-tokens", str(2 * length)]
    full = _ppl(runner, common)
    result = runner.invoke(main, ["ppl", *common, "--kv-window", "exact"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"exact window: {reach.window} tokens" in result.stderr
    exact = float(result.stdout.strip().splitlines()[-1].split()[-1])
    # float32 logits by two summation orders (banded blocks vs one pass): ~1e-6 relative; the cut keys' 2^-32
    # of mass is far below that.
    assert exact == pytest.approx(full, rel=1e-5)
    # Control: the same command with a window that cuts keys carrying weight (the bound is loose: windows far
    # below the proved reach often change nothing visible, so the control takes one of a few tokens).
    short = _ppl(runner, [*common, "--kv-window", "4"])
    assert abs(short / full - 1) > 1e-3, (short, full)


def test_the_exact_window_changes_no_logit_and_a_short_window_does(seed):
    from alibi_export.runtime.pytorch import windowed_logits

    model = _content_driven(seed)
    ids = torch.randint(0, 300, (1, 2048), generator=torch.Generator().manual_seed(seed))
    reach = provable_reach(model, context=ids.shape[1])
    assert reach.window < ids.shape[1] / 2
    with torch.inference_mode():
        full = model(ids)
        exact = windowed_logits(model, ids, reach.window)
        short = windowed_logits(model, ids, 16)
    # float32 logits of size ~25 by two summation orders: a few ulps (2e-6 each); the cut mass, < 2^-32, is not
    # visible at all. Control: 16 tokens cut keys that carry weight (measured: 0.08).
    scale = full.abs().max().item()
    assert (exact - full).abs().max().item() <= 1e-6 * scale * 8
    assert (short - full).abs().max().item() > 1e-3 * scale


def test_reach_command_writes_json_and_refuses_exports_and_other_methods(content_ckpt, tiny_kv_export, tmp_path):
    runner = CliRunner()
    out = tmp_path / "reach.json"
    result = runner.invoke(main, ["reach", str(content_ckpt), "--context", str(L), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "exact window" in result.stdout and out.is_file()
    assert '"producer": "alibi-export"' in out.read_text()
    for args, message in ((["reach", str(tiny_kv_export.path)], "not a checkpoint"),
                          (["ppl", str(tiny_kv_export.path), "--kv-window", "exact"], "not a checkpoint folder"),
                          (["ppl", str(content_ckpt), "--kv-window", "soon"], "neither a positive number")):
        result = runner.invoke(main, args)
        assert result.exit_code != 0 and message in result.output, result.output
    with pytest.raises(AlibiExportError, match="only ALiBi"):
        provable_reach(AlibiLM(ModelConfig(vocab_size=50, n_layer=1, n_head=2, d_model=8, d_ff=8, train_len=8,
                                           max_positions=8, position="sinusoidal")), context=64)
