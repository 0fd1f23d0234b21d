"""One KV-cache tensor shared by requests of different lengths, re-laid on the device.

The KV-cache export appends each step's keys at column ``past`` of every row and counts a row's ALiBi
positions over its mask (``alibi.token_positions``: the cumulative sum of real tokens), so a row may sit
anywhere in the tensor as long as the columns it does not own are masked. Here every row is aligned on
the right (its newest token in the last column) and the columns on its left that it does not own are
holes: masked (0 in ``mask``) and filled with what the model itself writes for a padding token. The
filler matters for the ``onnx`` attention form, whose cache carries the padding mark in the keys (a
zero key there would be attended); for the other forms the mask alone hides the hole.

Rows join (``merge``: the shorter side gets holes on its left) and leave (``keep``: the columns that
every remaining row masks are cut). Both run as small ONNX graphs (``DeviceOps``) on the session's own
provider through IO binding, so on CUDA the cache never leaves the GPU, not even when the batch
changes: a join or a leave costs one device copy of the cache, about what a decode step's own Concat
of past and present costs. (Copying it through host memory instead made every change of a 64-row
batch a 1.5 GB round trip on an H200; BENCHMARKS.md, the GPU serving sections.) On CPU the same
graphs run on host memory, so the CPU tests exercise the GPU's code path.
"""
from __future__ import annotations

import numpy as np

__all__ = ["BatchCache", "DeviceOps", "padding_entries"]

_ONNX_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10}  # onnx.TensorProto.FLOAT, FLOAT16


def padding_entries(session) -> list[np.ndarray]:
    """What the model writes into its cache for a padding token: one (1, kv heads, 1, width) array per
    past input, taken from a prefill of [pad, token] whose first column is masked (a static-cache file's
    buffers are allocated for those 2 columns)."""
    ids = np.zeros((1, 2), dtype=np.int64)
    mask = np.array([[0, 1]], dtype=np.int64)
    _, presents = session.step(ids, mask, session.new_cache(1, 2))
    return [p.numpy()[:, :, :1, :].copy() for p in presents]


class DeviceOps:
    """The cache's re-layouts and the prefill's last-token logits, as ONNX graphs on ``session``'s provider.

    ONNX Runtime offers no slicing or concatenation of an ``OrtValue`` in place, and the serving path
    needs no other GPU library, so the few tensor operations the engine needs are graphs of standard
    operators, run through IO binding with their outputs left on the session's device."""

    def __init__(self, session, n_past: int):
        self.device, self.device_id = session.device, session.device_id
        dtype = _ONNX_TYPES[np.dtype(session.cache_dtype)]
        # The wider side is copied once, the narrower one widened then copied (at most one side is narrower)
        self._merge = {side: self._session(_merge_graph(n_past, dtype, side), session) for side in "ab"}
        self._keep = self._session(_keep_graph(n_past, dtype), session)
        self._last = self._session(_last_graph(dtype), session)

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

    def last_logits(self, logits) -> np.ndarray:
        """(B, L, V) logits (an OrtValue on the device) -> the last position's, (B, V) float32 on the host:
        the only logits a prefill needs, without copying the other L - 1 positions' down."""
        binding = self._last.io_binding()
        binding.bind_ortvalue_input("logits", logits)
        binding.bind_output("last", "cpu")
        self._last.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    # ------------------------------------------------------------------ running a graph
    def _session(self, model, session):
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


def _last_graph(dtype: int):
    """last = float32(logits[:, -1])."""
    from onnx import TensorProto, helper, numpy_helper

    index = numpy_helper.from_array(np.array(-1, dtype=np.int64), "index")
    nodes = [helper.make_node("Gather", ["logits", "index"], ["picked"], axis=1),
             helper.make_node("Cast", ["picked"], ["last"], to=TensorProto.FLOAT)]
    return _model(nodes, [helper.make_tensor_value_info("logits", dtype, ["b", "l", "v"])],
                  [helper.make_tensor_value_info("last", TensorProto.FLOAT, ["b", "v"])], [index])


class BatchCache:
    """The running batch's cache: ``values`` (OrtValues (B, heads, width, head width) on the session's
    device, as ``GenerationSession.step`` takes and returns them) and ``mask`` (B, width) int64.
    ``holes`` (numpy, one (1, heads, 1, width) per past input) is what fills a row's unowned columns."""

    def __init__(self, session, holes: list[np.ndarray], ops: DeviceOps | None = None):
        self.session = session
        self.ops = ops or DeviceOps(session, len(holes))
        self.holes = holes
        self.values: list | None = None
        self.mask = np.zeros((0, 0), dtype=np.int64)

    @property
    def holes(self) -> list[np.ndarray]:
        return self._holes

    @holes.setter
    def holes(self, holes: list[np.ndarray]) -> None:
        from onnxruntime import OrtValue

        s = self.session
        self._holes = holes
        self._device_holes = [OrtValue.ortvalue_from_numpy(np.ascontiguousarray(h), s.device, s.device_id)
                              for h in holes]

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def advance(self, values: list, mask: np.ndarray) -> None:
        """Take a step's presents and the mask it ran with (one column longer)."""
        self.values, self.mask = values, mask

    def new_job(self, batch: int, length: int) -> list:
        """The empty cache a prefill of ``batch`` prompts starts from."""
        return self.session.new_cache(batch)

    def decode(self, ids: np.ndarray, window) -> np.ndarray:
        """One step of every row (``ids`` (B, 1)), the cache first cut by ``window`` (values, mask) -> (values,
        mask) for a rolling window: the (B, V) logits of each row's token."""
        values, base = window(self.values, self.mask)
        mask = np.concatenate([base, np.ones((len(ids), 1), dtype=np.int64)], axis=1)  # (B, width + 1)
        logits, values = self.session.step(ids, mask, values)
        self.advance(values, mask)
        return logits[:, -1]

    def last_logits(self, logits) -> np.ndarray:
        return self.ops.last_logits(logits)

    def merge(self, values: list, mask: np.ndarray, rows: list[int] | None = None) -> None:
        """Append rows (their cache ``values`` and ``mask``, from a prefill; only ``rows`` of them if given)
        below the running ones."""
        if rows is not None:
            values, mask = self._cut(values, mask, rows)
        if self.batch == 0:
            self.values, self.mask = values, mask
            return
        width = max(self.width, mask.shape[1])
        self.values = self.ops.merge(self.values, values, self._device_holes, width)
        self.mask = np.concatenate([_pad_mask(self.mask, width), _pad_mask(mask, width)], axis=0)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order); cut the leading columns that all of them mask."""
        if not rows:
            self.values, self.mask = None, np.zeros((0, 0), dtype=np.int64)
            return
        self.values, self.mask = self._cut(self.values, self.mask, rows)

    def _cut(self, values: list, mask: np.ndarray, rows: list[int]) -> tuple[list, np.ndarray]:
        kept = mask[rows]
        first = int(kept.any(axis=0).argmax())  # the first column some row still owns
        if rows == list(range(len(mask))) and first == 0:
            return values, mask
        return self.ops.keep(values, rows, first), np.ascontiguousarray(kept[:, first:])


def _pad_mask(mask: np.ndarray, width: int) -> np.ndarray:
    return np.concatenate([np.zeros((mask.shape[0], width - mask.shape[1]), dtype=np.int64), mask], axis=1)
