import json
import shutil

import pytest
import torch

from alibi_export import load, save
from alibi_export.errors import CheckpointError


def test_round_trip(tiny_dir, tmp_path):
    ck = load(tiny_dir)
    save(ck.model, ck.tokenizer, tmp_path / "copy")
    again = load(tmp_path / "copy")
    for (n, a), (_, b) in zip(ck.model.state_dict().items(), again.model.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)
    assert again.sha256 == ck.sha256 and len(ck.sha256) == 64


def test_shipped_models_load(shipped):
    assert shipped.config.position == "alibi" and shipped.config.train_len == 256
    from tests.conftest import SHIPPED_SINUSOIDAL

    assert load(SHIPPED_SINUSOIDAL).config.position == "sinusoidal"


def _copy(tiny_dir, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(tiny_dir, dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "nope")


def test_missing_weights(tiny_dir, tmp_path):
    ck = _copy(tiny_dir, tmp_path)
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load(ck)


def test_corrupt_weights(tiny_dir, tmp_path):
    ck = _copy(tiny_dir, tmp_path)
    (ck / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt weights"):
        load(ck)


def test_corrupt_config(tiny_dir, tmp_path):
    ck = _copy(tiny_dir, tmp_path)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt config.json"):
        load(ck)


def test_unknown_config_field(tiny_dir, tmp_path):
    ck = _copy(tiny_dir, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "rope_theta": 10000}))
    with pytest.raises(CheckpointError, match="unknown config field.*rope_theta"):
        load(ck)


def test_weights_not_matching_config(tiny_dir, tmp_path):
    ck = _copy(tiny_dir, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "d_ff": 128}))
    with pytest.raises(CheckpointError, match="shape"):
        load(ck)


def test_never_unpickles(tiny_dir, tmp_path):
    """A pickle renamed to model.safetensors is rejected as corrupt, never executed."""
    ck = _copy(tiny_dir, tmp_path)
    torch.save({"x": torch.zeros(1)}, ck / "model.safetensors")
    with pytest.raises(CheckpointError):
        load(ck)
