"""Runtimes that execute an exported model: ONNX Runtime here; PyTorch as the reference.

Every runtime is a Polygraphy runner (``infer(feed_dict) -> {"logits": ...}``), so parity and
perplexity code never needs to know which one it drives. :func:`runner_for` is the one place that
decides which runner fits which file, from what the file says about itself (its metadata), not its name.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import AlibiExportError
from .generate import GenerationResult, GenerationSession

__all__ = ["runner_for", "make_runner", "artifact_file", "is_genai_folder", "fixed_shape", "require_gpu",
           "GenerationSession", "GenerationResult"]

GENAI_MODEL = "model.onnx"  # the model file of an onnxruntime-genai folder (export/genai.py writes it)
_GENAI_CONFIG = "genai_config.json"


def is_genai_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / _GENAI_CONFIG).is_file() and (path / GENAI_MODEL).is_file()


def artifact_file(path: str | Path) -> Path:
    """The file that holds an export: the ``.onnx`` or ``.engine`` itself, or a genai folder's ``model.onnx``."""
    path = Path(path)
    return path / GENAI_MODEL if is_genai_folder(path) else path


def runner_for(model: str | Path, *, provider: str = "cpu", threads: int | None = None, steps: int = 0,
               attention: str = "sdpa", kv_window: int | None = None):
    """The runner for an export or a checkpoint, chosen by what it is:

    - a checkpoint folder: PyTorch (``attention``: the model's attention implementation);
    - an ``.engine``: TensorRT (built here on any machine; running it needs an NVIDIA GPU, see
      :func:`require_gpu`);
    - an ``.onnx`` file (or an onnxruntime-genai folder's ``model.onnx``) whose metadata says KV cache: ONNX
      Runtime through the cache, prefilling all but the last ``steps`` tokens of each input and decoding those
      one at a time (see :mod:`.incremental`);
    - any other ``.onnx`` file: ONNX Runtime on ``input_ids``.

    ``kv_window`` W: each token sees only its last W tokens (see :mod:`.window`); a checkpoint folder or a
    KV-cache ``.onnx`` file only, others are refused."""
    path = Path(model)
    if path.is_dir() and not is_genai_folder(path):
        from ..checkpoint import load
        from .pytorch import TorchRunner

        return TorchRunner(load(path).model.set_attention(attention), name=path.name, kv_window=kv_window)
    if kv_window is not None and (path.suffix == ".engine" or is_genai_folder(path)):
        raise AlibiExportError(f"{str(path)!r} runs without a cache this tool can cut, so it has no --kv-window. Note: "
                               "use a checkpoint folder or an `onnx --kv-cache` file")
    path = artifact_file(path)
    if path.suffix == ".engine":
        from ..artifacts import read_sidecar
        from .tensorrt.runner import TrtEngineRunner

        read_sidecar(path)  # a missing or mismatched sidecar is the first thing to say
        return TrtEngineRunner(path)  # runs on a GPU only: whoever runs it calls require_gpu first
    if path.suffix == ".onnx" or path.is_file():
        from ..artifacts import NotOurArtifact, read_metadata

        try:
            kv_cache = read_metadata(path).kv_cache
        except NotOurArtifact:  # any other ONNX file runs as given
            kv_cache = False
        if kv_cache:
            from .incremental import IncrementalRunner

            return IncrementalRunner(path, steps=steps, provider=provider, threads=threads, kv_window=kv_window)
        if kv_window is not None:
            raise AlibiExportError(f"{str(path)!r} has no KV cache, so it has no --kv-window. Note: use a checkpoint "
                                   "folder or an `onnx --kv-cache` file")
        from .onnxruntime import OrtRunner

        return OrtRunner(path, provider=provider, threads=threads)
    raise AlibiExportError(f"model {str(path)!r} not found. Note: expected an .onnx or .engine file, an "
                           "onnxruntime-genai folder or a checkpoint folder")


make_runner = runner_for  # the earlier name, kept for scripts


def fixed_shape(path: str | Path) -> tuple[int, int] | None:
    """(batch, length) of a fixed-length export (an ``.onnx`` file, or the one an ``.engine`` was built from);
    None for a dynamic one."""
    import onnx

    from ..artifacts import onnx_of_engine, read_metadata

    path = Path(path)
    if read_metadata(path).dynamic_len:
        return None
    source = onnx_of_engine(path) if path.suffix == ".engine" else path
    dims = onnx.load(str(source), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 2 or not all(d.HasField("dim_value") for d in dims):
        raise AlibiExportError(f"{str(path)!r} says it is a fixed-length export, but its input_ids has no fixed "
                               "shape. Note: re-export it")
    return dims[0].dim_value, dims[1].dim_value


def _cuda_device_count() -> int:
    """NVIDIA GPUs the driver sees (0 without a driver): asked of libcuda itself, so that neither a CPU build
    of torch nor a missing CUDA toolkit gives a wrong answer."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def require_gpu(why: str) -> None:
    """Refuse in one line, before any GPU library is loaded, what needs an NVIDIA GPU on a machine without one."""
    if _cuda_device_count() < 1:
        raise AlibiExportError(f"{why} needs an NVIDIA GPU, and this machine has none (no CUDA driver or device). "
                               "Note: run it on the GPU machine the engine was built for")
