"""Running the app under uvicorn, and what a served artifact may be.

SIGTERM (and Ctrl+C) stop accepting connections, let the requests in flight finish within the grace
period (uvicorn's graceful shutdown; the engine keeps running meanwhile), then stop the engine and
return normally, so the process exits 0. uvicorn re-raises the signal it caught once it has shut
down; a handler installed here absorbs it (the shutdown it asks for has already happened).
"""
from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from ..errors import AlibiExportError, MissingDependencyError
from .engine import Engine, EngineConfig

__all__ = ["resolve_model", "build", "Served", "serve"]

log = logging.getLogger(__name__)


def resolve_model(path: str | Path | None) -> tuple[Path, str]:
    """(the .onnx file, the model id clients name) of a KV-cache export, an onnxruntime-genai folder
    (its model.onnx), or with no path the shipped model (exported once into the user's cache)."""
    if path is None:
        from ..shipped import DEFAULT_MODEL_NAME
        from .model_cache import shipped_kv_export

        return shipped_kv_export(), DEFAULT_MODEL_NAME
    path = Path(path)
    if path.is_dir():
        if not (path / "model.onnx").is_file():
            raise AlibiExportError(f"{str(path)!r} is a folder without model.onnx. Note: expected a KV-cache "
                                   "export (.onnx) or an onnxruntime-genai folder (`alibi-export onnx --genai`)")
        return path / "model.onnx", path.name
    if not path.is_file():
        raise AlibiExportError(f"model {str(path)!r} not found. Note: expected a KV-cache export "
                               "(`alibi-export onnx --dynamic-len --kv-cache`) or an onnxruntime-genai folder")
    return path, path.stem


@dataclass
class Served:
    app: object
    engine: Engine
    metrics: object
    model_id: str


def build(path: str | Path | None, config: EngineConfig = EngineConfig(), *, provider: str = "cpu",
          threads: int | None = None, headers: dict | None = None, model_id: str | None = None,
          spin: bool = False) -> Served:
    """Load the model, start the engine, and make the app (not yet listening). ``model_id``: the name
    clients use (default: the export's file stem or folder name). ``spin``: ONNX Runtime's intra-op threads
    spin-wait between operators; off by default, because spinning threads hold the cores that the event loop
    needs to stream each token (BENCHMARKS.md, "Spinning threads and the inter-token tail")."""
    from ..runtime.generate import GenerationSession
    from .app import create_app
    from .metrics import ServeMetrics

    metrics = ServeMetrics()  # first: a missing [serve] extra is reported before the model loads
    onnx_path, default_id = resolve_model(path)
    model_id = model_id or default_id
    session = GenerationSession(onnx_path, provider=provider, threads=threads, spin=spin)
    engine = Engine(session, config, observer=metrics).start()
    metrics.bind(engine)
    return Served(create_app(engine, model_id, metrics, headers=headers), engine, metrics, model_id)


def serve(served: Served, *, host: str = "127.0.0.1", port: int = 8000, grace_seconds: float = 30.0,
          log_level: str = "info") -> None:
    """Serve until SIGTERM or Ctrl+C, then drain (see the module's docstring) and return."""
    try:
        import uvicorn
    except ImportError:
        raise MissingDependencyError("uvicorn", "serve", "alibi-export serve") from None
    config = uvicorn.Config(served.app, host=host, port=port, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=grace_seconds, access_log=False)
    server = uvicorn.Server(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # what uvicorn re-raises after its graceful shutdown
    try:
        server.run()
    except SystemExit:  # uvicorn's answer to a port it cannot bind (it has logged why)
        raise AlibiExportError(f"cannot listen on {host}:{port}. Note: is the port in use?") from None
    finally:
        served.app.state.draining = True
        if not served.engine.stop(timeout=grace_seconds):
            log.warning("the engine did not finish within %.0f s", grace_seconds)
