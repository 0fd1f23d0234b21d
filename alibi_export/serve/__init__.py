"""Serving a KV-cache export: continuous batching (``engine``) behind an OpenAI-compatible HTTP API (``app``).

``batch_cache`` lays rows of different lengths out in one cache tensor; ``engine`` schedules prefill and
decode passes over it in one thread; ``protocol`` turns OpenAI request bodies into engine requests and
errors; ``app`` is the FastAPI application and ``metrics`` its Prometheus metrics; ``server`` runs it
under uvicorn (graceful SIGTERM); ``ray_app`` deploys it on Ray Serve; ``model_cache`` exports the
shipped model once into the user's cache folder. Only ``app``, ``metrics``, ``server`` and ``ray_app``
need the optional packages (extras ``[serve]`` and ``[ray]``).
"""
