"""Large-model exports: the weights as ONNX external data, one file beside the .onnx, relative location.

Real checkpoints pass protobuf's 2 GB limit; here ``external_data_threshold=0`` sends a tiny model's
weights down the same path, so CI runs it in a second. (Peak RAM of a real-size export is measured by
tools/bench_large_export.py, recorded in BENCHMARKS.md.)
"""
from __future__ import annotations

import re
import shutil

import onnx
import pytest

from alibi_export import load
from alibi_export.export.onnx import export_onnx
from alibi_export.runtime.onnxruntime import create_session
from alibi_export.runtime.pytorch import TorchRunner
from alibi_export.validate import compare


def _locations(path) -> list[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return [e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"]


def test_forced_threshold_writes_one_relative_data_file_that_travels(tiny_dir, tmp_path, monkeypatch):
    ck = load(tiny_dir)
    out = tmp_path / "out"
    out.mkdir()
    res = export_onnx(ck, out / "m.onnx", external_data_threshold=0)
    names = sorted(p.name for p in out.iterdir())  # the .onnx and one data file named after its content
    assert len(names) == 2 and names[0] == "m.onnx" and re.fullmatch(r"m\.onnx\.[0-9a-f]{16}\.data", names[1])
    data_name = names[1]
    locations = _locations(res.path)
    # Every weight of 1 KiB or more (onnx's own floor) is outside: the embedding and each block's matrices,
    # all in that one file, named by a bare relative name.
    assert len(locations) >= 1 + 4 * ck.config.n_layer and set(locations) == {data_name}
    assert (out / "m.onnx").stat().st_size < (out / data_name).stat().st_size

    moved = tmp_path / "elsewhere" / "pair"  # the pair moved together, read from an unrelated directory
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # float32 export vs float32 PyTorch: validate's default float32 tolerance (atol = rtol = 1e-3).
    result = compare(moved / "m.onnx", TorchRunner(ck.model), [9, 64], seed=0)
    assert result, [(r.length, r.max_abs) for r in result.lengths]

    # Negative control: the weights really are in the data file; without it the file does not load.
    (moved / data_name).rename(moved / "hidden.data")
    with pytest.raises(Exception, match=re.escape(data_name)):
        create_session(moved / "m.onnx")


def test_default_threshold_keeps_a_small_model_in_one_file(tiny_dir, tmp_path):
    res = export_onnx(load(tiny_dir), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"] and _locations(res.path) == []
