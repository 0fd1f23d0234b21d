"""ONNX Runtime sessions for exported models, wrapped as a Polygraphy runner."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from ..errors import AlibiExportError, MissingDependencyError

__all__ = ["create_session", "OrtRunner", "read_metadata", "model_config_of", "tokenizer_of", "PROVIDERS"]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def create_session(path: str | Path, *, provider: str = "cpu", threads: int | None = None, tf32: bool = False):
    """An InferenceSession on ``provider`` (cpu or cuda). CUDA runs with TF32 off unless asked:
    ONNX Runtime enables it by default, which costs parity with a float32 reference."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise AlibiExportError(f"unknown provider {provider!r}. Note: expected one of {sorted(PROVIDERS)}")
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        if provider == "cuda":
            raise MissingDependencyError("onnxruntime-gpu", "gpu", "the cuda provider")
        raise AlibiExportError(f"{name} is not available in this onnxruntime build")
    path = Path(path)
    if not path.is_file():
        raise AlibiExportError(f"ONNX file {str(path)!r} not found")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = [(name, {"use_tf32": int(tf32)})] if provider == "cuda" else [name]
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for invalid or corrupt files
        raise AlibiExportError(f"onnxruntime cannot load {str(path)!r}: {str(e).splitlines()[0]}") from None
    meta = session.get_modelmeta().custom_metadata_map
    if provider == "cpu" and (meta.get("alibi_export.attention"), meta.get("alibi_export.dtype")) == ("onnx", "float16"):
        # The folded ALiBi columns need float32 accumulation; ORT's CPU Attention keeps fp16 scores.
        raise AlibiExportError(f"{str(path)!r} is an fp16 export with the onnx attention form, which runs on CUDA "
                               "or TensorRT only. Note: use --provider cuda, or export float32 for the CPU")
    return session


def read_metadata(path: str | Path) -> dict[str, str]:
    """alibi-export metadata of an exported ``.onnx`` file, or of the ONNX an ``.engine`` was built from."""
    path = Path(path)
    if path.suffix == ".engine" and path.is_file():
        from .tensorrt.builder import read_sidecar

        source = read_sidecar(path).get("onnx")
        if not source or not Path(source).is_file():
            raise AlibiExportError(f"the ONNX file {source!r} that {str(path)!r} was built from is missing")
        path = Path(source)
    if not path.is_file():
        raise AlibiExportError(f"ONNX file {str(path)!r} not found")
    return dict(_metadata(str(path), path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _metadata(path: str, mtime_ns: int) -> tuple[tuple[str, str], ...]:
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends for corrupt files
        raise AlibiExportError(f"cannot read ONNX file {path!r}: {str(e).splitlines()[0]}") from None
    return tuple((p.key, p.value) for p in model.metadata_props)


def model_config_of(path: str | Path):
    """The ModelConfig recorded in an exported file's metadata (vocab size, heads, training length)."""
    from ..model import ModelConfig

    meta = read_metadata(path)
    if "alibi_export.config" not in meta:
        raise AlibiExportError(f"{str(path)!r} was not written by alibi-export (no alibi_export.config metadata)")
    return ModelConfig.from_dict(json.loads(meta["alibi_export.config"]))


def tokenizer_of(path: str | Path):
    from tokenizers import Tokenizer

    meta = read_metadata(path)
    if "alibi_export.tokenizer" not in meta:
        raise AlibiExportError(f"{str(path)!r} carries no tokenizer (alibi_export.tokenizer metadata)")
    return Tokenizer.from_str(meta["alibi_export.tokenizer"])


def OrtRunner(path: str | Path, *, provider: str = "cpu", threads: int | None = None, name: str | None = None):
    """Polygraphy's OnnxrtRunner over our session factory (providers, threads, TF32 off)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    path = Path(path)
    return OnnxrtRunner(lambda: create_session(path, provider=provider, threads=threads),
                        name=name or f"onnxruntime-{provider}")
