"""No command deletes or replaces a file this tool did not write; a failed write leaves the previous good output.

Each claim has its negative control: the same write into a folder or over a file of this tool's own succeeds.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from alibi_export import load, save
from alibi_export.errors import AlibiExportError, CheckpointError
from alibi_export.export.onnx import export_onnx
from alibi_export.train import TrainConfig, train
from alibi_export.model import ModelConfig
from tests.conftest import SHIPPED
from tests.test_cli import assert_one_line_error, run_cli


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _train_cfg(corpus, out, steps=2, **kw):
    model = ModelConfig(vocab_size=300, n_layer=1, n_head=2, d_model=16, d_ff=32, train_len=16, max_positions=16)
    return TrainConfig(corpus=str(corpus), out=str(out), model=model, batch_size=2, steps=steps, warmup=1,
                       eval_every=steps, eval_tokens=128, save_every=1, **kw)


# ---------------------------------------------------------------- training output folders
def test_train_refuses_a_folder_of_user_files(corpus, tmp_path):
    """The reported data loss: `train -o DIR --steps 2` on a folder holding notes.txt deleted it."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = _snapshot(out)
    proc = run_cli("train", "--corpus", corpus, "-o", out, "--steps", "2", "--vocab-size", "300", "--layers", "1",
                   "--d-model", "16", "--d-ff", "32", "--heads", "2", "--train-len", "16", "--batch-size", "2")
    assert_one_line_error(proc, "not empty and not a checkpoint")
    assert _snapshot(out) == before and not any(p.name.startswith(".") for p in out.iterdir())


def test_train_refuses_the_models_folder(corpus, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(SHIPPED, models / "alibi-small")
    before = _snapshot(models)
    with pytest.raises(AlibiExportError, match="not empty and not a checkpoint"):
        train(_train_cfg(corpus, models))
    assert _snapshot(models) == before


def test_checkpoint_update_replaces_only_its_own_files(corpus, tmp_path):
    out = tmp_path / "ck"
    train(_train_cfg(corpus, out, steps=2))  # negative control: a new folder is written
    (out / "MODEL_CARD.md").write_text("the user's card")
    with pytest.raises(AlibiExportError, match="already holds a checkpoint"):  # no silent replacement
        train(_train_cfg(corpus, out, steps=2))
    train(_train_cfg(corpus, out, steps=4), resume=True)
    assert (out / "MODEL_CARD.md").read_text() == "the user's card"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 4
    from alibi_export._io import sha256_file

    assert state["files"] == {n: sha256_file(out / n) for n in state["files"]}  # the set is consistent
    train(_train_cfg(corpus, out, steps=2, save_optimizer=False), overwrite=True)
    assert (out / "MODEL_CARD.md").read_text() == "the user's card"
    assert not (out / "optimizer.safetensors").exists()  # the stale optimizer state of the replaced run
    names = sorted(p.name for p in out.iterdir())
    step = [n for n in names if n.startswith("step-")]  # the one current set; the replaced run's is gone
    assert len(step) == 1 and step[0].startswith("step-000002.") and (out / "current").readlink().name == step[0]
    assert sorted(set(names) - set(step)) == ["MODEL_CARD.md", "config.json", "current", "model.safetensors",
                                              "tokenizer.json", "trainer_state.json"]


def test_resume_needs_a_checkpoint(corpus, tmp_path):
    with pytest.raises(CheckpointError, match="holds no training checkpoint"):
        train(_train_cfg(corpus, tmp_path), resume=True)


def test_save_refuses_foreign_files(tiny_dir, tmp_path):
    ck = load(tiny_dir)
    (tmp_path / "config.json").write_text('{"model_type": "something else"}')
    with pytest.raises(CheckpointError, match="not an alibi-export checkpoint"):
        save(ck.model, ck.tokenizer, tmp_path)
    assert (tmp_path / "config.json").read_text() == '{"model_type": "something else"}'
    save(ck.model, ck.tokenizer, tmp_path / "new")  # negative control
    save(ck.model, ck.tokenizer, tmp_path / "new")  # its own files are replaced
    assert load(tmp_path / "new").sha256 == ck.sha256


# ---------------------------------------------------------------- ONNX files and their external data
@pytest.fixture
def external(monkeypatch):
    """Every model counts as large: its weights go to a data file."""
    import alibi_export.export.onnx as exp

    monkeypatch.setattr(exp, "_TWO_GB", 64 << 20)


def _data_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".data"))


def test_failed_export_keeps_the_previous_pair(tiny_dir, tmp_path, external, monkeypatch):
    ck = load(tiny_dir)
    out = tmp_path / "m.onnx"
    export_onnx(ck, out)
    assert len(_data_files(tmp_path)) == 1
    good = _snapshot(tmp_path)
    import alibi_export.export.onnx_file as writer

    def broken(path):
        raise AlibiExportError("simulated failure after the data file was written")

    monkeypatch.setattr(writer, "_check", broken)
    ck.model.wte.weight.data.mul_(2)  # a different model: its data file gets a different name
    with pytest.raises(AlibiExportError, match="simulated"):
        export_onnx(ck, out)
    assert _snapshot(tmp_path) == good  # same files, same bytes, no temporaries left
    from alibi_export.runtime.onnxruntime import create_session

    ids = np.random.default_rng(0).integers(0, ck.config.vocab_size, (1, 5))
    assert create_session(out).run(None, {"input_ids": ids})[0].shape == (1, 5, ck.config.vocab_size)


def test_reexport_replaces_the_pair_and_leaves_no_stale_data(tiny_dir, tmp_path, monkeypatch):
    import alibi_export.export.onnx as exp

    ck = load(tiny_dir)
    out = tmp_path / "m.onnx"
    monkeypatch.setattr(exp, "_TWO_GB", 64 << 20)
    export_onnx(ck, out)
    first = _data_files(tmp_path)
    export_onnx(ck, out)  # the same export again: byte-identical, the same data file
    assert _data_files(tmp_path) == first
    ck.model.wte.weight.data.mul_(2)
    export_onnx(ck, out)  # other weights: a new data file, the old one removed
    second = _data_files(tmp_path)
    assert len(second) == 1 and second != first
    monkeypatch.setattr(exp, "_TWO_GB", 2**31 - 1)
    export_onnx(ck, out)  # small now: the weights are inside the file, no data file remains
    assert _data_files(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert not [t for t in onnx.load(out).graph.initializer if t.external_data]


def test_an_ort_fused_export_is_ours_to_replace(tiny_dir, tmp_path, monkeypatch):
    """--ort-fusions runs ONNX Runtime's optimizer, which names itself the producer: the file must still say this
    tool wrote it, or exporting it again (--target cuda twice) is refused and its old data file is left behind."""
    import alibi_export.export.onnx as exp
    from alibi_export.export.onnx_file import written_by_alibi_export

    ck = load(tiny_dir)
    out = tmp_path / "fused.onnx"
    monkeypatch.setattr(exp, "_TWO_GB", 64 << 20)
    export_onnx(ck, out, attention="onnx", ort_fusions=True)
    assert written_by_alibi_export(out) and len(_data_files(tmp_path)) == 1
    ck.model.wte.weight.data.mul_(2)
    export_onnx(ck, out, attention="onnx", ort_fusions=True)  # replaced, its old data file removed
    assert len(_data_files(tmp_path)) == 1 and sorted(p.name for p in tmp_path.iterdir())[0] == "fused.onnx"
    # control: the same file stamped with the optimizer's own name is refused, as any foreign file is
    proto = onnx.load(out, load_external_data=False)
    proto.producer_name = "onnxruntime.transformers"
    onnx.save(proto, out)
    with pytest.raises(AlibiExportError, match="not written by alibi-export"):
        export_onnx(ck, out, attention="onnx", ort_fusions=True)


def test_export_never_replaces_a_foreign_file(tiny_dir, tmp_path, external):
    ck = load(tiny_dir)
    (tmp_path / "user.onnx").write_bytes(b"not an onnx file")
    foreign = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []), producer_name="someone-else")
    onnx.save(foreign, tmp_path / "other.onnx")
    before = _snapshot(tmp_path)
    for name in ("user.onnx", "other.onnx"):
        with pytest.raises(AlibiExportError, match="not written by alibi-export"):
            export_onnx(ck, tmp_path / name)
    assert _snapshot(tmp_path) == before
    proc = run_cli("onnx", tiny_dir, "--dynamic-len", "--no-validate", "-o", tmp_path / "user.onnx")
    assert_one_line_error(proc, "not written by alibi-export")
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------- perplexity outputs
def test_ppl_never_replaces_foreign_outputs(tmp_path):
    from alibi_export.perplexity import PerplexityRow, check_outputs, plot_perplexity, write_json

    rows = {"m": [PerplexityRow(8, 10.0, 8, 1)]}
    write_json(rows, tmp_path / "ppl.json")  # negative control: its own files are replaced
    plot_perplexity(rows, tmp_path / "ppl.png")
    write_json(rows, tmp_path / "ppl.json")
    plot_perplexity(rows, tmp_path / "ppl.png")
    check_outputs(tmp_path / "ppl.json", tmp_path / "ppl.png")
    (tmp_path / "user.json").write_text('{"results": "mine"}')
    shutil.copy(tmp_path / "ppl.png", tmp_path / "user.png")
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "user.png")  # a PNG, but not ours
    for json_path, png in ((tmp_path / "user.json", None), (None, tmp_path / "user.png")):
        with pytest.raises(AlibiExportError, match="not written by alibi-export"):
            check_outputs(json_path, png)
    assert (tmp_path / "user.json").read_text() == '{"results": "mine"}'


# ---------------------------------------------------------------- TensorRT engine + sidecar pair
@pytest.fixture(scope="module")
def onnx_form(tmp_path_factory, tiny_dir):
    pytest.importorskip("tensorrt_rtx_bindings", reason="needs TensorRT-RTX: pip install 'alibi-export[trt-rtx]'")
    d = tmp_path_factory.mktemp("onnx-form")
    return export_onnx(load(tiny_dir), d / "tiny.onnx", attention="onnx").path


def test_engine_and_sidecar_are_written_as_a_pair(onnx_form, tmp_path, monkeypatch):
    from alibi_export._io import sha256_file
    from alibi_export.artifacts import EngineSidecar, read_sidecar
    from alibi_export.runtime.tensorrt import build_engine

    engine = tmp_path / "tiny.engine"
    build_engine(onnx_form, engine, min_len=1, opt_len=16, max_len=64, backend="tensorrt-rtx")
    assert read_sidecar(engine).engine_sha256 == sha256_file(engine)
    good = _snapshot(tmp_path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process stops while the sidecar is being written

    monkeypatch.setattr(EngineSidecar, "to_json", crash)
    with pytest.raises(KeyboardInterrupt):
        build_engine(onnx_form, engine, min_len=1, opt_len=32, max_len=64, backend="tensorrt-rtx")
    assert _snapshot(tmp_path) == good  # the old pair, whole; no temporaries


def test_engine_never_replaces_a_foreign_file_and_a_mismatched_pair_is_refused(onnx_form, tmp_path):
    from alibi_export.runtime.tensorrt import TrtEngineRunner, build_engine

    (tmp_path / "user.engine").write_bytes(b"someone's engine")
    with pytest.raises(AlibiExportError, match="not written by alibi-export"):
        build_engine(onnx_form, tmp_path / "user.engine", min_len=1, opt_len=16, max_len=64, backend="tensorrt-rtx")
    assert (tmp_path / "user.engine").read_bytes() == b"someone's engine"
    engine = tmp_path / "ok.engine"
    build_engine(onnx_form, engine, min_len=1, opt_len=16, max_len=64, backend="tensorrt-rtx")
    engine.write_bytes(engine.read_bytes()[:-1] + b"\0")  # an engine that is not the one its sidecar names
    with pytest.raises(AlibiExportError, match="does not match its sidecar"):
        TrtEngineRunner(engine)


class _FakeConfig:
    """TensorRT's builder config as far as timing caches go: a blob it cannot read gives an empty cache."""

    class _Cache:
        def __init__(self, blob: bytes):
            self.blob = blob

        def serialize(self):
            return self.blob

    def create_timing_cache(self, data: bytes):
        return self._Cache(data if data.startswith(b"TRTCACHE") else b"")


def test_timing_cache_refuses_a_file_tensorrt_cannot_read(tmp_path):
    """--timing-cache is read and written back after the build: a user's file given there by mistake is refused
    before anything runs, and left as it was. Controls: a readable cache and a new path are accepted."""
    from alibi_export.errors import EngineBuildError
    from alibi_export.runtime.tensorrt.builder import _timing_cache

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(EngineBuildError, match="not a TensorRT timing cache"):
        _timing_cache(_FakeConfig(), notes)
    assert notes.read_text() == "my notes"
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"TRTCACHE-blob")
    assert _timing_cache(_FakeConfig(), cache).serialize() == b"TRTCACHE-blob"
    assert _timing_cache(_FakeConfig(), tmp_path / "new.cache").serialize() == b""
