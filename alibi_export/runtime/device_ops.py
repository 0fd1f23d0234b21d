"""Tensor operations on a KV cache held as ``OrtValue``s, run where the cache is (the session's provider).

ONNX Runtime offers no slicing or concatenation of an ``OrtValue`` in place, and the runtime needs no other GPU
library, so the few operations on a cache are graphs of standard operators, run through IO binding with their
outputs left on the session's device: the serving batch's joins and leaves (``serve.batch_cache``), the prefill's
last-position logits, and the rolling window's cut (``runtime.window``). On CUDA the cache never goes through host
memory (copying it there made every change of a 64-row batch a 1.5 GB round trip on an H200; BENCHMARKS.md, the
GPU serving sections). On CPU the same graphs run on host memory, so the CPU tests exercise the GPU's code path.
"""
from __future__ import annotations

import numpy as np

__all__ = ["DeviceOps"]

_ONNX_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10}  # onnx.TensorProto.FLOAT, FLOAT16


class DeviceOps:
    """The cache's re-layouts (a batch's joins and leaves, the window's cut) and the prefill's last-token logits,
    as ONNX graphs on ``session``'s provider (see the module's docstring)."""

    def __init__(self, session, n_past: int):
        self.device, self.device_id = session.device, session.device_id
        dtype = self._dtype = _ONNX_TYPES[np.dtype(session.cache_dtype)]
        # The wider side is copied once, the narrower one widened then copied (at most one side is narrower)
        self._merge = {side: self._session(_merge_graph(n_past, dtype, side)) for side in "ab"}
        self._keep = self._session(_keep_graph(n_past, dtype))
        self._cut = None  # made on first use: only a rolling window cuts columns
        self._last = self._session(_last_graph(dtype))

    def merge(self, a: list, b: list, holes: list, width: int) -> list:
        """Rows ``a`` above rows ``b`` (OrtValues (rows, heads, w, d)), each side widened to ``width``
        with ``holes`` (OrtValues (1, heads, 1, d)) on its left."""
        narrow = "a" if a[0].shape()[2] < width else "b"
        fill = _fill_shape((a if narrow == "a" else b)[0], width)
        return self._run(self._merge[narrow], {"fill": fill},
                         {**_named("a", a), **_named("b", b), **_named("hole", holes)}, len(a))

    def keep(self, values: list, rows: list[int], first: int) -> list:
        """Rows ``rows`` of ``values`` (in that order), from column ``first`` on."""
        return self._run(self._keep, {"rows": np.asarray(rows, dtype=np.int64),
                                      "first": np.array([first], dtype=np.int64)}, _named("a", values), len(values))

    def cut(self, values: list, first: int) -> list:
        """Every row of ``values`` from column ``first`` on: the rolling window's cut (one copy, no gather)."""
        if self._cut is None:
            self._cut = self._session(_cut_graph(len(values), self._dtype))
        return self._run(self._cut, {"first": np.array([first], dtype=np.int64)}, _named("a", values), len(values))

    def last_logits(self, logits) -> np.ndarray:
        """(B, L, V) logits (an OrtValue on the device) -> the last position's, (B, V) float32 on the host:
        the only logits a prefill needs, without copying the other L - 1 positions' down."""
        binding = self._last.io_binding()
        binding.bind_ortvalue_input("logits", logits)
        binding.bind_output("last", "cpu")
        self._last.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    # ------------------------------------------------------------------ running a graph
    def _session(self, model):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # copies; and the model's own session has the cores
        providers = ([("CUDAExecutionProvider", {"device_id": str(self.device_id)})] if self.device == "cuda"
                     else ["CPUExecutionProvider"])
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)

    def _run(self, sess, host: dict, values: dict, n: int) -> list:
        binding = sess.io_binding()
        for name, array in host.items():
            binding.bind_cpu_input(name, array)
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        for i in range(n):
            binding.bind_output(f"out{i}", self.device, self.device_id)
        sess.run_with_iobinding(binding)
        return list(binding.get_outputs())


def _named(prefix: str, values: list) -> dict:
    return {f"{prefix}{i}": v for i, v in enumerate(values)}


def _fill_shape(value, width: int) -> np.ndarray:
    rows, heads, w, d = value.shape()
    return np.array([rows, heads, width - w, d], dtype=np.int64)


def _model(nodes, inputs, outputs, initializers=()):
    from onnx import helper

    graph = helper.make_graph(nodes, "alibi_serve_cache_op", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _merge_graph(n: int, dtype: int, narrow: str):
    """out_i = Concat_0(a_i, b_i) with the ``narrow`` side first widened: Concat_2(Expand(hole_i, fill), it)."""
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("fill", TensorProto.INT64, [4])]
    nodes, outputs = [], []
    for i in range(n):
        inputs += [helper.make_tensor_value_info(f"{p}{i}", dtype, None) for p in ("a", "b", "hole")]
        nodes += [helper.make_node("Expand", [f"hole{i}", "fill"], [f"holes{i}"]),
                  helper.make_node("Concat", [f"holes{i}", f"{narrow}{i}"], [f"wide{i}"], axis=2)]
        sides = [f"wide{i}", f"b{i}"] if narrow == "a" else [f"a{i}", f"wide{i}"]
        nodes.append(helper.make_node("Concat", sides, [f"out{i}"], axis=0))
        outputs.append(helper.make_tensor_value_info(f"out{i}", dtype, ["rows", "heads", "width", "d"]))
    return _model(nodes, inputs, outputs)


def _keep_graph(n: int, dtype: int):
    """out_i = Gather_0(a_i, rows)[:, :, first:]."""
    from onnx import TensorProto, helper, numpy_helper

    inputs = [helper.make_tensor_value_info("rows", TensorProto.INT64, ["k"]),
              helper.make_tensor_value_info("first", TensorProto.INT64, [1])]
    end = numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), "end")
    axis = numpy_helper.from_array(np.array([2], dtype=np.int64), "axis")
    nodes, outputs = [], []
    for i in range(n):
        inputs.append(helper.make_tensor_value_info(f"a{i}", dtype, None))
        nodes += [helper.make_node("Gather", [f"a{i}", "rows"], [f"kept{i}"], axis=0),
                  helper.make_node("Slice", [f"kept{i}", "first", "end", "axis"], [f"out{i}"])]
        outputs.append(helper.make_tensor_value_info(f"out{i}", dtype, ["k", "heads", "width", "d"]))
    return _model(nodes, inputs, outputs, [end, axis])


def _cut_graph(n: int, dtype: int):
    """out_i = a_i[:, :, first:]."""
    from onnx import TensorProto, helper, numpy_helper

    inputs = [helper.make_tensor_value_info("first", TensorProto.INT64, [1])]
    end = numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), "end")
    axis = numpy_helper.from_array(np.array([2], dtype=np.int64), "axis")
    nodes, outputs = [], []
    for i in range(n):
        inputs.append(helper.make_tensor_value_info(f"a{i}", dtype, None))
        nodes.append(helper.make_node("Slice", [f"a{i}", "first", "end", "axis"], [f"out{i}"]))
        outputs.append(helper.make_tensor_value_info(f"out{i}", dtype, ["b", "heads", "width", "d"]))
    return _model(nodes, inputs, outputs, [end, axis])


def _last_graph(dtype: int):
    """last = float32(logits[:, -1])."""
    from onnx import TensorProto, helper, numpy_helper

    index = numpy_helper.from_array(np.array(-1, dtype=np.int64), "index")
    nodes = [helper.make_node("Gather", ["logits", "index"], ["picked"], axis=1),
             helper.make_node("Cast", ["picked"], ["last"], to=TensorProto.FLOAT)]
    return _model(nodes, [helper.make_tensor_value_info("logits", dtype, ["b", "l", "v"])],
                  [helper.make_tensor_value_info("last", TensorProto.FLOAT, ["b", "v"])], [index])
