"""An exported file holds no path of the exporting machine, so the same export from two install folders gives
the same bytes. The scan reads EVERY string field of the proto (by reflection: nodes, attributes, subgraphs,
functions, metadata, doc strings, value_info), not a list of the fields known today; its negative control
finds a path planted in a function's node and in a Loop body."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from alibi_export import load
from tests.conftest import ROOT


def strings_of(message) -> list[str]:
    """Every string in a protobuf message, recursively (repeated fields and maps included)."""
    from google.protobuf.descriptor import FieldDescriptor

    found = []
    for field, value in message.ListFields():
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        values = value if repeated else [value]
        for v in values:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                found += strings_of(v)
            elif field.type == FieldDescriptor.TYPE_STRING:
                found.append(v)
            elif field.type == FieldDescriptor.TYPE_BYTES and field.name != "raw_data":
                found.append(v.decode("utf-8", "replace"))  # string_data of string tensors
    return found


def local_paths(proto, roots) -> list[str]:
    return [s for s in strings_of(proto) if any(r in s for r in roots)]


def _roots(*extra) -> list[str]:
    return [str(ROOT), sys.prefix, os.path.realpath(sys.prefix), "site-packages", *map(str, extra)]


@pytest.mark.parametrize("attention", ["decomposed", "plugin"])  # Loop bodies; local functions
def test_no_local_path_in_any_string_field(tiny_dir, tmp_path, attention):
    from alibi_export.export.onnx import export_onnx

    out = export_onnx(load(tiny_dir), tmp_path / "m.onnx", attention=attention, kv_cache=attention == "decomposed",
                      dynamic_len=True).path
    proto = onnx.load(str(out))
    assert len(strings_of(proto)) > 100  # the scan reaches the graph, not only the model's header
    assert local_paths(proto, _roots(tmp_path, tiny_dir)) == []
    # negative control: a path planted deep inside (a function's node, a subgraph's node) is found
    planted = onnx.ModelProto()
    planted.CopyFrom(proto)
    where = []
    if planted.functions:
        node = planted.functions[0].node[0]
        node.metadata_props.add(key="pkg.torch.onnx.stack_trace", value=f'File "{ROOT}/alibi_export/model.py"')
        where.append("function")
    for node in planted.graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                attr.g.node[0].doc_string = f"{sys.prefix}/lib/x.py"
                where.append("subgraph")
                break
        if len(where) == 2 or (where and not planted.functions):
            break
    assert where and len(local_paths(planted, _roots())) == len(where)


_EXPORT = """
import sys
from alibi_export import load
from alibi_export.export.onnx import export_onnx
export_onnx(load(sys.argv[1]), sys.argv[2], attention=sys.argv[3])
print(__import__("alibi_export").__file__)
"""


@pytest.mark.slow
def test_same_export_from_two_install_folders_is_byte_identical(tiny_dir, tmp_path):
    """The package copied to two folders (of different path lengths) and run from each, in its own process."""
    outs = []
    for i, folder in enumerate([tmp_path / "a", tmp_path / "another" / "install"]):
        shutil.copytree(ROOT / "alibi_export", folder / "alibi_export",
                        ignore=shutil.ignore_patterns("__pycache__", "models"))
        shipped = Path("alibi_export", "models", "alibi-small")
        shutil.copytree(ROOT / shipped, folder / shipped)
        out = tmp_path / f"m{i}.onnx"
        env = {**os.environ, "PYTHONPATH": str(folder)}
        proc = subprocess.run([sys.executable, "-c", _EXPORT, str(tiny_dir), str(out), "plugin"], env=env,
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == str(folder / "alibi_export" / "__init__.py")  # that copy ran
        assert local_paths(onnx.load(str(out)), _roots(folder)) == []
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_ppl_json_records_the_text_by_name_and_sha256(tmp_path):
    """`ppl --json` recorded --text as given (a local path); now its file name and SHA-256."""
    import json

    from alibi_export._io import sha256_file
    from alibi_export.perplexity import write_json

    text = tmp_path / "private" / "eval.txt"
    text.parent.mkdir()
    text.write_text("some text")
    write_json({}, tmp_path / "r.json", text=str(text), stride=0)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["text"] == "eval.txt" and data["text_sha256"] == sha256_file(text) and data["stride"] == 0
    assert str(tmp_path) not in (tmp_path / "r.json").read_text()
    write_json({}, tmp_path / "r2.json", note=str(text))  # control: the scan sees a path where one is written
    assert str(tmp_path) in (tmp_path / "r2.json").read_text()
