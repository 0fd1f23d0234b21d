import pytest
import torch

import alibi_export.model as model_mod
from alibi_export import AlibiLM, ModelConfig
from alibi_export.errors import ConfigError

METHODS = ["alibi", "sinusoidal", "rotary", "learned", "t5"]


def tiny(position, **kw):
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, d_ff=64, position=position, train_len=16,
                      max_positions=64, **kw)
    with torch.random.fork_rng(devices=[]):  # fixed weights, and the global generator left as it was
        torch.manual_seed(0)
        return AlibiLM(cfg).eval()


@pytest.mark.parametrize("position", METHODS)
def test_sdpa_matches_eager(position, torch_rng):
    model = tiny(position)
    ids = torch.randint(0, 97, (2, 40), generator=torch_rng)
    with torch.no_grad():
        eager = model.set_attention("eager")(ids)
        sdpa = model.set_attention("sdpa")(ids)
    assert eager.shape == (2, 40, 97)
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", METHODS)
def test_kv_cache_matches_full_forward(position, torch_rng):
    model = tiny(position).set_attention("eager")
    ids = torch.randint(0, 97, (1, 30), generator=torch_rng)
    with torch.no_grad():
        full = model(ids)
        empty = [(torch.zeros(1, 4, 0, 8), torch.zeros(1, 4, 0, 8)) for _ in range(2)]
        first, cache = model(ids[:, :20], past_key_values=empty)
        steps = [first]
        for t in range(20, 30):
            step, cache = model(ids[:, t:t + 1], past_key_values=cache)
            steps.append(step)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_query_chunking_is_exact(monkeypatch, impl, torch_rng):
    model = tiny("alibi").set_attention(impl)
    ids = torch.randint(0, 97, (1, 300), generator=torch_rng)
    with torch.no_grad():
        whole = model(ids)
        monkeypatch.setattr(model_mod, "CHUNK_SCORES", 4 * 300 * 37)  # forces chunks of 37 queries
        chunked = model(ids)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_alibi_has_no_position_parameters():
    names = [n for n, _ in tiny("alibi").named_parameters()]
    assert not any("wpe" in n or "rel_bias" in n for n in names)


def test_alibi_attention_uses_unscaled_bias(torch_rng):
    """One head, zero keys: the scores are exactly the bias m*(j-i), not m*(j-i)/sqrt(d)."""
    from alibi_export.model import Alibi, attend_eager

    cfg = ModelConfig(vocab_size=10, n_layer=1, n_head=1, d_model=64, d_ff=8, train_len=8)
    q = torch.randn(1, 1, 3, 64, generator=torch_rng)
    k = torch.zeros(1, 1, 3, 64)
    v = torch.eye(3).reshape(1, 1, 3, 3)
    out = attend_eager(q, k, v, Alibi(cfg), 0)  # row i: softmax over j <= i of m*(j-i), m = 1/2^8
    m = 2.0 ** -8
    expected = torch.softmax(torch.tensor([-2 * m, -m, 0.0]), 0)
    torch.testing.assert_close(out[0, 0, 2], expected)


def test_learned_positions_refuse_past_maximum():
    model = tiny("learned")
    with pytest.raises(ValueError, match="learned positions"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("bad", [dict(position="xpos"), dict(n_head=3), dict(n_layer=0), dict(vocab_size="9")])
def test_config_validation(bad):
    base = dict(vocab_size=97, n_layer=2, n_head=4, d_model=32, d_ff=64)
    with pytest.raises(ConfigError):
        ModelConfig(**{**base, **bad})


def test_config_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="unknown config field"):
        ModelConfig.from_dict({"vocab_size": 10, "n_layers": 3})


@pytest.mark.parametrize("rule,heads,bias_max", [("paper", 8, 8.0), ("paper", 12, 8.0), ("mpt", 10, 32.0)])
def test_parameter_count_matches_a_real_model(rule, heads, bias_max):
    """parameter_count builds meta-device models (a hostile n_layer costs nothing); the slopes are computed on
    the CPU even there (MPT's rule for 10 heads once failed on a meta tensor). Control: one layer more counts
    more parameters."""
    from alibi_export.model import parameter_count

    cfg = ModelConfig(vocab_size=300, n_layer=3, n_head=heads, d_model=heads * 8, d_ff=64, position="alibi",
                      train_len=64, max_positions=64, alibi_rule=rule, alibi_bias_max=bias_max)
    assert parameter_count(cfg) == AlibiLM(cfg).num_parameters()
    assert parameter_count(ModelConfig.from_dict({**cfg.to_dict(), "n_layer": 4})) > parameter_count(cfg)


def test_configs_without_embed_scale_compute_what_they_did(tiny_tokenizer, tmp_path, torch_rng):
    """A config.json written before embed_scale existed (the shipped models' before their retraining) loads with 1,
    and its logits are the old recipe's, token embeddings plus position vectors (computed here by hand). Control:
    the same weights with embed_scale sqrt(d) in the config give other logits, the hand-made forward's with the
    tokens scaled."""
    import json
    import math

    from alibi_export import load
    from tests.conftest import make_tiny

    folder = make_tiny(tmp_path, tiny_tokenizer, position="sinusoidal")
    config = json.loads((folder / "config.json").read_text())
    del config["embed_scale"]
    (folder / "config.json").write_text(json.dumps(config))
    model = load(folder).model
    assert model.config.embed_scale == 1.0
    (folder / "config.json").write_text(json.dumps({**config, "embed_scale": math.sqrt(config["d_model"])}))
    scaled = load(folder).model
    ids = torch.randint(0, config["vocab_size"], (2, 50), generator=torch_rng)

    def by_hand(scale):
        x = model.pos.embed(model.wte(ids) * scale, 0)
        for block in model.blocks:
            x, _ = block(x, model.pos)
        return model.ln_f(x) @ model.wte.weight.T

    with torch.no_grad():
        old, new = model(ids), scaled(ids)
        assert torch.equal(old, by_hand(1.0))
        torch.testing.assert_close(new, by_hand(math.sqrt(config["d_model"])), atol=1e-4, rtol=1e-5)
    assert (new - old).abs().max() > 1.0  # the field changes what the model computes


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "16"])
def test_embed_scale_must_be_a_positive_number(bad):
    with pytest.raises(ConfigError, match="embed_scale"):
        ModelConfig(embed_scale=bad)
    assert ModelConfig(embed_scale=16).embed_scale == 16
