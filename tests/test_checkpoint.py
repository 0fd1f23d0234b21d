import contextlib
import json
import pickle
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


class _WritesSentinel:
    """Unpickling this object opens (so creates) ``path``: proof that a loader ran pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _plant_pickle(ck, sentinel, variant: str) -> None:
    """Put a pickle whose loading writes ``sentinel`` where a loader might read weights."""
    payload = {name: _WritesSentinel(sentinel) for name in ("wte.weight", "ln_f.weight")}
    if variant == "safetensors-is-torch-save":  # torch.save's zip of pickles, named as safetensors
        torch.save(payload, ck / "model.safetensors")
    elif variant == "safetensors-is-raw-pickle":  # the legacy pickle format
        (ck / "model.safetensors").write_bytes(pickle.dumps(payload, protocol=2))
    else:  # only a legacy pytorch_model.bin: a loader that falls back to it must not unpickle it
        (ck / "model.safetensors").unlink()
        torch.save(payload, ck / "pytorch_model.bin")


PICKLE_VARIANTS = ["safetensors-is-torch-save", "safetensors-is-raw-pickle", "pytorch-model-bin"]


@pytest.mark.parametrize("variant", PICKLE_VARIANTS)
def test_never_unpickles(tiny_dir, tmp_path, variant):
    """A pickle where the weights should be is refused, and its code never runs (no sentinel file)."""
    ck, sentinel = _copy(tiny_dir, tmp_path), tmp_path / "UNPICKLED"
    _plant_pickle(ck, sentinel, variant)
    with pytest.raises(CheckpointError):
        load(ck)
    assert not sentinel.exists(), "loading the checkpoint ran pickle code"


def _careless_load(ck):
    """The broken variant: a loader that unpickles whichever weights file it finds."""
    weights = next(p for p in (ck / "model.safetensors", ck / "pytorch_model.bin") if p.exists())
    with open(weights, "rb") as f:  # a file object: torch.load would hand a *.safetensors name to safetensors
        return torch.load(f, weights_only=False)


@pytest.mark.parametrize("variant", PICKLE_VARIANTS)
def test_pickle_payload_is_live(tiny_dir, tmp_path, variant):
    """Negative control for the test above: a loader that unpickles runs the payload, so the sentinel
    check fails for it, whatever it raises afterwards."""
    ck, sentinel = _copy(tiny_dir, tmp_path), tmp_path / "UNPICKLED"
    _plant_pickle(ck, sentinel, variant)
    with contextlib.suppress(Exception):
        _careless_load(ck)
    assert sentinel.exists()
