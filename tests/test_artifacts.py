"""The artifact format (alibi_export.artifacts): metadata field by field, byte-identical exports, paths
relative to the artifact, external data confined to the file's folder, the engine sidecar, no import cycles."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from alibi_export import __version__, alibi_slopes, load
from alibi_export._io import sha256_file
from alibi_export.artifacts import (EngineSidecar, NotOurArtifact, OnnxMetadata, check_onnx_file, model_config_of,
                                    onnx_of_engine, read_metadata, read_sidecar, sidecar_path, tokenizer_of)
from alibi_export.errors import AlibiExportError
from tests.conftest import ROOT

PACKAGE = ROOT / "alibi_export"


@pytest.fixture(scope="module")
def tiny_export(tiny_kv_export):
    return tiny_kv_export


def test_metadata_field_by_field(tiny_dir, tiny_export):
    ckpt = load(tiny_dir)
    meta = read_metadata(tiny_export.path)
    assert meta == tiny_export.metadata
    assert meta.version == __version__
    assert meta.position == "alibi"
    assert meta.slopes == pytest.approx(alibi_slopes(6))
    assert meta.train_len == 32
    assert meta.source_name == tiny_dir.name  # the folder's name only
    assert meta.source_sha256 == sha256_file(tiny_dir / "model.safetensors") == ckpt.sha256
    assert meta.dynamic_len is True and meta.kv_cache is True and meta.ort_fusions is False
    assert meta.dtype == "float32" and meta.attention == "decomposed"
    assert meta.config == ckpt.config.to_dict() and model_config_of(tiny_export.path) == ckpt.config
    assert meta.tokenizer == ckpt.tokenizer.to_str()
    assert tokenizer_of(tiny_export.path).encode("It was a dark night").ids == \
        ckpt.tokenizer.encode("It was a dark night").ids
    props = {p.key: p.value for p in onnx.load(tiny_export.path, load_external_data=False).metadata_props}
    assert list(props) == [f"alibi_export.{f}" for f in (
        "version", "position", "slopes", "train_len", "source_name", "source_sha256", "dynamic_len", "dtype",
        "attention", "kv_cache", "ort_fusions", "config", "tokenizer")]  # fixed order: byte-identical files
    assert not any(str(Path(tiny_dir).parent) in v for v in props.values()), "no local path in the file"


def test_metadata_round_trip_and_foreign_files(tmp_path, tiny_export):
    meta = tiny_export.metadata
    assert OnnxMetadata.from_props(meta.to_props()) == meta
    with pytest.raises(NotOurArtifact, match="source_sha256 is missing"):
        OnnxMetadata.from_props({k: v for k, v in meta.to_props().items() if k != "alibi_export.source_sha256"})
    with pytest.raises(NotOurArtifact, match="corrupt alibi-export metadata"):
        OnnxMetadata.from_props({**meta.to_props(), "alibi_export.train_len": "long"})
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    plain = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                                          [x], [onnx.helper.make_tensor_value_info(
                                                              "y", onnx.TensorProto.FLOAT, [1])]))
    onnx.save(plain, tmp_path / "plain.onnx")
    with pytest.raises(NotOurArtifact, match="not written by alibi-export"):
        read_metadata(tmp_path / "plain.onnx")
    assert check_onnx_file(tmp_path / "plain.onnx") == {"Identity"}  # any ONNX file may run; it is not ours


def test_same_export_twice_is_byte_identical(tmp_path, tiny_dir, tiny_export):
    """Two runs in two processes (the CLI, then the library here) write the same bytes: node names,
    metadata order, the tokenizer's JSON and the absence of timestamps are all deterministic."""
    out = tmp_path / "cli.onnx"
    proc = subprocess.run([sys.executable, "-m", "alibi_export", "onnx", str(tiny_dir), "--dynamic-len", "--kv-cache",
                           "--no-validate", "-o", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == Path(tiny_export.path).read_bytes()


# ----------------------------------------------------------------------------- external data
def _with_external_data(src: Path, folder: Path, location: str) -> Path:
    """A copy of ``src`` in ``folder`` whose initializers point at ``location`` (which is never created here)."""
    model = onnx.load(src)
    for tensor in model.graph.initializer:
        if tensor.raw_data:
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            tensor.external_data.add(key="location", value=location)
            tensor.external_data.add(key="offset", value="0")
            tensor.external_data.add(key="length", value="4")
    path = folder / "ext.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin", "/tmp/secret.bin", "link.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path, tiny_export, location):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    (folder / "link.bin").symlink_to(tmp_path / "secret.bin")  # inside by name, outside once resolved
    path = _with_external_data(tiny_export.path, folder, location)
    from alibi_export.runtime.onnxruntime import create_session

    for read in (read_metadata, check_onnx_file, create_session):
        with pytest.raises(AlibiExportError, match="outside its own folder.*it was not opened"):
            read(path)


def test_external_data_beside_the_file_is_read(tmp_path, tiny_export):
    """Control: the check lets a file's own data file through, and onnxruntime runs it."""
    import numpy as np

    from alibi_export.runtime.onnxruntime import create_session

    path = tmp_path / "own.onnx"
    onnx.save(onnx.load(tiny_export.path), path, save_as_external_data=True, location="own.onnx.data")
    assert read_metadata(path) == tiny_export.metadata
    session = create_session(path)
    ids = np.ones((1, 3), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": ids,
            **{i.name: np.zeros((1, 6, 0, 8), np.float32) for i in session.get_inputs()[2:]}}
    assert session.run(["logits"], feed)[0].shape == (1, 3, 300)
    (tmp_path / "own.onnx.data").unlink()
    with pytest.raises(AlibiExportError, match="external data file 'own.onnx.data' .* is missing"):
        read_metadata(path)


# ----------------------------------------------------------------------------- the engine sidecar
def _sidecar(engine: Path, onnx_path: Path, **overrides) -> EngineSidecar:
    fields = dict(engine=engine.name, engine_sha256=sha256_file(engine), created_by="alibi-export test",
                  backend="tensorrt-rtx", backend_version="0", precision="fp32", strongly_typed=True,
                  onnx_dtype="float32", attention="native attention", plugin=None,
                  profile={"input": "input_ids", "min": [1, 1], "opt": [1, 8], "max": [1, 64]}, train_len=32,
                  onnx=onnx_path.name, onnx_sha256=sha256_file(onnx_path),
                  timing_cache=None, layer_types={"MATRIX_MULTIPLY": 1}, build_seconds=0.5)
    return EngineSidecar(**{**fields, **overrides})


def test_sidecar_names_its_onnx_beside_the_engine(tmp_path, tiny_export, monkeypatch):
    """The sidecar records the ONNX file's plain name; it is found beside the engine whatever the working
    directory. Control: the same file one folder away, named by a relative path, is refused unopened."""
    engines, elsewhere = tmp_path / "engines", tmp_path / "elsewhere"
    engines.mkdir()
    elsewhere.mkdir()
    engine = engines / "m.engine"
    engine.write_bytes(b"not really an engine")
    onnx_path = engines / "m.onnx"
    shutil.copyfile(tiny_export.path, onnx_path)
    side = _sidecar(engine, onnx_path)
    sidecar_path(engine).write_text(side.to_json())
    assert side.onnx == "m.onnx"
    monkeypatch.chdir(elsewhere)  # nothing depends on the working directory
    assert read_sidecar(engine) == side == EngineSidecar.from_json(side.to_json())
    assert onnx_of_engine(engine) == onnx_path
    assert read_metadata(engine) == tiny_export.metadata
    shutil.copyfile(onnx_path, elsewhere / "m.onnx")
    sidecar_path(engine).write_text(json.dumps({**json.loads(side.to_json()), "onnx": "../elsewhere/m.onnx"}))
    with pytest.raises(NotOurArtifact, match="not a plain name"):
        onnx_of_engine(engine)


def test_sidecar_that_does_not_match_its_engine_is_refused(tmp_path, tiny_export):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine one")
    sidecar_path(engine).write_text(_sidecar(engine, Path(tiny_export.path)).to_json())
    engine.write_bytes(b"engine two")  # rebuilt or replaced without its sidecar
    with pytest.raises(AlibiExportError, match="does not match its sidecar"):
        read_sidecar(engine)
    sidecar_path(engine).write_text(json.dumps({"engine": "m.engine"}))
    with pytest.raises(NotOurArtifact, match="not an alibi-export engine sidecar"):
        read_sidecar(engine)
    sidecar_path(engine).unlink()
    with pytest.raises(AlibiExportError, match="has no sidecar"):
        read_sidecar(engine)


# ----------------------------------------------------------------------------- import structure
def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level or inside functions (lazy imports count:
    a lazy cycle still ties the two modules together)."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges = {m: set() for m in modules}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `from .x import name` -> x; `from . import x` -> x
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for other in sorted(edges[module]):
            if state.get(other) == "open":
                cycles.append(stack[stack.index(other):] + [other])
            elif other not in state:
                visit(other)
        stack.pop()
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)
    return cycles


def test_no_import_cycles():
    edges = import_graph(PACKAGE)
    assert len(edges) > 20 and "alibi_export.artifacts" in edges["alibi_export.export.onnx"]
    assert import_cycles(edges) == []
    trt_imports = {t for m, ts in edges.items() if m.startswith("alibi_export.runtime.tensorrt") for t in ts}
    assert not {t for t in trt_imports if t.startswith("alibi_export.export")}, "runtime/tensorrt imports export/"


def test_import_cycle_check_finds_a_lazy_cycle(tmp_path):
    """Control: the two cycles this module removed (one of them through a function-level import)."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for name, text in {"__init__.py": "", "a.py": "from .sub.b import f\n", "sub/__init__.py": "",
                       "sub/b.py": "def f():\n    from ..a import g\n", "c.py": "from . import d\n",
                       "d.py": "import pkg.c\n"}.items():
        (pkg / name).write_text(text)
    assert sorted(map(tuple, import_cycles(import_graph(pkg)))) == [("pkg.a", "pkg.sub.b", "pkg.a"),
                                                                      ("pkg.c", "pkg.d", "pkg.c")]
