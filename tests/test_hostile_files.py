"""Hostile or careless files: nothing an input file says is trusted before it is checked.

config.json is checked against the safetensors header's shapes before a model is built; a path recorded
inside an artifact must be a plain name (or, for an engine's ONNX file, a relative path to a regular .onnx
file) and is refused before anything is opened.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import onnx
import pytest
import torch

from alibi_export import load
from alibi_export.artifacts import NotOurArtifact, onnx_of_engine, read_metadata, sidecar_path
from alibi_export.errors import CheckpointError
from tests.test_cli import assert_one_line_error, run_cli


@pytest.mark.parametrize("field,value", [("vocab_size", 100_000_000), ("n_layer", 1_000_000_000),
                                         ("n_layer", 10**12), ("d_model", 48 * 4096), ("n_layer", 1)])
def test_config_is_checked_against_the_weights_before_a_model_is_built(tiny_dir, tmp_path, monkeypatch, field, value):
    """The reported failure: `vocab_size: 100000000` in a tiny folder allocated > 4 GB; `n_layer: 1e9` ran for
    minutes. Refused in one line from the header's shapes and names; no model is built off the meta device."""
    import alibi_export.checkpoint as checkpoint

    ck = tmp_path / "ck"
    shutil.copytree(tiny_dir, ck)
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, field: value}))
    built = []
    real = checkpoint.AlibiLM

    def counting(cfg):
        built.append(torch.get_default_device().type)
        return real(cfg)

    monkeypatch.setattr(checkpoint, "AlibiLM", counting)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="layers|do not match|has shape"):
        load(ck)
    assert time.perf_counter() - start < 10 and set(built) <= {"meta"}
    (ck / "config.json").write_text(json.dumps(config))  # control: the folder's own config loads
    assert load(ck).config.n_layer == config["n_layer"] and "cpu" in built


def test_hostile_config_is_a_one_line_error_in_the_cli(tiny_dir, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_dir, ck)
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "vocab_size": 100_000_000}))
    assert_one_line_error(run_cli("onnx", ck, "-o", tmp_path / "x.onnx"), "config.json expects (100000000, 48)")
    assert not (tmp_path / "x.onnx").exists()


def _with_source_name(src: Path, dst: Path, name: str) -> Path:
    proto = onnx.load(str(src))
    for prop in proto.metadata_props:
        if prop.key == "alibi_export.source_name":
            prop.value = name
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("name", ["../../x", "/etc", "..", ".", "a/b", "a\\b", ""])
def test_source_name_must_be_a_plain_name(tiny_kv_export, tmp_path, name):
    """The reported failure: a metadata source_name of `../../x` made `validate` load that folder."""
    bad = _with_source_name(Path(tiny_kv_export.path), tmp_path / "bad.onnx", name)
    with pytest.raises(NotOurArtifact, match="is not a plain name"):
        read_metadata(bad)
    good = _with_source_name(Path(tiny_kv_export.path), tmp_path / "good.onnx", "tiny-ck")  # control
    assert read_metadata(good).source_name == "tiny-ck"


def test_validate_refuses_a_source_name_that_is_a_path(tiny_dir, tmp_path):
    from alibi_export.export.onnx import export_onnx

    export_onnx(load(tiny_dir), tmp_path / "m.onnx")
    shutil.copytree(tiny_dir, tmp_path / "elsewhere")
    bad = _with_source_name(tmp_path / "m.onnx", tmp_path / "bad.onnx", str(tmp_path / "elsewhere"))
    assert_one_line_error(run_cli("validate", bad), "is not a plain name")
    _with_source_name(tmp_path / "m.onnx", tmp_path / "ok.onnx", "elsewhere")  # control: the name beside it
    proc = run_cli("validate", tmp_path / "ok.onnx")
    assert proc.returncode == 0, proc.stderr


def _engine_with_onnx(tmp_path: Path, location: str) -> Path:
    from tests.test_artifacts import _sidecar

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not really an engine")
    side = _sidecar(engine, Path(__file__))  # any file: its fields are replaced below
    data = {**json.loads(side.to_json()), "onnx": location}
    sidecar_path(engine).write_text(json.dumps(data))
    return engine


@pytest.fixture
def alarm():
    """A test that would block (a FIFO opened for reading) fails after 20 s instead of hanging."""
    def timeout(signum, frame):
        raise AssertionError("blocked: the file was opened")
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_engine_sidecar_onnx_path_is_checked_before_it_is_opened(tmp_path, tiny_kv_export, alarm):
    """The reported failure: a sidecar whose `onnx` is absolute was opened and hashed. A FIFO stands for a file
    that must not be opened (opening it would block)."""
    fifo = tmp_path / "trap.onnx"
    os.mkfifo(fifo)
    with pytest.raises(NotOurArtifact, match="expected the plain name of a .onnx file beside the engine"):
        onnx_of_engine(_engine_with_onnx(tmp_path, str(fifo)))
    with pytest.raises(NotOurArtifact, match="not a regular file"):
        onnx_of_engine(_engine_with_onnx(tmp_path, "trap.onnx"))
    for location in ("../../etc/passwd", "../trap.onnx", "sub/real.onnx", "..", ""):
        with pytest.raises(NotOurArtifact, match="expected the plain name of a .onnx file beside the engine"):
            onnx_of_engine(_engine_with_onnx(tmp_path, location))
    shutil.copyfile(tiny_kv_export.path, tmp_path / "real.onnx")  # control: a plain name of a regular .onnx is hashed
    with pytest.raises(Exception, match="SHA-256 differs"):
        onnx_of_engine(_engine_with_onnx(tmp_path, "real.onnx"))


def test_hugging_face_config_is_bounded_by_its_weights(tmp_path, tiny_dir, monkeypatch):
    """A Hugging Face folder's tensor names are not ours, so the bound is the parameter count: a config whose
    model holds more parameters than the files is refused before the model is built."""
    from alibi_export.hf.weights import check_parameter_count
    from alibi_export.model import ModelConfig, parameter_count

    config = load(tiny_dir).config
    start = time.perf_counter()
    huge = ModelConfig.from_dict({**config.to_dict(), "n_layer": 10**9})
    assert parameter_count(huge) > 10**12 and time.perf_counter() - start < 5
    with pytest.raises(CheckpointError, match="does not belong to these weights"):
        check_parameter_count(huge, 10**6, "'x'")
    check_parameter_count(config, parameter_count(config), "'x'")  # control: the model's own count passes
    with torch.device("meta"):
        from alibi_export.model import AlibiLM
        for n in (1, 3):
            real = ModelConfig.from_dict({**config.to_dict(), "n_layer": n})
            assert parameter_count(real) == sum(p.numel() for p in AlibiLM(real).parameters())
