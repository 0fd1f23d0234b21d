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

from ..errors import ConfigError, MissingDependencyError
from .engine import EngineConfig

__all__ = ["application", "app", "parse_app_arguments", "serve_on_ray", "REPLICA_HEADER", "APP_ARGUMENTS"]

REPLICA_HEADER = "X-Replica-Id"


def _ray_serve():
    try:
        from ray import serve
    except ImportError:
        raise MissingDependencyError("ray[serve]", "ray", "alibi-export serve --ray") from None
    return serve


def application(path: str | None, config: EngineConfig = EngineConfig(), *, replicas: int = 1,
                provider: str = "cpu", threads: int | None = None, cpus_per_replica: float = 1.0, spin: bool = False):
    """A bound Ray Serve application of ``replicas`` copies of the server over ``path`` (resolved here,
    on the driver: the shipped model is exported once, before any replica starts)."""
    serve = _ray_serve()
    from ..artifacts import read_metadata
    from .engine import check_form
    from .server import resolve_model

    onnx_path, model_id = resolve_model(path)
    check_form(config, read_metadata(onnx_path).static_cache, onnx_path)  # here once, not in every replica
    options = dataclasses.asdict(config)

    @serve.ingress()
    class AlibiServer:
        def __init__(self, onnx_path: str, model_id: str, options: dict, provider: str, threads: int | None,
                     spin: bool):
            from .server import build

            replica = serve.get_replica_context().replica_id.unique_id
            self.served = build(onnx_path, EngineConfig(**options), provider=provider, threads=threads,
                                headers={REPLICA_HEADER: replica}, model_id=model_id, spin=spin)

        def __serve_build_asgi_app__(self):
            return self.served.app

        def __del__(self):
            self.served.engine.stop(timeout=5)

    deployment = serve.deployment(AlibiServer, name="alibi-export", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": cpus_per_replica})
    return deployment.bind(str(onnx_path.resolve()), model_id, options, provider, threads, spin)


APP_ARGUMENTS = ("path", "replicas", "provider", "threads", "spin")
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def app(args: dict):
    """The builder `serve run alibi_export.serve.ray_app:app path=... replicas=...` calls (values are strings)."""
    config, options = parse_app_arguments(args)
    return application(options["path"], config, replicas=options["replicas"], provider=options["provider"],
                       threads=options["threads"], spin=options["spin"])


def parse_app_arguments(args: dict) -> tuple[EngineConfig, dict]:
    """``serve run``'s ``key=value`` strings as an EngineConfig and the application's options. A misspelt key
    or a value that is not one is an error naming it: a typo must not serve with a default in its place."""
    kinds = {f.name: {"bool": "bool", "float": "float"}.get(str(getattr(f.type, "__name__", f.type)), "int")
             for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(args) - set(kinds) - set(APP_ARGUMENTS))
    if unknown:
        raise ConfigError(f"unknown argument {', '.join(unknown)} for alibi_export.serve.ray_app:app. Note: expected "
                          f"{', '.join(APP_ARGUMENTS)} or an engine setting ({', '.join(kinds)})")

    def integer(key, value, low=1):
        try:
            number = int(str(value))
        except ValueError:
            number = None
        if number is None or number < low:
            raise ConfigError(f"{key}={value!r}: expected an integer >= {low}")
        return number

    def flag(key, value):
        text = str(value).lower()
        if text not in _TRUE + _FALSE:
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return text in _TRUE

    def number(key, value):
        try:
            x = float(str(value))
        except ValueError:
            x = None
        if x is None or not 0 <= x < float("inf"):
            raise ConfigError(f"{key}={value!r}: expected a finite number >= 0")
        return x

    parse = {"bool": flag, "float": number}
    engine = {k: parse[kinds[k]](k, v) if kinds[k] in parse else integer(k, v, 0 if k == "window_slack" else 1)
              for k, v in args.items() if k in kinds}
    provider = str(args.get("provider", "cpu"))
    if provider not in ("cpu", "cuda"):
        raise ConfigError(f"provider={provider!r}: expected cpu or cuda")
    options = {"path": args.get("path"), "replicas": integer("replicas", args.get("replicas", 1)),
               "provider": provider, "threads": integer("threads", args["threads"]) if args.get("threads") else None,
               "spin": flag("spin", args["spin"]) if "spin" in args else False}
    return EngineConfig(**engine), options


def serve_on_ray(path, config: EngineConfig, *, provider: str = "cpu", threads: int | None = None,
                 host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, spin: bool = False) -> None:
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
        serve.run(application(path, config, replicas=replicas, provider=provider, threads=threads, spin=spin),
                  name="alibi-export", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
