"""The artifact format, owned here: the metadata inside an exported ``.onnx`` and the sidecar beside an engine.

Writers build a frozen dataclass and serialize it with its ``to_*`` method; readers get the same
dataclass back. Paths inside an artifact are relative to the artifact (an engine's sidecar names its
ONNX file relative to the engine; external data lives in the ``.onnx`` file's own folder), never to the
working directory, and an artifact holds no absolute local path: the source checkpoint is recorded by
its folder's name and its weights' SHA-256. Reading an ONNX file refuses external data that points
outside its folder before anything opens the data. Only light imports at module level (``onnx`` and
``tokenizers`` lazily), so the command line can reject a bad file without loading torch.
"""
from __future__ import annotations

import functools
import json
import os
import stat
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ._io import sha256_file
from .errors import AlibiExportError

__all__ = ["OnnxMetadata", "EngineSidecar", "read_metadata", "check_onnx_file", "model_config_of", "tokenizer_of",
           "sidecar_path", "read_sidecar", "onnx_of_engine", "is_our_engine", "NotOurArtifact",
           "check_plain_name",
           "PREFIX", "PRODUCER"]

PREFIX = "alibi_export."  # every metadata key of an exported ONNX file starts with it
PRODUCER = "alibi-export"  # the ONNX producer_name and the sidecar's created_by: files this tool wrote
_OPTIONAL = {"kv_cache": "false", "ort_fusions": "false",  # absent from files of alibi-export 0.1.0
             "quantization": "", "quantization_block_size": "0",  # absent from float exports
             "quantization_gate": "{}",  # absent until a quantized export's gate has run
             "static_cache": "0",  # absent from concatenating KV-cache exports
             "logits_to_keep": "false"}  # absent unless the KV-cache file takes that input
_ONLY_WHEN_SET = ("quantization", "quantization_block_size", "quantization_gate", "static_cache", "logits_to_keep")


class NotOurArtifact(AlibiExportError):
    """A file this tool did not write (or whose alibi-export metadata is incomplete)."""


@dataclass(frozen=True)
class OnnxMetadata:
    """What an exported ``.onnx`` file says about itself (its ``metadata_props``, one key per field).

    ``config`` is the model config as a dict (:meth:`model_config` builds the ModelConfig); ``tokenizer``
    the tokenizer's JSON, so a served file needs nothing beside it; ``slopes`` the ALiBi slopes (empty for
    other position methods)."""

    version: str
    position: str
    slopes: tuple[float, ...]
    train_len: int
    source_name: str  # the checkpoint folder's name, not its path: no local path leaves the machine
    source_sha256: str  # of the checkpoint's weights file
    dynamic_len: bool
    dtype: str
    attention: str
    kv_cache: bool
    ort_fusions: bool
    config: dict = field(compare=True, hash=False)
    tokenizer: str = field(repr=False, hash=False)
    quantization: str = ""  # "int8" or "int4" (ONNX Runtime's tools); "" for float exports
    quantization_block_size: int = 0  # the MatMulNBits block size (int8 and int4)
    # The export's perplexity gate, recorded after it ran: {"cpu_kernel_path", "tolerance", "passed", "rows":
    # [[length, ratio, argmax agreement], ...]}. An int8 file's accuracy depends on the CPU's int8 kernel
    # (alibi_export.export.quantize), so `validate` compares this path with its own and re-runs the gate.
    quantization_gate: dict = field(default_factory=dict, compare=True, hash=False)
    # The static-cache KV form (export.kv_buffer): the longest prompt + generation it was exported for; its cache
    # is a buffer that the graph updates in place. 0: the concatenating form (or no KV cache).
    static_cache: int = 0
    # The KV-cache file takes ``logits_to_keep`` (export.kv_cache.keep_last_logits): 0 = every position's logits,
    # N = the last N's. Every caller must feed it (GenerationSession does).
    logits_to_keep: bool = False

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` of the file, always in field order (so two exports are byte-identical)."""
        def text(value) -> str:
            if isinstance(value, bool):
                return str(value).lower()
            if isinstance(value, (tuple, list, dict)):
                return json.dumps(list(value) if isinstance(value, tuple) else value, sort_keys=True)
            return str(value)

        return {PREFIX + f.name: text(getattr(self, f.name)) for f in fields(self)
                if f.name not in _ONLY_WHEN_SET or getattr(self, f.name)}

    @classmethod
    def from_props(cls, props: dict[str, str], *, where: str = "the file") -> "OnnxMetadata":
        if PREFIX + "config" not in props:
            raise NotOurArtifact(f"{where} was not written by alibi-export (no {PREFIX}config metadata). "
                                 "Note: export it with `alibi-export onnx`")
        props = dict(props)
        if PREFIX + "source" in props and PREFIX + "source_name" not in props:  # files of alibi-export 0.1.0
            props[PREFIX + "source_name"] = Path(props[PREFIX + "source"]).name
        values = {}
        try:
            for f in fields(cls):
                raw = props.get(PREFIX + f.name, _OPTIONAL.get(f.name))
                if raw is None:
                    raise KeyError(PREFIX + f.name)
                values[f.name] = _parse_field(f.type, raw)
            check_plain_name(values["source_name"], "source_name")
        except KeyError as e:
            raise NotOurArtifact(f"{where} has incomplete alibi-export metadata: {e.args[0]} is missing") from None
        except ValueError as e:
            raise NotOurArtifact(f"{where} has corrupt alibi-export metadata: {e}") from None
        return cls(**values)

    def model_config(self):
        """The ModelConfig this file was exported from (imports torch through the model module)."""
        from .model import ModelConfig

        return ModelConfig.from_dict(self.config)


def check_plain_name(name: str, what: str) -> str:
    """A name an artifact records for a file or folder beside it: no separator, not ``.``/``..``, not empty.

    Readers look the name up next to the artifact; anything else (``../../x``, an absolute path) would make
    a file from elsewhere steer what is loaded, so it is refused (ValueError) before anything is opened."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise ValueError(f"{what} {name!r} is not a plain name. Note: expected the name of a folder or file "
                         "beside the artifact")
    return name


def _parse_field(kind: str, raw: str):
    if kind == "bool":
        if raw not in ("true", "false"):
            raise ValueError(f"expected true or false, got {raw!r}")
        return raw == "true"
    if kind == "int":
        return int(raw)
    if kind == "tuple[float, ...]":
        return tuple(float(s) for s in json.loads(raw))
    if kind == "dict":
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object, got {type(value).__name__}")
        return value
    return raw


# ----------------------------------------------------------------------------- reading an ONNX file
@dataclass(frozen=True)
class _Header:
    """What one parse of an ONNX file (without its external data) yields."""

    props: tuple[tuple[str, str], ...]
    op_types: frozenset[str]
    external: tuple[str, ...]  # locations of external data, as written in the file


def _tensors(graph):
    """Every tensor of ``graph`` and its subgraphs (Loop and If bodies, Constant values)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


@functools.lru_cache(maxsize=16)
def _header(path: str, stamp: tuple[int, int]) -> _Header:
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends for corrupt files
        raise AlibiExportError(f"cannot read ONNX file {path!r}: {str(e).splitlines()[0]}") from None
    external = []
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            external.append(entries.get("location", ""))
    ops = {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}
    return _Header(tuple((p.key, p.value) for p in model.metadata_props), frozenset(ops), tuple(external))


def _check_external(path: Path, locations: tuple[str, ...]) -> None:
    """Refuse external data outside ``path``'s folder, without opening it (only names and stat())."""
    folder = path.parent.resolve()
    for location in dict.fromkeys(locations):
        target = (folder / location).resolve() if location and not os.path.isabs(location) else None
        if target is None or not target.is_relative_to(folder):
            raise AlibiExportError(f"{str(path)!r} refers to external data outside its own folder ({location!r}). "
                                   "Note: expected the data file beside the .onnx file; it was not opened")
        if not target.is_file():
            raise AlibiExportError(f"the external data file {location!r} of {str(path)!r} is missing or not a "
                                   "regular file. Note: expected it beside the .onnx file")


def check_onnx_file(path: str | Path) -> frozenset[str]:
    """Parse ``path`` (not its external data) and check where its external data lives; the op types."""
    path = Path(path)
    if not path.is_file():
        raise AlibiExportError(f"ONNX file {str(path)!r} not found")
    stat = path.stat()
    header = _header(str(path), (stat.st_mtime_ns, stat.st_size))
    _check_external(path, header.external)
    return header.op_types


def read_metadata(path: str | Path) -> OnnxMetadata:
    """The metadata of an exported ``.onnx`` file, or of the ONNX file an ``.engine`` was built from.

    Raises a one-line AlibiExportError for a missing, corrupt or foreign file, and for external data
    that points outside the file's folder."""
    path = Path(path)
    if path.suffix == ".engine":
        path = onnx_of_engine(path)
    check_onnx_file(path)
    stat = path.stat()
    props = dict(_header(str(path), (stat.st_mtime_ns, stat.st_size)).props)
    return OnnxMetadata.from_props(props, where=repr(str(path)))


def model_config_of(path: str | Path):
    """The ModelConfig recorded in an exported file (vocab size, heads, training length)."""
    from .errors import ConfigError

    try:
        return read_metadata(path).model_config()
    except (ConfigError, TypeError) as e:
        raise NotOurArtifact(f"{str(path)!r} records an invalid model config: {e}") from None


def tokenizer_of(path: str | Path):
    """The tokenizer stored in an exported file."""
    from tokenizers import Tokenizer

    text = read_metadata(path).tokenizer
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for invalid JSON
        raise NotOurArtifact(f"{str(path)!r} carries a corrupt tokenizer: {str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- the engine sidecar
@dataclass(frozen=True)
class EngineSidecar:
    """``ENGINE.json``: what an engine is and where it came from; ``onnx`` is relative to the engine's folder."""

    engine: str  # the engine's file name
    engine_sha256: str  # ties the sidecar to this engine: a rebuilt or replaced engine does not match
    created_by: str
    backend: str
    backend_version: str
    precision: str
    strongly_typed: bool
    onnx_dtype: str
    attention: str
    plugin: dict | None
    profile: dict
    train_len: int | None
    onnx: str  # the source ONNX file's plain name: it is looked for beside the engine
    onnx_sha256: str
    timing_cache: str | None  # the timing cache's file name, for the record
    layer_types: dict
    build_seconds: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str = "the sidecar") -> "EngineSidecar":
        try:
            data = json.loads(text)
            names = {f.name for f in fields(cls)}
            if not isinstance(data, dict) or not names <= set(data):
                missing = sorted(names - set(data)) if isinstance(data, dict) else "all fields"
                raise ValueError(f"missing {missing}")
            return cls(**{k: data[k] for k in names})
        except ValueError as e:  # json.JSONDecodeError is one
            raise NotOurArtifact(f"{where} is not an alibi-export engine sidecar: {e}. Note: rebuild the engine "
                                 "with `alibi-export trt`") from None


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_sidecar(engine_path: str | Path, *, verify: bool = True) -> EngineSidecar:
    """The sidecar of ``engine_path``; with ``verify``, refuses it unless it records this engine's SHA-256."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise AlibiExportError(f"engine {str(engine_path)!r} not found")
    side = sidecar_path(engine_path)
    try:
        text = side.read_text()
    except FileNotFoundError:
        raise AlibiExportError(f"engine {str(engine_path)!r} has no sidecar {side.name!r}. Note: rebuild it with "
                               "`alibi-export trt`") from None
    except UnicodeDecodeError as e:
        raise NotOurArtifact(f"{str(side)!r} is not an alibi-export engine sidecar: {e}") from None
    sidecar = EngineSidecar.from_json(text, where=repr(str(side)))
    if verify and sidecar.engine_sha256 != sha256_file(engine_path):
        raise AlibiExportError(f"engine {str(engine_path)!r} does not match its sidecar (SHA-256 differs). Note: the "
                               "engine was replaced or rebuilt without it; rebuild with `alibi-export trt`")
    return sidecar


def is_our_engine(engine_path: str | Path) -> bool:
    """An engine this tool built (so a rebuild may replace it): its sidecar says so and names it. Reads the
    JSON loosely, so that engines of earlier versions, whose sidecars lack fields, still count."""
    try:
        side = json.loads(sidecar_path(engine_path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return (isinstance(side, dict) and str(side.get("created_by", "")).startswith(PRODUCER)
            and side.get("engine") == Path(engine_path).name)


def onnx_of_engine(engine_path: str | Path) -> Path:
    """The ONNX file an engine was built from: the file of that name beside the engine, checked by its SHA-256.
    Only a plain name is accepted, so a sidecar cannot steer what is opened to a file elsewhere."""
    engine_path = Path(engine_path)
    sidecar = read_sidecar(engine_path)
    location = sidecar.onnx
    try:
        if not isinstance(location, str) or not location.endswith(".onnx"):
            raise ValueError(f"onnx {location!r} is not the name of a .onnx file")
        check_plain_name(location, "onnx")
    except ValueError as e:
        raise NotOurArtifact(f"the sidecar of {str(engine_path)!r} names {location!r} as its ONNX file: {e}; "
                             "expected the plain name of a .onnx file beside the engine. Note: it was not "
                             "opened; rebuild with `alibi-export trt`") from None
    source = engine_path.parent / location
    if source.exists() and not stat.S_ISREG(source.stat().st_mode):  # no device, FIFO or folder is opened
        raise NotOurArtifact(f"the ONNX file {location!r} of {str(engine_path)!r} is not a regular file. "
                             "Note: it was not opened")
    if not source.is_file():
        raise AlibiExportError(f"the ONNX file {sidecar.onnx!r} that {str(engine_path)!r} was built from is "
                               "missing. Note: expected it beside the engine; copy it there")
    if sha256_file(source) != sidecar.onnx_sha256:
        raise AlibiExportError(f"{str(source)!r} is not the ONNX file {str(engine_path)!r} was built from "
                               "(SHA-256 differs)")
    return source
