"""Writing an exported ONNX file, and its external-data file, so that neither a failure nor a crash ever
leaves a broken pair, and nothing this tool did not write is replaced or deleted.

Large models keep their weights in one data file beside the ``.onnx`` (protobuf holds at most 2 GB). That
file is named after its content (``NAME.onnx.<sha256[:16]>.data``), so a new export never writes over the data
file the previous export's ``.onnx`` still points to: the new data file is written first, then the ``.onnx`` is
renamed over the old one in a single step, and only then is the previous export's data file, now referenced by
nothing, removed. A crash at any point leaves the old pair or the new pair, never a mix. The same content gives
the same name, so exporting twice gives byte-identical files.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

import onnx

from .._io import check_replaceable, check_writable_dir, sha256_file
from ..artifacts import PRODUCER
from ..errors import ExportError
from ._weights import write_external_data

__all__ = ["write_onnx", "written_by_alibi_export", "data_files_of", "PRODUCER"]

_STAGED = "weights.data"  # the data file's name inside the staging folder, before it gets its content name


def _load_header(path: Path) -> onnx.ModelProto | None:
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception:  # onnx raises DecodeError and friends for files that are not ONNX
        return None


def written_by_alibi_export(path: str | os.PathLike) -> bool:
    proto = _load_header(Path(path))
    return proto is not None and proto.producer_name == PRODUCER


def data_files_of(path: str | os.PathLike) -> set[Path]:
    """The external-data files, in ``path``'s own folder, that an ONNX file written by this tool points to."""
    path = Path(path)
    proto = _load_header(path)
    if proto is None or proto.producer_name != PRODUCER:
        return set()
    pattern = re.compile(re.escape(path.name) + r"\.[0-9a-f]{16}\.data")
    found = set()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and pattern.fullmatch(entry.value):
                found.add(path.with_name(entry.value))
    return found


def _check(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=False)
        onnx.shape_inference.infer_shapes_path(str(path), str(path), strict_mode=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"exported graph failed onnx.checker: {str(e).splitlines()[0]}") from None


def _set_location(proto: onnx.ModelProto, location: str) -> None:
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location


def write_onnx(proto: onnx.ModelProto, out: str | os.PathLike, *, external_data: bool,
               weights: dict | None = None, check=None) -> Path | None:
    """Check ``proto`` and write it to ``out``; with ``external_data`` its weights go to one data file beside it.

    Returns the data file's path, or None. ``out`` may be replaced only if this tool wrote it. ``proto`` is
    consumed: with external data its tensors are emptied as they are written. ``weights``: the weights an
    export kept apart from ``proto`` (see :mod:`._weights`), streamed into the data file one tensor at a time.
    ``check(path)``: called on the complete staged file (its data file beside it, both under their final names)
    before anything takes ``out``'s place; if it raises, nothing is replaced and the staged files are deleted."""
    out = Path(out)
    check_writable_dir(out.parent)
    check_replaceable(out, written_by_alibi_export, "ONNX file")
    previous_data = data_files_of(out) if out.is_file() else set()
    data = None
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as staging:
        staged = Path(staging) / out.name
        if external_data:
            if weights is not None:
                write_external_data(proto, weights, Path(staging) / _STAGED, _STAGED)
            else:
                onnx.save(proto, staged, save_as_external_data=True, all_tensors_to_one_file=True, location=_STAGED)
            digest = sha256_file(Path(staging) / _STAGED)
            data = out.with_name(f"{out.name}.{digest[:16]}.data")
            _set_location(proto, data.name)  # the tensors now only point to their bytes: rewriting is cheap
            os.rename(Path(staging) / _STAGED, Path(staging) / data.name)
            onnx.save(proto, staged)
        else:
            onnx.save(proto, staged)
        _check(staged)
        if check is not None:
            check(staged)  # e.g. parity with the source model: a file that fails it never takes the name
        for f in Path(staging).iterdir():
            os.chmod(f, 0o644)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if data is not None:
            if data.exists() and sha256_file(data) != digest:
                raise ExportError(f"{str(data)!r} exists with other content: refusing to replace it")
            os.replace(Path(staging) / data.name, data)  # a new name: the old pair is untouched
        os.replace(staged, out)  # the switch: from here on the new pair is the export
    for old in previous_data - ({data} if data else set()):
        with contextlib.suppress(FileNotFoundError):
            old.unlink()  # the previous export's data file, written by this tool and referenced by nothing now
    return data
