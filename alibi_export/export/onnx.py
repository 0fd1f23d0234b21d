"""PyTorch checkpoint -> ONNX file whose ALiBi bias is built from the runtime sequence length."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.inliner
import torch

from .._io import check_replaceable, check_writable_dir
from ..artifacts import PRODUCER, OnnxMetadata
from ..attention_contract import DOMAIN, MASKED_OP_TYPE, OP_TYPE
from ..checkpoint import Checkpoint
from ..errors import ExportError
from ..model import AlibiLM
from ..progress import Steps
from ._weights import attach_weights, weights_nbytes
from .attention_function import DEFAULT_Q_CHUNK, attention_function
from .dynamo import dynamo_export, node_slopes
from .onnx_file import write_onnx, written_by_alibi_export
from .quantize import DEFAULT_BLOCK_SIZE, check_quantize_options, quantize_model

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
    metadata: OnnxMetadata


def _trace(model: AlibiLM, *, dynamic_len: bool, batch: int, seq_len: int, opset: int,
           form: str = "plugin") -> tuple[onnx.ModelProto, dict]:
    example = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    dynamic = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")},) if dynamic_len else None
    return dynamo_export(model, model, (example,), dynamic=dynamic, opset=opset, form=form,
                         input_names=["input_ids"], output_names=["logits"])


def _export_model(checkpoint: Checkpoint, dtype: str) -> AlibiLM:
    """The module to trace: the checkpoint's own when it is already in ``dtype`` (a second copy of the
    weights would raise the export's peak memory by 1x; the export swaps attention only inside a
    context manager that restores it), else a copy allocated directly in ``dtype``, its buffers (slopes,
    frequencies, which the state dict does not hold) copied from the checkpoint's. The slopes stay float32
    in every dtype (model.Alibi._apply): MPT's reach 2^-32, which fp16 rounds to 0."""
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
        # Plain causal attention has all zeros. A zero slope among others is that head's fact only (the
        # body then masks after multiplying); the slopes are float32 whatever the export's dtype.
        zeros = [s == 0 for s in attrs["slopes"]]
        for masked, op in ((False, OP_TYPE), (True, MASKED_OP_TYPE)):
            if op in used:
                proto.functions.append(attention_function(opset, q_chunk=q_chunk, masked=masked,
                                                          causal=bool(attrs["causal"]), alibi=not all(zeros),
                                                          zero_slope=any(zeros),
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
    proto.producer_name = PRODUCER
    return proto


def _check_static_cache(length, *, kv_cache: bool, attention: str, dtype: str, position: str) -> None:
    """The static-cache form's limits, each refused in one line before any tracing."""
    if not kv_cache:
        raise ExportError("--static-cache is a form of the KV cache. Note: add --kv-cache")
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ExportError(f"--static-cache must be a positive number of tokens, got {length!r}")
    if attention not in ("decomposed", "onnx"):
        raise ExportError(f"--static-cache has its own attention (ONNX Runtime's GroupQueryAttention). Note: drop "
                          f"--attention {attention}")
    if dtype != "float32" and attention != "onnx":
        # The bias form's op takes its bias in the model's dtype: the ALiBi term reaches m*L, which fp16 cannot
        # hold to the precision softmax needs. The folded form (--attention onnx) sums it in the kernel's float32.
        raise ExportError("--static-cache is float32 only in its default form: the op takes the ALiBi bias in the "
                          "model's dtype. Note: add --attention onnx (ALiBi folded into the heads; ONNX Runtime "
                          "CUDA) or drop --dtype float16")
    if position in ("rotary", "t5"):
        raise ExportError(f"--static-cache carries position biases only, not {position} positions. Note: use the "
                          "concatenating --kv-cache form")


def export_onnx(checkpoint: Checkpoint, out: str | Path, *, dynamic_len: bool = True, opset: int | None = None,
                dtype: str = "float32", attention: str = "decomposed", batch: int = 1, seq_len: int | None = None,
                q_chunk: int = DEFAULT_Q_CHUNK, kv_cache: bool = False, static_cache: int | None = None,
                logits_to_keep: bool = False, ort_fusions: bool = False,
                quantize: str | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                external_data_threshold: int | None = None, check=None) -> ExportResult:
    """Export ``checkpoint`` to ``out``.

    With ``dynamic_len`` batch and sequence are dynamic and the ALiBi bias is generated in the graph
    from the input's runtime shape; the only position constant in the file is the H slopes. Without
    it the graph is fixed to ``(batch, seq_len)`` (``seq_len`` defaults to the training length).
    ``attention="plugin"`` keeps one AlibiAttention node per block (with its function body) for
    TensorRT's plugin; ``"decomposed"`` inlines standard operators; ``"onnx"`` uses the standard
    Attention operator (opset 23, its default there), causal with no mask, the bias folded into extra
    head dimensions (see :mod:`alibi_export.export.attention_op`). ``opset`` defaults to
    18 for the other forms. ``kv_cache`` exports the decoder with ``attention_mask`` and past/present
    tensors (see :mod:`alibi_export.export.kv_cache`); it needs ``dynamic_len``. ``static_cache`` (with
    ``kv_cache``: the longest prompt + generation) makes the cache a buffer the graph updates in place instead of
    concatenating it each step (see :mod:`alibi_export.export.kv_buffer`). ``logits_to_keep`` (with ``kv_cache``)
    adds that int64 scalar input: 0 computes every position's logits, N the last N's only (a prefill samples
    from one; see :func:`.kv_cache.keep_last_logits`). ``ort_fusions`` (onnx
    form only) rewrites the LayerNorm, residual and bias tails into ONNX Runtime's fused operators (see
    :mod:`alibi_export.export.ort_fusions`): faster in ONNX Runtime, loadable nowhere else. ``quantize``
    ("int8" or "int4", CPU forms only; ``block_size`` for both) quantizes the weight products with ONNX
    Runtime's tools (see :mod:`alibi_export.export.quantize`).
    When the weights exceed ``external_data_threshold`` bytes (default: just under protobuf's 2 GB
    limit) they go to one data file ``OUT.data`` beside the file, named by a relative location so the
    pair can be moved together; tests lower the threshold to run that path on tiny models.
    ``check(path)`` runs on the complete file under a staging name before it takes ``out``'s place (see
    :func:`.onnx_file.write_onnx`): a file that fails it never replaces ``out``.
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
    if logits_to_keep and not kv_cache:
        raise ExportError("--logits-to-keep applies to the KV-cache decoder. Note: add --kv-cache")
    check_quantize_options(quantize, block_size, attention=attention, dtype=dtype)
    if static_cache is not None:
        _check_static_cache(static_cache, kv_cache=kv_cache, attention=attention, dtype=dtype,
                            position=checkpoint.config.position)
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
        from .kv_cache import LOGITS_TO_KEEP, kv_input_names, kv_output_names, trace_kv_cache

        proto, weights = trace_kv_cache(model, opset=opset, form=attention, buffer=static_cache is not None)
        names = kv_input_names(cfg.n_layer) + ([LOGITS_TO_KEEP] if logits_to_keep else []), kv_output_names(cfg.n_layer)
    else:
        proto, weights = _trace(model, dynamic_len=dynamic_len, batch=batch if not dynamic_len else 2, seq_len=trace_len,
                       opset=opset, form=attention)
        names = ["input_ids"], ["logits"]
    steps.next()
    metadata = OnnxMetadata(
        version=__version__, position=cfg.position,
        slopes=tuple(node_slopes(model)) if cfg.position == "alibi" else (), train_len=cfg.train_len,
        source_name=checkpoint.path.resolve().name, source_sha256=checkpoint.sha256, dynamic_len=dynamic_len,
        dtype=dtype, attention=attention, kv_cache=kv_cache, ort_fusions=ort_fusions, config=cfg.to_dict(),
        tokenizer=checkpoint.tokenizer.to_str(),  # the tokenizer travels inside: a served file needs nothing else
        quantization=quantize or "", quantization_block_size=block_size if quantize else 0,
        static_cache=static_cache or 0, logits_to_keep=logits_to_keep)
    proto = _finish(proto, opset=opset, inline=attention == "decomposed", q_chunk=q_chunk,
                    metadata=metadata.to_props())
    if logits_to_keep:
        from .kv_cache import keep_last_logits

        keep_last_logits(proto)  # before fusions and quantization: they see the head's product as it will run
    if ort_fusions:
        from .ort_fusions import fuse_for_onnxruntime

        attach_weights(proto, weights)  # ONNX Runtime's optimizer reads them
        weights = {}
        proto, fused = fuse_for_onnxruntime(proto, n_head=cfg.n_head, d_model=cfg.d_model)
        proto.producer_name = PRODUCER  # the optimizer writes its own; ours marks a file this tool may replace
        log.info("ONNX Runtime fusions: %s", fused)
    if quantize:
        attach_weights(proto, weights)  # ONNX Runtime's quantization tools read them
        weights = {}
        proto = quantize_model(proto, quantize, block_size=block_size)
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))  # int4 needs 21
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, metadata.to_props())
        proto.producer_name = PRODUCER  # the tools write their own; ours marks a file this tool may replace
    steps.next()
    # Protobuf holds at most 2 GB: past that the weights go to one data file beside OUT.
    threshold = _TWO_GB - (64 << 20) if external_data_threshold is None else external_data_threshold
    large = weights_nbytes(proto, weights) > threshold
    if not large:
        attach_weights(proto, weights)
    write_onnx(proto, out, external_data=large, weights=weights if large and weights else None, check=check)
    steps.close()
    log.info("wrote %s (opset %d, %s, %s attention)", out, opset, dtype, attention)
    return ExportResult(out, *names, dynamic_len, opset, dtype, attention, metadata)
