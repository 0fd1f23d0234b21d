"""ONNX -> TensorRT engine, with a length profile, precision, timing cache and a JSON sidecar.

Both TensorRT families build here: full TensorRT (``tensorrt``: weak or strong typing, the AlibiAttention
plugin) and TensorRT-RTX (``tensorrt_rtx_bindings``: strongly typed networks only, no Python plugins, builds
without a GPU). The sidecar beside the engine records what the engine is: profile ranges, precision, backend
and version, attention form, plugin, and the SHA-256 of the ONNX file it came from.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..._io import atomic_files, atomic_path, check_replaceable, check_writable_dir, sha256_file
from ...artifacts import PRODUCER, EngineSidecar, is_our_engine, read_metadata, sidecar_path
from ...attention_contract import OP_TYPE
from ...errors import EngineBuildError
from ...progress import Steps, on_terminal, progress
from ._trt import BACKENDS, backend_of, import_trt

__all__ = ["LengthProfile", "BuildResult", "build_engine", "attention_form", "PRECISIONS"]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
_ONNX_DTYPE = {"float32": "fp32", "float16": "fp16"}
_NATIVE, _PLUGIN, _DECOMPOSED = "native attention", "plugin", "decomposed"


@dataclass(frozen=True)
class LengthProfile:
    """min/opt/max of the sequence length and of the batch (Polygraphy's Profile, for ``input_ids``)."""

    min_len: int
    opt_len: int
    max_len: int
    batch: tuple[int, int, int] = (1, 1, 1)

    def check(self) -> None:
        for what, (lo, opt, hi) in (("length", (self.min_len, self.opt_len, self.max_len)), ("batch", self.batch)):
            if lo < 1:
                raise EngineBuildError(f"invalid {what} profile: sizes must be positive. Note: got min {lo}")
            if lo > opt:
                raise EngineBuildError(f"invalid {what} profile: min > opt. Note: expected min <= opt <= max, "
                                       f"got min {lo} > opt {opt}")
            if opt > hi:
                raise EngineBuildError(f"invalid {what} profile: opt > max. Note: expected min <= opt <= max, "
                                       f"got opt {opt} > max {hi}")

    def shapes(self) -> dict[str, list[int]]:
        return {k: [b, n] for k, b, n in zip(("min", "opt", "max"), self.batch,
                                             (self.min_len, self.opt_len, self.max_len))}


@dataclass
class BuildResult:
    engine_path: Path
    sidecar_path: Path
    backend: str
    backend_version: str
    precision: str
    attention: str
    layer_types: dict[str, int]
    build_seconds: float
    sidecar: EngineSidecar = field(repr=False)


def attention_form(onnx_path: str | Path) -> str:
    """"plugin" (AlibiAttention nodes), "native attention" (ONNX Attention) or "decomposed"; raises
    EngineBuildError for a file without ALiBi attention."""
    from ...artifacts import check_onnx_file

    meta = read_metadata(onnx_path)
    ops = check_onnx_file(onnx_path)  # the graph's and its functions' op types
    if OP_TYPE in ops:
        return _PLUGIN
    if meta.position != "alibi":
        raise EngineBuildError(f"{str(onnx_path)!r} has no ALiBi attention. Note: expected an alibi-export ONNX "
                               f"file of an ALiBi model, got position method {meta.position}")
    return _NATIVE if "Attention" in ops else _DECOMPOSED


def _logger(trt):
    class Logger(trt.ILogger):
        """Forwards TensorRT's messages to logging and keeps the errors for the one-line message."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(" ".join(str(msg).split()))
                log.info("%s", msg)  # raised in the one-line error; not logged twice
            elif severity == trt.ILogger.Severity.WARNING:
                log.debug("%s", msg)  # e.g. one per Loop about its trip count; not the user's concern

    return Logger()


def _progress_monitor(trt):
    """TensorRT's build phases as nested bars (set only on a terminal: elsewhere nothing would show)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.bars[phase_name] = progress(desc=phase_name, total=num_steps, unit="step",
                                             position=len(self.bars) + 1)  # below the build's own bar

        def step_complete(self, phase_name, step):
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)  # steps count from 0
            return True  # keep building

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return Monitor()


def _typing(trt, backend: str, onnx_dtype: str, precision: str) -> tuple[bool, list]:
    """(strongly typed network?, builder flags) for the requested precision, or a one-line error."""
    native = _ONNX_DTYPE.get(onnx_dtype, "fp32")
    if precision == native:
        return backend == "tensorrt-rtx" or native != "fp32", []
    flag = getattr(trt.BuilderFlag, precision.upper(), None)
    if native == "fp32" and backend == "tensorrt" and flag is not None:
        return False, [flag]  # weakly typed: TensorRT may run layers in fp16/bf16
    why = ("TensorRT-RTX builds strongly typed networks only" if backend == "tensorrt-rtx"
           else "this TensorRT has no weakly typed precision flags" if flag is None
           else "a strongly typed (fp16) ONNX file keeps its own types")
    hint = "export with --dtype float16" if precision == "fp16" else "pass no precision flag"
    raise EngineBuildError(f"cannot build a {precision} engine from a {onnx_dtype} ONNX file: {why}. Note: the "
                           f"engine's precision is the ONNX file's ({native}); {hint}")


def _parse(trt, builder, logger, onnx_path: Path, form: str, strongly_typed: bool):
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if form == _PLUGIN:
        import onnx

        from .plugin import PLUGIN_NAMESPACE, register_plugin

        register_plugin(trt)
        if hasattr(trt, "OnnxParserFlag") and hasattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE"):
            parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)  # the plugin, not the function body
        proto = onnx.load(str(onnx_path))
        for node in proto.graph.node:  # the parser looks the creator up in the node's plugin_namespace
            if node.op_type == "AlibiAttention" and any(a.name == "bias_bf16" for a in node.attribute):
                raise EngineBuildError(f"{str(onnx_path)!r} has Falcon's bf16 ALiBi bias, which the AlibiAttention "
                                       "plugin does not compute. Note: build from the default (decomposed) export")
            if node.op_type == "AlibiAttention" and not any(a.name == "plugin_namespace" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE))
        ok = parser.parse(proto.SerializeToString(), str(onnx_path))
    else:
        ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        first = parser.get_error(0).desc() if parser.num_errors else (logger.errors or ["unknown error"])[0]
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {str(onnx_path)!r}: {' '.join(first.split())}")
    attention_cls = getattr(trt, "IAttentionOutputLayer", None)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if attention_cls is not None and layer.type == trt.LayerType.ATTENTION_OUTPUT:
            layer.__class__ = attention_cls  # downcast, as Polygraphy does; get_layer returns ILayer
            # fp32 has no dedicated attention kernel: let TensorRT decompose it there rather than fail.
            layer.attention.decomposable = True
    return network, parser  # the parser must outlive the network


def _timing_cache(config, path: Path):
    """The timing cache in ``path`` (an empty one when there is no file). The file is written back after the
    build, so one that TensorRT cannot read (a user's file given by mistake) is refused before anything runs."""
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # noqa: BLE001 - TensorRT's own exception types differ between releases
        cache = None
    if data and (cache is None or not len(memoryview(cache.serialize()))):
        raise EngineBuildError(f"{str(path)!r} is not a TensorRT timing cache: refusing to read or replace it. "
                               "Note: pass a new path, or a cache an earlier build wrote")
    return cache


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, min_len: int, opt_len: int, max_len: int,
                 batch: tuple[int, int, int] = (1, 1, 1), precision: str | None = None,
                 timing_cache: str | Path | None = None, backend: str | None = None) -> BuildResult:
    """Build a TensorRT engine for ``onnx_path`` (an alibi-export file, dynamic batch x sequence).

    ``precision`` defaults to the ONNX file's dtype; ``backend`` ("tensorrt" or "tensorrt-rtx") defaults to
    the installed one (full TensorRT first). ``timing_cache`` is read when it exists and written back.
    Writes the engine and its sidecar (``ENGINE.json``) atomically.
    """
    from ... import __version__

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    check_writable_dir(engine_path.parent)
    check_replaceable(engine_path, is_our_engine, "engine")
    if sidecar_path(engine_path).exists() and not is_our_engine(engine_path):
        raise EngineBuildError(f"{str(sidecar_path(engine_path))!r} exists and was not written by alibi-export: "
                               "refusing to replace it. Note: choose another engine path")
    profile = LengthProfile(min_len, opt_len, max_len, tuple(batch))
    profile.check()
    if precision is not None and precision not in PRECISIONS:
        raise EngineBuildError(f"unknown precision {precision!r}. Note: expected one of {PRECISIONS}")
    if backend is not None and backend not in BACKENDS:
        raise EngineBuildError(f"unknown backend {backend!r}. Note: expected one of {BACKENDS}")
    form = attention_form(onnx_path)
    meta = read_metadata(onnx_path)
    if meta.kv_cache:
        # TensorRT-RTX 1.7's parser: "TensorRT only supports Attention nodes with one output" (the onnx form's
        # present outputs); the other forms' caches are not built either. An engine runs the plain export.
        raise EngineBuildError(f"{onnx_path} is a KV-cache decoder (exported with --kv-cache), which TensorRT "
                               "cannot build. Note: build engines from an export without --kv-cache "
                               "(--attention onnx)")
    if meta.ort_fusions:
        raise EngineBuildError(f"{onnx_path} holds ONNX Runtime's fused operators (exported with --ort-fusions), "
                               "which TensorRT cannot parse. Note: export without --ort-fusions for TensorRT")
    if meta.quantization:
        raise EngineBuildError(f"{onnx_path} is quantized ({meta.quantization}) with ONNX Runtime's "
                               "CPU operators, which TensorRT cannot parse. Note: build engines from an unquantized "
                               "export (--attention onnx)")
    onnx_dtype = meta.dtype
    precision = precision or _ONNX_DTYPE.get(onnx_dtype, "fp32")
    trt = import_trt(backend)
    backend = backend_of(trt)
    if form == _PLUGIN and backend == "tensorrt-rtx":
        raise EngineBuildError(f"TensorRT-RTX {trt.__version__} cannot run the AlibiAttention Python plugin (its "
                               "parser aborts the process after create_plugin; its networks have no add_plugin). "
                               "Note: for TensorRT-RTX export with `--attention onnx` (native attention); the "
                               "plugin needs the full TensorRT (--backend tensorrt)")
    strongly_typed, flags = _typing(trt, backend, onnx_dtype, precision)
    steps = Steps(f"engine {engine_path.name}", ("parse", f"build ({backend})", "write"))
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path, form, strongly_typed)
    layer_types = dict(Counter(str(network.get_layer(i).type).split(".")[-1] for i in range(network.num_layers))
                       .most_common())
    steps.next()
    config = builder.create_builder_config()
    monitor = _progress_monitor(trt) if on_terminal() else None  # held here while TensorRT calls it
    if monitor is not None:
        config.progress_monitor = monitor
    for flag in flags:
        config.set_flag(flag)
    shapes = profile.shapes()
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(network.get_input(0).name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(opt_profile)
    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None and backend == "tensorrt-rtx":
        log.warning("TensorRT-RTX ignores timing caches (a no-op since 1.2): %s is not used", cache_path)
        cache_path = None
    if cache_path is not None:
        config.set_timing_cache(_timing_cache(config, cache_path), ignore_mismatch=False)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        said = logger.errors[-1] if logger.errors else "no error message"
        hint = (" Note: TensorRT-RTX 1.7 cannot build the decomposed export's attention Loop; export with "
                "`--attention onnx` (native attention)" if form == _DECOMPOSED and backend == "tensorrt-rtx" else "")
        raise EngineBuildError(f"{backend} {trt.__version__} failed to build an engine from {str(onnx_path)!r}."
                               f"{hint}. TensorRT said: {said}".replace("..", "."))
    steps.next()
    if cache_path is not None:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    engine_sha256 = hashlib.sha256(memoryview(plan)).hexdigest()
    sidecar = EngineSidecar(
        engine=engine_path.name, engine_sha256=engine_sha256, created_by=f"{PRODUCER} {__version__}",
        backend=backend, backend_version=trt.__version__, precision=precision, strongly_typed=strongly_typed,
        onnx_dtype=onnx_dtype, attention=form, plugin=_plugin_info() if form == _PLUGIN else None,
        profile={"input": network.get_input(0).name, **shapes}, train_len=meta.train_len,
        onnx=Path(onnx_path).name, onnx_sha256=sha256_file(onnx_path),
        timing_cache=cache_path.name if cache_path else None,
        layer_types=layer_types, build_seconds=round(seconds, 3))
    side = sidecar_path(engine_path)
    # Engine and sidecar are written as a pair: both staged, then renamed; the sidecar names the engine's
    # SHA-256, so a reader detects a pair that a crash between the two renames could mismatch.
    with atomic_files([engine_path, side]) as (tmp_engine, tmp_side):
        tmp_engine.write_bytes(memoryview(plan))
        tmp_side.write_text(sidecar.to_json())
    steps.close()
    log.info("built %s (%s %s, %s, %s) in %.1fs", engine_path, backend, trt.__version__, precision, form, seconds)
    if Path(onnx_path).resolve().parent != engine_path.resolve().parent:
        log.warning("validate, ppl and the runner look for %s beside %s (the sidecar names it, not its folder): "
                    "copy it there", Path(onnx_path).name, engine_path.name)
    return BuildResult(engine_path, side, backend, trt.__version__, precision, form, layer_types, seconds, sidecar)


def _plugin_info() -> dict:
    from .plugin import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

    return {"name": PLUGIN_NAME, "namespace": PLUGIN_NAMESPACE, "version": PLUGIN_VERSION}
