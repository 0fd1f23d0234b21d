import json

import pytest
import torch
from safetensors.torch import load_file

from alibi_export import load
from alibi_export.model import ModelConfig
from alibi_export.train import TrainConfig, lr_at, train


def cfg(corpus, out, steps, **kw):
    model = ModelConfig(vocab_size=320, n_layer=1, n_head=2, d_model=32, d_ff=64, train_len=32, max_positions=32)
    return TrainConfig(corpus=str(corpus), out=str(out), model=model, batch_size=4, steps=steps, warmup=2,
                       eval_every=3, eval_tokens=512, save_every=3, **kw)


def test_training_writes_loadable_checkpoint_and_learns(corpus, tmp_path):
    seen = []
    train(cfg(corpus, tmp_path / "m", 12, lr=3e-3), on_progress=seen.append)
    assert [p.step for p in seen] == list(range(1, 13))
    assert seen[-1].loss < seen[0].loss
    assert seen[-1].val_ppl is not None and seen[-1].tokens_per_s > 0
    ck = load(tmp_path / "m")
    assert ck.config.vocab_size == 320
    state = json.loads((tmp_path / "m" / "trainer_state.json").read_text())
    assert state["step"] == 12
    assert not list((tmp_path).glob(".m.*")), "no temporary folder left behind"


def test_resume_reproduces_uninterrupted_run(corpus, tmp_path):
    train(cfg(corpus, tmp_path / "straight", 6))
    train(cfg(corpus, tmp_path / "resumed", 3))
    train(cfg(corpus, tmp_path / "resumed", 6), resume=True)
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_schedule_warms_up_then_decays(corpus, tmp_path):
    c = cfg(corpus, tmp_path, 100)
    lrs = [lr_at(s, c) for s in range(100)]
    assert lrs[0] < lrs[1] == pytest.approx(c.lr)
    assert lrs[-1] == pytest.approx(c.min_lr, rel=0.01)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
