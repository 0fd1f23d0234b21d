"""The server's Prometheus metrics, in a registry of its own (two apps in one process do not collide).

They double as the engine's observer (``first_token``, ``inter_token``, ``finished``), so the engine
reports timings without knowing Prometheus; the gauges read the engine when scraped.
"""
from __future__ import annotations

from ..errors import MissingDependencyError

__all__ = ["ServeMetrics", "OUTCOMES"]

# success: finished (stop or length); cancelled: the client went away; error: the engine failed;
# invalid: refused with a 4xx other than 429; queue_full: refused with 429.
OUTCOMES = ("success", "cancelled", "error", "invalid", "queue_full")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)


class ServeMetrics:
    def __init__(self):
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError:
            raise MissingDependencyError("prometheus-client", "serve", "alibi-export serve") from None
        self.registry = r = CollectorRegistry()
        self.requests = Counter("alibi_serve_requests", "Requests by outcome (one per prompt once queued; one per "
                                "HTTP request when refused)", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every outcome shows, at 0 until it happens
        self.prompt_tokens = Counter("alibi_serve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("alibi_serve_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("alibi_serve_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("alibi_serve_inter_token_latency_seconds", "Between two tokens of one request",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("alibi_serve_queue_depth", "Requests waiting for admission", registry=r)
        self.running = Gauge("alibi_serve_running_requests", "Requests in the running batch", registry=r)
        self.kv_tokens = Gauge("alibi_serve_kv_tokens_in_use", "KV-cache token slots held (rows x columns of the "
                               "padded cache, and the prefill's)", registry=r)

    def bind(self, engine) -> None:
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.running.set_function(lambda: engine.batch_size)
        self.kv_tokens.set_function(lambda: engine.kv_tokens)

    # ------------------------------------------------------------------ the engine's observer
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, outcome: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests.labels(outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)

    def refused(self, status: int) -> None:
        self.requests.labels("queue_full" if status == 429 else "invalid").inc()

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
