"""The OpenAI-compatible HTTP API over an ``Engine``: /v1/completions (streamed or not), /v1/models,
/health, /metrics, and a /v1/chat/completions that explains why it is refused.

Handlers never block the event loop: the engine runs in its own thread and its events come back
through ``loop.call_soon_threadsafe`` into an asyncio queue per HTTP request. A client that goes away
(a closed stream, or a dropped connection while a non-streamed answer is computed) cancels its
requests, which frees their batch slots and cache at the engine's next iteration.
"""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at run time.
import asyncio
import json
import time
import uuid

from ..errors import MissingDependencyError
from .engine import Delta, Finished, RequestRejected
from .protocol import ApiError, parse_completion, parse_json

__all__ = ["create_app", "MAX_BODY_BYTES"]

MAX_BODY_BYTES = 1 << 20  # a larger body is answered 413
_DISCONNECT_POLL_S = 0.1  # a gone client's request is cancelled within this (a check costs microseconds)


def create_app(engine, model_id: str, metrics, *, max_body_bytes: int = MAX_BODY_BYTES, headers: dict | None = None):
    """The FastAPI app. ``metrics``: a ServeMetrics bound to ``engine``; ``headers``: added to every answer
    (the Ray deployment names its replica there)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, Response, StreamingResponse
        from starlette.exceptions import HTTPException
    except ImportError:
        raise MissingDependencyError("fastapi", "serve", "alibi-export serve") from None

    app = FastAPI(title="alibi-export", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.draining = False
    created = int(time.time())
    extra = dict(headers or {})

    def error(e: ApiError) -> JSONResponse:
        if e.status != 404 or e.code == "model_not_found":
            metrics.refused(e.status)
        more = {"Retry-After": "1"} if e.status == 429 else {}
        return JSONResponse(e.body(), status_code=e.status, headers={**extra, **more})

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):  # unknown routes and methods, as OpenAI-style JSON
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code, headers=extra)

    @app.get("/health")
    async def health():
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers=extra)
        return JSONResponse({"status": "ok"}, headers=extra)

    @app.get("/v1/models")
    async def models():
        card = {"id": model_id, "object": "model", "created": created, "owned_by": "alibi-export",
                "max_model_len": engine.config.max_context}
        return JSONResponse({"object": "list", "data": [card]}, headers=extra)

    @app.get("/metrics")
    async def prometheus():
        body, kind = metrics.text()
        return Response(body, media_type=kind, headers=extra)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        parse_json(await _body(request, max_body_bytes))
        raise ApiError(400, f"the model {model_id!r} has no chat template (its tokenizer defines none), so chat "
                            "messages cannot be turned into a prompt. Note: use /v1/completions with a prompt",
                       code="no_chat_template")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_json(await _body(request, max_body_bytes))
        req = parse_completion(body, model_id)
        rows = [engine.session.tokenizer.encode(p).ids if isinstance(p, str) else p for p in req.prompts]
        try:
            rows = [engine.check(ids, req.params) for ids in rows]  # every prompt, before any is queued
        except RequestRejected as e:
            raise ApiError(e.status, str(e), param=e.param) from None
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        handles = []
        try:
            for i, ids in enumerate(rows):
                handles.append(engine.submit(ids, req.params, _to_loop(loop, events, i)))
        except RequestRejected as e:
            for h in handles:
                h.cancel()
            raise ApiError(e.status, str(e), param=e.param) from None
        engine.wake()
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}
        if req.stream:
            return StreamingResponse(_stream(head, events, handles), media_type="text/event-stream",
                                     headers={**extra, "Cache-Control": "no-cache"})
        return await _complete(request, head, events, handles)

    async def _complete(request, head, events, handles):
        texts, reasons, usage = [""] * len(handles), [None] * len(handles), [0, 0]
        waiting, checked = len(handles), time.monotonic()
        try:
            while waiting:
                if time.monotonic() - checked > _DISCONNECT_POLL_S:  # whether events come or not
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody reads it; finally cancels the requests
                    checked = time.monotonic()
                try:
                    i, event = await asyncio.wait_for(events.get(), _DISCONNECT_POLL_S)
                except TimeoutError:
                    continue
                if isinstance(event, Finished):
                    if event.reason == "error":
                        raise ApiError(500, f"generation failed: {event.error}")
                    texts[i], reasons[i], waiting = event.text, event.reason, waiting - 1
                    usage[0], usage[1] = usage[0] + event.prompt_tokens, usage[1] + event.completion_tokens
        finally:
            for h in handles:
                h.cancel()  # a no-op for finished requests
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return JSONResponse({**head, "choices": choices, "usage": _usage(*usage)}, headers=extra)

    return app


async def _body(request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes; at most {limit} are accepted",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body has more than {limit} bytes; at most {limit} are accepted",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _to_loop(loop, events: asyncio.Queue, index: int):
    """An engine callback that hands (index, event) to ``loop``; dropped if the loop has closed."""
    def on_event(event):
        try:
            loop.call_soon_threadsafe(events.put_nowait, (index, event))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass
    return on_event


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _stream(head: dict, events: asyncio.Queue, handles: list):
    """Server-sent events in OpenAI's chunk format; then a chunk with the usage and no choices; then [DONE]."""
    def sse(payload) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    waiting, usage = len(handles), [0, 0]
    try:
        while waiting:
            i, event = await events.get()
            if isinstance(event, Delta):
                yield sse({**head, "choices": [{"index": i, "text": event.text, "logprobs": None,
                                                "finish_reason": None}]})
            elif isinstance(event, Finished):
                waiting -= 1
                usage[0], usage[1] = usage[0] + event.prompt_tokens, usage[1] + event.completion_tokens
                if event.reason == "error":
                    yield sse(ApiError(500, f"generation failed: {event.error}").body())
                    continue
                yield sse({**head, "choices": [{"index": i, "text": "", "logprobs": None,
                                                "finish_reason": event.reason}]})
        yield sse({**head, "choices": [], "usage": _usage(*usage)})
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects: the response task is cancelled here
        for h in handles:
            h.cancel()
