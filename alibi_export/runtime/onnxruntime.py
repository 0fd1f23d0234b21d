"""ONNX Runtime sessions for exported models, wrapped as a Polygraphy runner."""
from __future__ import annotations

from pathlib import Path

from ..artifacts import NotOurArtifact, check_onnx_file, read_metadata
from ..errors import AlibiExportError, MissingDependencyError

__all__ = ["create_session", "OrtRunner", "PROVIDERS"]

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
    check_onnx_file(path)  # refuses external data outside the file's folder before onnxruntime opens any
    if provider == "cpu" and _form(path) == ("onnx", "float16"):
        # The folded ALiBi columns need float32 accumulation; ORT's CPU Attention keeps fp16 scores.
        raise AlibiExportError(f"{str(path)!r} is an fp16 export with the onnx attention form, which runs on CUDA "
                               "or TensorRT only. Note: use --provider cuda, or export float32 for the CPU")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = [(name, {"use_tf32": int(tf32)})] if provider == "cuda" else [name]
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for invalid or corrupt files
        raise AlibiExportError(f"onnxruntime cannot load {str(path)!r}: {str(e).splitlines()[0]}") from None
    return session


def _form(path: Path) -> tuple[str, str] | None:
    """(attention form, dtype) of an alibi-export file; None for any other ONNX file (a session runs those too)."""
    try:
        meta = read_metadata(path)
    except NotOurArtifact:
        return None
    return meta.attention, meta.dtype


def OrtRunner(path: str | Path, *, provider: str = "cpu", threads: int | None = None, name: str | None = None):
    """Polygraphy's OnnxrtRunner over our session factory (providers, threads, TF32 off)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    path = Path(path)
    return OnnxrtRunner(lambda: create_session(path, provider=provider, threads=threads),
                        name=name or f"onnxruntime-{provider}")
