"""The server as a Ray Serve deployment: the same FastAPI app and engine in every replica.

Each replica loads the model and runs its own engine (continuous batching within the replica); Ray
Serve's proxy spreads requests over the replicas. Every answer carries ``X-Replica-Id`` so a client (and
the tests) can see which replica served it. The model path must exist on every node that runs a replica
(a shared filesystem, or the same path copied to each machine).

Two ways to start it: ``alibi-export serve PATH --ray --replicas N`` (``serve_on_ray``), or Ray's own
``serve run alibi_export.serve.ray_app:app path=PATH replicas=N`` (``app`` builds the application from
those arguments).
"""
from __future__ import annotations

import dataclasses
import os
import signal

from ..errors import MissingDependencyError
from .engine import EngineConfig

__all__ = ["application", "app", "serve_on_ray", "REPLICA_HEADER"]

REPLICA_HEADER = "X-Replica-Id"


def _ray_serve():
    try:
        from ray import serve
    except ImportError:
        raise MissingDependencyError("ray[serve]", "ray", "alibi-export serve --ray") from None
    return serve


def application(path: str | None, config: EngineConfig = EngineConfig(), *, replicas: int = 1,
                provider: str = "cpu", threads: int | None = None, cpus_per_replica: float = 1.0):
    """A bound Ray Serve application of ``replicas`` copies of the server over ``path`` (resolved here,
    on the driver: the shipped model is exported once, before any replica starts)."""
    serve = _ray_serve()
    from .server import resolve_model

    onnx_path, model_id = resolve_model(path)
    options = dataclasses.asdict(config)

    @serve.ingress()
    class AlibiServer:
        def __init__(self, onnx_path: str, model_id: str, options: dict, provider: str, threads: int | None):
            from .server import build

            replica = serve.get_replica_context().replica_id.unique_id
            self.served = build(onnx_path, EngineConfig(**options), provider=provider, threads=threads,
                                headers={REPLICA_HEADER: replica}, model_id=model_id)

        def __serve_build_asgi_app__(self):
            return self.served.app

        def __del__(self):
            self.served.engine.stop(timeout=5)

    deployment = serve.deployment(AlibiServer, name="alibi-export", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": cpus_per_replica})
    return deployment.bind(str(onnx_path.resolve()), model_id, options, provider, threads)


def app(args: dict):
    """The builder `serve run alibi_export.serve.ray_app:app path=... replicas=...` calls (values are strings)."""
    flags = {f.name for f in dataclasses.fields(EngineConfig) if f.type in ("bool", bool)}
    fields = {f.name for f in dataclasses.fields(EngineConfig)} - flags
    config = EngineConfig(**{k: int(v) for k, v in args.items() if k in fields},
                          **{k: str(v).lower() in ("1", "true", "yes") for k, v in args.items() if k in flags})
    return application(args.get("path"), config, replicas=int(args.get("replicas", 1)),
                       provider=args.get("provider", "cpu"),
                       threads=int(args["threads"]) if args.get("threads") else None)


def serve_on_ray(path, config: EngineConfig, *, provider: str = "cpu", threads: int | None = None,
                 host: str = "127.0.0.1", port: int = 8000, replicas: int = 1) -> None:
    """Deploy on the Ray cluster named by RAY_ADDRESS (else a local one) and serve until interrupted."""
    serve = _ray_serve()
    import ray

    def interrupt(*_):
        raise KeyboardInterrupt

    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    # After ray.init, which installs a SIGTERM handler that aborts: SIGTERM, like Ctrl+C, takes the
    # deployment down and exits 0.
    signal.signal(signal.SIGTERM, interrupt)
    try:
        serve.run(application(path, config, replicas=replicas, provider=provider, threads=threads),
                  name="alibi-export", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
