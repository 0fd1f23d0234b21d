"""OpenAI's completion API, as far as this server speaks it: request bodies in, engine parameters and
OpenAI-style JSON errors out. No web framework here, so every rule is testable on plain dicts.

A rule the engine alone can check (a prompt's length against the context, the KV budget) is the
engine's (``Engine.check``); this module checks the shape of the body.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .engine import SamplingParams

__all__ = ["ApiError", "CompletionRequest", "parse_json", "parse_completion", "DEFAULT_MAX_TOKENS", "MAX_STOP"]

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP = 16  # stop strings per request (OpenAI allows 4)
_UNSUPPORTED = {  # field -> the values that ask for nothing (anything else is refused, not ignored)
    "n": (None, 1), "best_of": (None, 1), "logprobs": (None,), "echo": (None, False), "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
}
_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class CompletionRequest:
    prompts: list  # each a string or a list of token ids
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage (usage is sent at the end of every stream anyway)


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def parse_completion(body: dict, model_id: str) -> CompletionRequest:
    """A /v1/completions body as engine parameters; ApiError for anything out of range or unsupported."""
    _check_model(body, model_id)
    for name, allowed in _UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in allowed:
            raise ApiError(400, f"{name}={body[name]!r} is not supported by this server", param=name,
                           code="unsupported_parameter")
    prompts = _prompts(body.get("prompt"))
    params = SamplingParams(
        max_tokens=_integer(body, "max_tokens", DEFAULT_MAX_TOKENS, low=1),
        temperature=_number(body, "temperature", 1.0, low=0.0),
        top_p=_top_p(body),
        top_k=_top_k(body),
        seed=_integer(body, "seed", None),
        stop=_stop(body.get("stop")),
        stop_token_ids=_token_ids(body, "stop_token_ids"),
    )
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, f"stream must be a boolean, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return CompletionRequest(prompts, params, bool(stream), bool(options.get("include_usage", False)))


def _check_model(body: dict, model_id: str) -> None:
    model = body.get("model")
    if model is not None and model != model_id:
        raise ApiError(404, f"the model {model!r} does not exist. Note: this server serves {model_id!r}",
                       param="model", code="model_not_found")


def _prompts(prompt) -> list:
    """One or more prompts: a string, a list of strings, a list of token ids, or a list of such lists."""
    if prompt is None:
        raise ApiError(400, "prompt is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                       param="prompt")
    for p in prompt:
        if not (isinstance(p, str) or (isinstance(p, list) and all(_is_int(t) for t in p))):
            raise ApiError(400, "each prompt must be a string or a list of token ids", param="prompt")
        if len(p) == 0:
            raise ApiError(400, "a prompt is empty. Note: expected at least one token", param="prompt")
    return prompt


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(body: dict, name: str, default, *, low: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise ApiError(400, f"{name} must be an integer, got {value!r}", param=name)
    if low is not None and value < low:
        raise ApiError(400, f"{name} must be at least {low}, got {value}", param=name)
    return value


def _number(body: dict, name: str, default: float, *, low: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, got {value!r}", param=name)
    if value < low:
        raise ApiError(400, f"{name} must be at least {low:g}, got {value}", param=name)
    return float(value)


def _top_p(body: dict) -> float:
    value = body.get("top_p")
    if value is None:
        return 1.0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {value!r}", param="top_p")
    return float(value)


def _top_k(body: dict) -> int | None:
    value = body.get("top_k")
    if value is None or value == -1:  # -1: no limit (vLLM's convention)
        return None
    if not _is_int(value) or value < 1:
        raise ApiError(400, f"top_k must be a positive integer (or -1 for no limit), got {value!r}", param="top_k")
    return value


def _stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop must be a non-empty string or a list of non-empty strings, got {stop!r}",
                       param="stop")
    if len(stop) > MAX_STOP:
        raise ApiError(400, f"stop has {len(stop)} strings; at most {MAX_STOP} are allowed", param="stop")
    return tuple(stop)


def _token_ids(body: dict, name: str) -> tuple[int, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        raise ApiError(400, f"{name} must be a list of token ids, got {value!r}", param=name)
    return tuple(value)
