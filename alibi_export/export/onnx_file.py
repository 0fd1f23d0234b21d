"""Writing an exported ONNX file, and its external-data file, so that neither a failure nor a crash ever
leaves a broken pair, and nothing this tool did not write is replaced or deleted.

Large models keep their weights in one data file beside the ``.onnx`` (protobuf holds at most 2 GB). That
file is named after its content (``NAME.onnx.<sha256[:16]>.data``), so a new export never writes over the data
file the previous export's ``.onnx`` still points to: the new data file is written first, then the ``.onnx`` is
renamed over the old one in a single step, and only then is the previous export's data file, now referenced by
nothing, removed. A crash at any point leaves the old pair or the new pair, never a mix. The same content gives
the same name, so exporting twice gives byte-identical files.

The data file is hard-linked into place from the staging folder (``.NAME.onnx.PID.XXXXXXXX.tmp/``), so a kill
between the two renames leaves a data file that is provably ours (the same inode as the one in our staging
folder of a dead process): the next export of NAME removes it with the stale staging folder. A data file of
that name that no export of ours left is never touched.

The file holds no path of the exporting machine: torch.onnx records each node's Python stack trace (the
venv's and the source tree's absolute paths) and doc strings; :func:`strip_local_paths` removes them, in
subgraphs and functions too, so the same export from two install folders gives the same bytes.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import onnx

from .._io import (atomic_path, check_replaceable, check_writable_dir, interrupts_deferred, sha256_file,
                   sigterm_as_interrupt, stale, temp_name)
from ..artifacts import PRODUCER
from ..errors import ExportError
from ._weights import write_external_data

__all__ = ["write_onnx", "rewrite_metadata", "written_by_alibi_export", "data_files_of", "strip_local_paths",
           "PRODUCER"]

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


# Node metadata that torch.onnx writes and that names files of the exporting machine.
_LOCAL_METADATA = ("pkg.torch.onnx.stack_trace",)


def _strip_graph(graph: onnx.GraphProto) -> None:
    graph.doc_string = ""
    for info in (*graph.input, *graph.output, *graph.value_info):
        info.doc_string = ""
    _strip_nodes(graph.node)


def _strip_nodes(nodes) -> None:
    for node in nodes:
        node.doc_string = ""
        kept = [p for p in node.metadata_props if p.key not in _LOCAL_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
        for attr in node.attribute:
            attr.doc_string = ""
            if attr.HasField("g"):
                _strip_graph(attr.g)
            for g in attr.graphs:
                _strip_graph(g)


def strip_local_paths(proto: onnx.ModelProto) -> None:
    """Remove what names the exporting machine's files: each node's stack trace and every doc string, in
    the main graph, its subgraphs (Loop and If bodies) and the model's functions."""
    proto.doc_string = ""
    _strip_graph(proto.graph)
    for function in proto.functions:
        function.doc_string = ""
        _strip_nodes(function.node)


def _remove_orphans(out: Path) -> None:
    """Remove the staging folders of ``out`` that dead processes left, and each data file beside ``out``
    that one of them had linked into place (same inode) but ``out`` does not refer to."""
    referenced = data_files_of(out) if out.is_file() else set()
    for staging in stale(out.parent, out.name):
        if staging.is_dir() and not staging.is_symlink():
            for f in staging.iterdir():
                beside = out.with_name(f.name)
                with contextlib.suppress(OSError):
                    if (f.name.endswith(".data") and beside not in referenced and beside.is_file()
                            and os.path.samefile(f, beside)):
                        beside.unlink()
            shutil.rmtree(staging, ignore_errors=True)


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
    with sigterm_as_interrupt():
        _remove_orphans(out)
        previous_data = data_files_of(out) if out.is_file() else set()
        strip_local_paths(proto)
        staging = temp_name(out)  # named before it exists: the finally always knows it
        try:
            os.mkdir(staging, 0o700)
            data = _write_staged(proto, out, staging, external_data, weights, check)
            with interrupts_deferred():
                for old in previous_data - ({data} if data else set()):
                    with contextlib.suppress(FileNotFoundError):
                        old.unlink()  # the previous export's data file, ours and referenced by nothing now
        finally:
            with interrupts_deferred():
                shutil.rmtree(staging, ignore_errors=True)
    return data


def rewrite_metadata(path: str | os.PathLike, props: dict[str, str]) -> None:
    """Replace the ``metadata_props`` of an ONNX file this tool wrote, in one step: the new header is written
    beside it and renamed over it, so a crash leaves the old file or the new one. Only the header is rewritten:
    the graph and the external-data file it points to are untouched (a quantized export's gate record is
    written this way, after the gate ran on the file)."""
    path = Path(path)
    proto = _load_header(path)
    if proto is None or proto.producer_name != PRODUCER:
        raise ExportError(f"{str(path)!r} was not written by alibi-export: refusing to rewrite its metadata")
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    with atomic_path(path) as staged:  # owned temporary, fsync, rename; SIGTERM cleans up as Ctrl-C
        onnx.save(proto, staged)  # external tensors keep their locations, relative to the same folder


def _write_staged(proto, out: Path, staging: Path, external_data: bool, weights, check=None) -> Path | None:
    """Write the file (and its data file) in ``staging``, check it, and switch it in; returns the data file."""
    staged = staging / out.name
    data = None
    if external_data:
        if weights is not None:
            write_external_data(proto, weights, staging / _STAGED, _STAGED)
        else:
            onnx.save(proto, staged, save_as_external_data=True, all_tensors_to_one_file=True, location=_STAGED)
        digest = sha256_file(staging / _STAGED)
        data = out.with_name(f"{out.name}.{digest[:16]}.data")
        _set_location(proto, data.name)  # the tensors now only point to their bytes: rewriting is cheap
        os.rename(staging / _STAGED, staging / data.name)
    onnx.save(proto, staged)
    _check(staged)
    if check is not None:
        check(staged)  # e.g. parity with the source model: a file that fails it never takes the name
    for f in staging.iterdir():
        os.chmod(f, 0o644)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if data is not None:
        if data.exists():
            if sha256_file(data) != digest:
                raise ExportError(f"{str(data)!r} exists with other content: refusing to replace it")
        else:
            try:  # a link, not a move: until the switch, our staging folder vouches that this file is ours
                os.link(staging / data.name, data)
            except OSError:  # a file system without hard links
                os.replace(staging / data.name, data)
    os.replace(staged, out)  # the switch: from here on the new pair is the export
    return data
