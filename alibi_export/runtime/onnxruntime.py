"""ONNX Runtime sessions for exported models, wrapped as a Polygraphy runner."""
from __future__ import annotations

import platform
from pathlib import Path

from ..artifacts import NotOurArtifact, check_onnx_file, read_metadata
from ..errors import AlibiExportError, MissingDependencyError

__all__ = ["create_session", "OrtRunner", "PROVIDERS", "cpu_kernel_path", "U8S8_SATURATES"]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# The x86 kernel paths whose u8 x s8 products go through VPMADDUBSW: pairs summed into int16, with saturation.
U8S8_SATURATES = frozenset({"avx2", "avx512"})


def cpu_kernel_path(flags: str | None = None) -> str:
    """The int8 kernel family ONNX Runtime's CPU provider (MLAS) dispatches to on this machine, from the CPU's
    flags (``/proc/cpuinfo``, or ``flags`` given): "amx", "avx512-vnni", "avx512" (AVX-512BW, no VNNI),
    "avx-vnni", "avx2", "arm64", or the machine's name. MLAS picks the last that applies in that order reversed
    (AVX2, then AVX-VNNI, AVX-512BW, AVX-512 VNNI, AMX); the order matters because int8 arithmetic differs
    between them (:mod:`alibi_export.export.quantize`), so a gate is only the same check on the same path."""
    machine = platform.machine().lower()
    if flags is None:
        if machine in ("arm64", "aarch64"):
            return "arm64"
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line.split(":", 1)[1] for line in f if line.startswith("flags")), "")
        except OSError:
            flags = ""
    have = set(flags.split())
    if not have:
        return machine or "unknown"
    for name, needs in (("amx", {"amx_tile", "amx_int8"}), ("avx512-vnni", {"avx512bw", "avx512_vnni"}),
                        ("avx512", {"avx512bw"}), ("avx-vnni", {"avx2", "avx_vnni"}), ("avx2", {"avx2"})):
        if needs <= have:
            return name
    return "x86-sse"


def create_session(path: str | Path, *, provider: str = "cpu", threads: int | None = None, tf32: bool = False,
                   spin: bool = True):
    """An InferenceSession on ``provider`` (cpu or cuda). CUDA runs with TF32 off unless asked:
    ONNX Runtime enables it by default, which costs parity with a float32 reference. ``spin=False``: the
    intra-op threads sleep between operators instead of spin-waiting, which leaves the cores to the process's
    other threads (a server's HTTP thread, on a machine of few cores)."""
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
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [(name, {"use_tf32": int(tf32)})] if provider == "cuda" else [name]
    if provider == "cuda" and hasattr(ort, "preload_dlls"):
        try:  # CUDA and cuDNN from pip packages (torch's), for a process that has not imported torch
            ort.preload_dlls()
        except Exception:  # a system CUDA may still be found by the loader; the check below decides
            pass
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for invalid or corrupt files
        raise AlibiExportError(f"onnxruntime cannot load {str(path)!r}: {str(e).splitlines()[0]}") from None
    if session.get_providers()[0] != name:
        # ONNX Runtime logs a CUDA library it cannot load and carries on with the CPU alone: refuse, so that
        # `--provider cuda` never measures or serves the CPU
        raise AlibiExportError(f"{name} did not load (ONNX Runtime runs {session.get_providers()}). Note: check "
                               "that the CUDA and cuDNN libraries onnxruntime-gpu needs are on the library path")
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
