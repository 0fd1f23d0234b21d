"""The exported graph and its weights, kept apart until the file is written.

torch.onnx's ``model_proto`` copies every weight into the protobuf; the inliner and ``onnx.save``'s
external-data path each copied them again, so a 2.2 GB model peaked near 4x its weights (BENCHMARKS,
"Large models"). Here the graph is serialized with each weight as a pending reference, the weights stay
the exporter's own tensors (views of the torch parameters where torch.onnx kept them), and they are
written once, tensor by tensor: into the protobuf for a small model, or into one external data file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

__all__ = ["detach_weights", "attach_weights", "write_external_data", "weights_nbytes"]

MIN_BYTES = 1024  # smaller initializers stay in the graph (onnx's own external-data floor)
_PENDING = "alibi-export-pending-weight"  # the location a detached weight carries until written
_ALIGN = 4096  # external tensors start on a page, so runtimes can map them


def detach_weights(program) -> tuple[onnx.ModelProto, dict]:
    """(the ModelProto with each weight >= MIN_BYTES as a pending external reference, {name: onnx_ir tensor})."""
    import onnx_ir as ir

    weights = {}
    for name, value in program.model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < MIN_BYTES:
            continue
        weights[name] = tensor
        value.const_value = ir.ExternalTensor(_PENDING, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=name)
    return program.model_proto, weights


def weights_nbytes(proto: onnx.ModelProto, weights: dict) -> int:
    return sum(t.ByteSize() for t in proto.graph.initializer) + sum(w.nbytes for w in weights.values())


def _pending(proto: onnx.ModelProto, weights: dict):
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL and t.name in weights:
            yield t, weights[t.name]


def _array(tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.numpy())  # a view of the torch tensor when it is contiguous


def attach_weights(proto: onnx.ModelProto, weights: dict) -> None:
    """Put each pending weight into the protobuf itself (a model below protobuf's 2 GB)."""
    for t, tensor in _pending(proto, weights):
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
        t.raw_data = _array(tensor).tobytes()


def write_external_data(proto: onnx.ModelProto, weights: dict, data_path: Path, location: str) -> None:
    """Write each pending weight into ``data_path``, one tensor at a time, and point the graph at it by the
    relative ``location`` (the data file's name beside the .onnx)."""
    with open(data_path, "wb") as f:
        for t, tensor in _pending(proto, weights):
            f.write(b"\0" * (-f.tell() % _ALIGN))
            offset = f.tell()
            _array(tensor).tofile(f)
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(f.tell() - offset))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
