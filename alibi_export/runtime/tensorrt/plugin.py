"""The ``AlibiAttention`` TensorRT plugin: one fused ALiBi-attention kernel per attention block.

An ``IPluginV3`` (core, build and runtime capabilities) written against TensorRT's Python plugin API, with
its ``IPluginCreatorV3One``. Its name is the ONNX op type the exporter writes (``--attention plugin``), so
TensorRT's ONNX parser maps each node to it; attributes arrive as plugin fields and are serialized into the
engine. ``enqueue`` launches :func:`alibi_export.kernels.launch_alibi_attention` (Triton) on TensorRT's
stream with TensorRT's device pointers.

Executing it needs the full TensorRT: TensorRT-RTX 1.7 has the same Python classes (so everything here can
be instantiated and called directly, which the tests do) but cannot run Python plugins in an engine.
The classes are created on first use, against whichever TensorRT family :mod:`._trt` imports.
"""
from __future__ import annotations

import functools
import logging
import math
from types import ModuleType

import numpy as np

from ...attention_contract import ATTRIBUTES, DOMAIN, OP_TYPE, OP_VERSION
from ._trt import import_trt

__all__ = ["PLUGIN_NAME", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "plugin_creator", "register_plugin",
           "plugin_classes"]

log = logging.getLogger(__name__)

PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION = OP_TYPE, DOMAIN, str(OP_VERSION)
_HEAD_DIMS = (16, 32, 64, 128)  # the kernel's supported head sizes


@functools.lru_cache(maxsize=None)
def plugin_classes(trt: ModuleType) -> tuple[type, type]:
    """(plugin class, creator class) bound to the TensorRT module ``trt``."""
    dtypes = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.BF16: "bfloat16"}

    def fields(attrs: dict, keep: list) -> "trt.PluginFieldCollection":
        """The attributes as plugin fields. A PluginField holds a raw pointer to its array: the arrays are
        appended to ``keep``, which the caller must keep alive as long as TensorRT may read the fields."""
        keep[:] = [np.array([attrs["num_heads"]], np.int32), np.array([attrs["head_dim"]], np.int32),
                   np.array(attrs["slopes"], np.float32), np.array([attrs["scale"]], np.float32),
                   np.array([attrs["causal"]], np.int32)]
        types = (trt.PluginFieldType.INT32, trt.PluginFieldType.INT32, trt.PluginFieldType.FLOAT32,
                 trt.PluginFieldType.FLOAT32, trt.PluginFieldType.INT32)
        return trt.PluginFieldCollection([trt.PluginField(name, data, t)
                                          for name, data, t in zip(ATTRIBUTES, keep, types)])

    def parse(fc) -> dict:
        """Attributes from a PluginFieldCollection (from the ONNX node or a serialized engine)."""
        raw = {f.name: np.asarray(f.data).reshape(-1) for f in fc}
        missing = {"num_heads", "head_dim", "slopes"} - set(raw)
        if missing:
            raise ValueError(f"{PLUGIN_NAME}: missing attributes {sorted(missing)}")
        heads, head_dim = int(raw["num_heads"][0]), int(raw["head_dim"][0])
        slopes = [float(s) for s in raw["slopes"]]
        if len(slopes) != heads:
            raise ValueError(f"{PLUGIN_NAME}: expected {heads} slopes, got {len(slopes)}")
        if head_dim not in _HEAD_DIMS:
            raise ValueError(f"{PLUGIN_NAME}: head_dim must be one of {_HEAD_DIMS}, got {head_dim}")
        scale = float(raw["scale"][0]) if "scale" in raw else 1.0 / math.sqrt(head_dim)
        causal = int(raw["causal"][0]) if "causal" in raw else 1
        return dict(num_heads=heads, head_dim=head_dim, slopes=slopes, scale=scale, causal=causal)

    class AlibiAttentionPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        """out = softmax(q k^T * scale + m_h (j - i)) v; q (B, H, Lq, D), k and v (B, H_kv, Lk, D)."""

        def __init__(self, attrs: dict, phase=None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_namespace, self.plugin_version = PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
            self.num_outputs = 1
            self.timing_cache_id = ""  # one kernel, no tactics: instances need no separate timing
            self.attrs = dict(attrs)
            self.phase = phase
            self._slopes = {}  # device index -> float32 (H,) CUDA tensor, made on first enqueue there
            self._field_data: list = []  # the arrays behind get_fields_to_serialize()'s raw pointers

        # -- core / build
        def get_capability_interface(self, capability_type):
            return self

        def clone(self):
            return AlibiAttentionPlugin(self.attrs, self.phase)

        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[0])]  # same shape as q, whatever the dynamic sizes

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR or desc.type not in dtypes:
                return False
            return pos == 0 or desc.type == in_out[0].desc.type  # q, k, v and out share one type

        def configure_plugin(self, inp, out):
            self._check_dims([d.desc.dims for d in inp])

        def get_workspace_size(self, inp, out):
            return 0  # the split-KV decode path takes its few fp32 bytes from PyTorch's caching allocator

        def get_valid_tactics(self):
            return []

        def get_fields_to_serialize(self):
            return fields(self.attrs, self._field_data)

        # -- runtime
        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inp, out):
            self._check_dims([d.dims for d in inp])

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            from ...kernels import launch_alibi_attention

            B, H, Lq, D = (int(x) for x in input_desc[0].dims)
            Hk, Lk = int(input_desc[1].dims[1]), int(input_desc[1].dims[2])
            launch_alibi_attention(inputs[0], inputs[1], inputs[2], outputs[0], self._slopes_ptr(),
                                   batch=B, heads=H, kv_heads=Hk, q_len=Lq, kv_len=Lk, head_dim=D,
                                   past_len=Lk - Lq, dtype=dtypes[input_desc[0].type], stream=int(stream),
                                   causal=bool(self.attrs["causal"]), scale=self.attrs["scale"])

        # -- helpers
        def _check_dims(self, dims):
            q, k = list(dims[0]), list(dims[1])
            if len(q) != 4 or len(k) != 4:
                raise ValueError(f"{PLUGIN_NAME}: q, k, v must be 4-D (B, H, L, D), got {q} and {k}")
            heads, head_dim = self.attrs["num_heads"], self.attrs["head_dim"]
            if q[1] not in (-1, heads) or q[3] not in (-1, head_dim) or k[3] not in (-1, head_dim):
                raise ValueError(f"{PLUGIN_NAME}: expected q (B, {heads}, L, {head_dim}), got q {q}, k {k}")
            if q[1] > 0 and k[1] > 0 and q[1] % k[1]:
                raise ValueError(f"{PLUGIN_NAME}: query heads {q[1]} not a multiple of key heads {k[1]}")

        def _slopes_ptr(self) -> int:
            import torch

            dev = torch.cuda.current_device()  # TensorRT runs the engine on the current device
            if dev not in self._slopes:
                self._slopes[dev] = torch.tensor(self.attrs["slopes"], dtype=torch.float32, device=dev)
                torch.cuda.synchronize(dev)  # the copy ran on PyTorch's stream; TensorRT's may not wait for it
            return self._slopes[dev].data_ptr()

    class AlibiAttentionCreator(trt.IPluginCreatorV3One):
        def __init__(self, namespace: str = PLUGIN_NAMESPACE):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = PLUGIN_NAME, namespace, PLUGIN_VERSION
            self._field_data: list = []
            self.field_names = fields(dict(num_heads=0, head_dim=0, slopes=[], scale=0.0, causal=0),
                                      self._field_data)

        def create_plugin(self, name, fc, phase):
            plugin = AlibiAttentionPlugin(parse(fc), phase)
            plugin.plugin_namespace = self.plugin_namespace
            return plugin

    return AlibiAttentionPlugin, AlibiAttentionCreator


def plugin_creator(trt: ModuleType | None = None, *, namespace: str = PLUGIN_NAMESPACE):
    """A new creator for the plugin, bound to ``trt`` (default: the installed TensorRT family)."""
    trt = trt or import_trt(why="the AlibiAttention plugin")
    return plugin_classes(trt)[1](namespace)


_registered: dict = {}


def register_plugin(trt: ModuleType | None = None, *, namespace: str = PLUGIN_NAMESPACE):
    """Register the creator with TensorRT's plugin registry under ``namespace`` (once per process); return it."""
    trt = trt or import_trt(why="the AlibiAttention plugin")
    key = (trt.__name__, namespace)
    if key not in _registered:
        creator = plugin_creator(trt, namespace=namespace)
        if not trt.get_plugin_registry().register_creator(creator, namespace):
            raise RuntimeError(f"TensorRT refused to register plugin {PLUGIN_NAME!r} in namespace {namespace!r}")
        _registered[key] = creator  # the registry does not own Python creators: keep it alive
        log.info("registered TensorRT plugin %s v%s in namespace %r", PLUGIN_NAME, PLUGIN_VERSION, namespace)
    return _registered[key]
