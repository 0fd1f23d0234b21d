"""PyTorch checkpoint -> ONNX file whose ALiBi bias is built from the runtime sequence length."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx.inliner
import torch

from .._io import check_replaceable, check_writable_dir
from ..checkpoint import Checkpoint
from ..errors import ExportError
from ..model import AlibiLM, T5Bias, attend_eager
from ..progress import Steps
from .attention_function import DEFAULT_Q_CHUNK, DOMAIN, MASKED_OP_TYPE, OP_TYPE, OP_VERSION, attention_function
from ._weights import attach_weights, detach_weights, weights_nbytes, write_external_data
from .attention_op import attention_op
from .onnx_file import write_onnx, written_by_alibi_export

__all__ = ["ExportResult", "export_onnx", "SUPPORTED_OPSETS", "ATTENTION_FORMS", "DEFAULT_OPSET"]

log = logging.getLogger(__name__)

SUPPORTED_OPSETS = range(17, 24)
DEFAULT_OPSET = 18
ATTENTION_FORMS = ("decomposed", "plugin", "onnx")
ONNX_ATTENTION_OPSET = 23  # the standard Attention operator
_TWO_GB = 2**31 - 1


@dataclass
class ExportResult:
    path: Path
    input_names: list[str]
    output_names: list[str]
    dynamic_len: bool
    opset: int
    dtype: str
    attention: str
    metadata: dict[str, str] = field(default_factory=dict)


def _attention_node(model: AlibiLM):
    """An attend() that emits one AlibiAttention node (plain causal attention when slopes are 0), or
    with a key mask (KV-cache export) one AlibiAttentionMasked node.

    ``slopes`` are the effective ones (a scaled bias folded in). Falcon's bf16 bias is no function of
    effective slopes: its node carries the raw slopes and ``bias_bf16`` = 1, ``bias_scale``, and its
    function body computes that bias (see attention_function); a plugin must refuse such a node."""
    cfg = model.config
    attrs = dict(num_heads=cfg.n_head, head_dim=cfg.head_dim, slopes=_node_slopes(model),
                 scale=1.0 / math.sqrt(cfg.head_dim), causal=1)
    if getattr(model.pos, "bf16", False):
        attrs.update(bias_bf16=1, bias_scale=float(model.pos.bias_scale))

    def attend(q, k, v, pos, past_len, key_mask=None):
        if key_mask is not None:
            return torch.onnx.ops.symbolic(f"{DOMAIN}::{MASKED_OP_TYPE}", (q, k, v, key_mask), attrs, dtype=q.dtype,
                                           shape=q.shape, version=OP_VERSION)
        return torch.onnx.ops.symbolic(f"{DOMAIN}::{OP_TYPE}", (q, k, v), attrs, dtype=q.dtype, shape=q.shape,
                                       version=OP_VERSION)

    return attend


def _node_slopes(model: AlibiLM) -> list[float]:
    """The slopes an attention node carries: effective ALiBi slopes, raw ones for the bf16 form, else zeros."""
    cfg = model.config
    if cfg.position != "alibi":
        return [0.0] * cfg.n_head
    slopes = model.pos.slopes if getattr(model.pos, "bf16", False) else model.pos.head_slopes()
    return [float(s) for s in slopes]


@contextlib.contextmanager
def _export_attention(model: AlibiLM, form: str = "plugin"):
    """Swap every block's attention for the ONNX node during export; restore on exit."""
    saved = [b.attn.attend for b in model.blocks]
    # T5's learned bias is not a function of the slopes: it keeps the decomposed math.
    attend = attend_eager if isinstance(model.pos, T5Bias) else (attention_op if form == "onnx" else _attention_node)(model)
    try:
        for b in model.blocks:
            b.attn.attend = attend
        yield
    finally:
        for b, fn in zip(model.blocks, saved):
            b.attn.attend = fn


def _dynamo_export(model: AlibiLM, module: torch.nn.Module, args: tuple, *, dynamic, opset: int, form: str,
                   input_names: list[str], output_names: list[str]) -> tuple[onnx.ModelProto, dict]:
    """torch.onnx's dynamo export of ``module`` with ``model``'s attention swapped for the ONNX node: the
    graph with its weights pending, and the weights (see :mod:`alibi_export.export._weights`)."""
    with _export_attention(model, form), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic, opset_version=opset,
                                    input_names=input_names, output_names=output_names, optimize=True,
                                    verbose=False)
    return detach_weights(program)


def _trace(model: AlibiLM, *, dynamic_len: bool, batch: int, seq_len: int, opset: int,
           form: str = "plugin") -> tuple[onnx.ModelProto, dict]:
    example = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    dynamic = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")},) if dynamic_len else None
    return _dynamo_export(model, model, (example,), dynamic=dynamic, opset=opset, form=form,
                          input_names=["input_ids"], output_names=["logits"])


def _export_model(checkpoint: Checkpoint, dtype: str) -> AlibiLM:
    """The module to trace: the checkpoint's own when it is already in ``dtype`` (a second copy of the
    weights would raise the export's peak memory by 1x; the export swaps attention only inside a
    context manager that restores it), else a copy allocated directly in ``dtype``, its buffers (slopes,
    frequencies, which the state dict does not hold) copied from the checkpoint's in ``dtype`` too."""
    source, target = checkpoint.model, getattr(torch, dtype)
    if all(p.dtype == target and p.device.type == "cpu" for p in source.parameters()) and not source.training:
        return source
    default = torch.get_default_dtype()
    torch.set_default_dtype(target)  # the parameters are allocated in the export's dtype, not float32 first
    try:
        model = AlibiLM(checkpoint.config).to(target)  # .to: the buffers built in float32 too, as before
    finally:
        torch.set_default_dtype(default)
    model.load_state_dict(source.state_dict())  # copy_ converts each tensor
    buffers = dict(source.named_buffers())  # the non-persistent ones (slopes, frequencies) are not in the state
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return model.eval()


def _finish(proto: onnx.ModelProto, *, opset: int, inline: bool, q_chunk: int, metadata: dict) -> onnx.ModelProto:
    used = {n.op_type for n in proto.graph.node}
    if OP_TYPE in used or MASKED_OP_TYPE in used:
        node = next(n for n in proto.graph.node if n.op_type in (OP_TYPE, MASKED_OP_TYPE))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        alibi = all(s > 0 for s in attrs["slopes"])  # ALiBi's are; plain causal attention has zeros
        for masked, op in ((False, OP_TYPE), (True, MASKED_OP_TYPE)):
            if op in used:
                proto.functions.append(attention_function(opset, q_chunk=q_chunk, masked=masked,
                                                          causal=bool(attrs["causal"]), alibi=alibi,
                                                          bf16=bool(attrs.get("bias_bf16", 0))))
        if inline:
            proto = onnx.inliner.inline_local_functions(proto)  # small: the weights are not in it
            kept = [o for o in proto.opset_import if o.domain != DOMAIN]
            del proto.opset_import[:]
            proto.opset_import.extend(kept)
    # onnx 1.23 writes IR 14, which onnxruntime <= 1.31 refuses: write the lowest IR the opset allows.
    proto.ir_version = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)], True)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    proto.producer_name = "alibi-export"
    return proto


def export_onnx(checkpoint: Checkpoint, out: str | Path, *, dynamic_len: bool = True, opset: int | None = None,
                dtype: str = "float32", attention: str = "decomposed", batch: int = 1, seq_len: int | None = None,
                q_chunk: int = DEFAULT_Q_CHUNK, kv_cache: bool = False, ort_fusions: bool = False,
                external_data_threshold: int | None = None) -> ExportResult:
    """Export ``checkpoint`` to ``out``.

    With ``dynamic_len`` batch and sequence are dynamic and the ALiBi bias is generated in the graph
    from the input's runtime shape; the only position constant in the file is the H slopes. Without
    it the graph is fixed to ``(batch, seq_len)`` (``seq_len`` defaults to the training length).
    ``attention="plugin"`` keeps one AlibiAttention node per block (with its function body) for
    TensorRT's plugin; ``"decomposed"`` inlines standard operators; ``"onnx"`` uses the standard
    Attention operator (opset 23, its default there), causal with no mask, the bias folded into extra
    head dimensions (see :mod:`alibi_export.export.attention_op`). ``opset`` defaults to
    18 for the other forms. ``kv_cache`` exports the decoder with ``attention_mask`` and past/present
    tensors (see :mod:`alibi_export.export.kv_cache`); it needs ``dynamic_len``. ``ort_fusions`` (onnx
    form only) rewrites the LayerNorm, residual and bias tails into ONNX Runtime's fused operators (see
    :mod:`alibi_export.export.ort_fusions`): faster in ONNX Runtime, loadable nowhere else.
    When the weights exceed ``external_data_threshold`` bytes (default: just under protobuf's 2 GB
    limit) they go to one data file ``OUT.data`` beside the file, named by a relative location so the
    pair can be moved together; tests lower the threshold to run that path on tiny models.
    """
    from .. import __version__

    opset = opset or (ONNX_ATTENTION_OPSET if attention == "onnx" else DEFAULT_OPSET)
    if attention == "onnx" and opset < ONNX_ATTENTION_OPSET:
        raise ExportError(f"the onnx attention form needs opset {ONNX_ATTENTION_OPSET}. Note: expected opset >= "
                          f"{ONNX_ATTENTION_OPSET}, got {opset}")
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"unsupported opset {opset}. Note: expected {SUPPORTED_OPSETS.start}.."
                          f"{SUPPORTED_OPSETS.stop - 1}")
    if dtype not in ("float32", "float16"):
        raise ExportError(f"unsupported dtype {dtype!r}. Note: expected float32 or float16")
    if attention not in ATTENTION_FORMS:
        raise ExportError(f"unknown attention form {attention!r}. Note: expected one of {ATTENTION_FORMS}")
    if ort_fusions and attention != "onnx":
        raise ExportError("--ort-fusions applies to the onnx attention form. Note: add --attention onnx")
    if kv_cache and not dynamic_len:
        raise ExportError("a KV-cache export needs a dynamic length. Note: add --dynamic-len")
    out = Path(out)
    check_writable_dir(out.parent)
    check_replaceable(out, written_by_alibi_export, "ONNX file")  # before the minutes of tracing, not after
    cfg = checkpoint.config
    if kv_cache and attention == "onnx" and cfg.position == "rotary":
        # Rotary rotates every cached key by its position at each step; this form's op appends raw keys.
        raise ExportError("the onnx attention form has no KV cache for rotary positions. Note: use the "
                          "decomposed form (the default)")
    seq_len = seq_len or cfg.train_len
    if batch < 1 or seq_len < 1:
        raise ExportError(f"batch and sequence length must be positive, got {batch} and {seq_len}")
    steps = Steps(f"export {out.name}", ("trace (torch.onnx dynamo)", "assemble graph", "write and check"))
    model = _export_model(checkpoint, dtype)
    # Trace at a length that is neither 1 nor a size the model has, so no dimension is specialized.
    trace_len = seq_len if not dynamic_len else max(2, min(seq_len, 17))
    if kv_cache:
        from .kv_cache import kv_input_names, kv_output_names, trace_kv_cache

        proto, weights = trace_kv_cache(model, opset=opset, form=attention)
        names = kv_input_names(cfg.n_layer), kv_output_names(cfg.n_layer)
    else:
        proto, weights = _trace(model, dynamic_len=dynamic_len, batch=batch if not dynamic_len else 2, seq_len=trace_len,
                       opset=opset, form=attention)
        names = ["input_ids"], ["logits"]
    steps.next()
    metadata = {
        "alibi_export.version": __version__,
        "alibi_export.position": cfg.position,
        "alibi_export.slopes": json.dumps(_node_slopes(model) if cfg.position == "alibi" else []),
        "alibi_export.train_len": str(cfg.train_len),
        "alibi_export.source_sha256": checkpoint.sha256,
        "alibi_export.source": str(checkpoint.path),
        "alibi_export.dynamic_len": str(dynamic_len).lower(),
        "alibi_export.dtype": dtype,
        "alibi_export.attention": attention,
        "alibi_export.config": json.dumps(cfg.to_dict()),
        # The tokenizer travels inside the file, so a served model needs nothing beside it.
        "alibi_export.tokenizer": checkpoint.tokenizer.to_str(),
    }
    if kv_cache:
        metadata["alibi_export.kv_cache"] = "true"
    if ort_fusions:
        metadata["alibi_export.ort_fusions"] = "true"
    proto = _finish(proto, opset=opset, inline=attention == "decomposed", q_chunk=q_chunk, metadata=metadata)
    if ort_fusions:
        from .ort_fusions import fuse_for_onnxruntime

        attach_weights(proto, weights)  # ONNX Runtime's optimizer reads them
        weights = {}
        proto, fused = fuse_for_onnxruntime(proto, n_head=cfg.n_head, d_model=cfg.d_model)
        log.info("ONNX Runtime fusions: %s", fused)
    steps.next()
    # Protobuf holds at most 2 GB: past that the weights go to one data file beside OUT.
    threshold = _TWO_GB - (64 << 20) if external_data_threshold is None else external_data_threshold
    large = weights_nbytes(proto, weights) > threshold
    if not large:
        attach_weights(proto, weights)
    write_onnx(proto, out, external_data=large, weights=weights if large and weights else None)
    steps.close()
    log.info("wrote %s (opset %d, %s, %s attention)", out, opset, dtype, attention)
    return ExportResult(out, *names, dynamic_len, opset, dtype, attention, metadata)
