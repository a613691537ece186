"""The OpenAI request bodies the server accepts, checked up front into one :class:`Completion`.

Every refusal is an :class:`ApiError` with the status and the error object OpenAI's API sends
(``{"error": {"message", "type", "param", "code"}}``), so the official clients raise their usual
exception classes (``BadRequestError``, ``NotFoundError`` …). The documented statuses:

=====  ==========================  =================================================
 400   ``invalid_json``            the body is not a JSON object
 400   ``invalid_value``           a field has the wrong type or is out of range
 400   ``max_tokens_too_large``    ``max_tokens`` above the server's cap
 400   ``context_length_exceeded`` the prompt plus ``max_tokens`` exceed the context
 404   ``model_not_found``         ``model`` is not the one served
 404   ``not_found``               no such route (405 for a wrong method)
 413   ``request_too_large``       the body is larger than the server accepts
 503   ``server_busy``             every batch slot and queue place is taken
=====  ==========================  =================================================

Unknown fields are ignored, as OpenAI-compatible servers do, because clients send optional
fields (``user``, ``metadata`` …) that change nothing here; fields that *would* change the answer
but are not implemented (``n`` > 1, ``logprobs``, ``tools``) are refused instead of ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ApiError", "Completion", "parse_chat", "parse_completion", "parse_json"]

MAX_STOP_STRINGS = 4  # as OpenAI's API


class ApiError(Exception):
    """A refused request: the HTTP status and OpenAI's error object."""

    def __init__(
        self, status: int, message: str, code: str, param: str | None = None, kind: str = ""
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class Completion:
    """A checked request: what to generate and how (``prompt`` xor ``messages``)."""

    model: str
    stream: bool
    max_tokens: int | None
    temperature: float
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...]
    include_usage: bool
    messages: tuple[dict[str, str], ...] = ()
    prompt: str | None = None


def parse_json(body: bytes) -> Mapping[str, object]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", "invalid_json") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    return data


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", "invalid_value", param)


def _number(
    data: Mapping[str, object], key: str, default: float | None, low: float, high: float
) -> float | None:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(key, f"must be a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise _bad(key, f"must be in [{low}, {high}], got {value}")
    return float(value)


def _integer(data: Mapping[str, object], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, f"must be an integer, got {type(value).__name__}")
    return value


def _common(data: Mapping[str, object]) -> dict[str, object]:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "is required (a string; GET /v1/models lists the one served)")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be true or false")
    n = data.get("n", 1)
    if n not in (1, None):
        raise _bad("n", "only n=1 is supported")
    for key in ("logprobs", "tools", "functions", "echo", "best_of", "suffix"):
        if data.get(key) not in (None, False, 1 if key == "best_of" else None):
            raise _bad(key, "is not supported by this server")
    max_tokens = _integer(data, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(data, "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise _bad("max_tokens", f"must be >= 1, got {max_tokens}")
    top_p = _number(data, "top_p", None, 0.0, 1.0)
    if top_p is not None and top_p <= 0.0:
        raise _bad("top_p", "must be > 0")
    stop = data.get("stop")
    stops: tuple[str, ...] = ()
    if isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP_STRINGS:
            raise _bad("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        stops = tuple(stop)
    elif stop is not None:
        raise _bad("stop", "must be a string or a list of strings")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "must be an object")
    temperature = _number(data, "temperature", 1.0, 0.0, 2.0)
    return {
        "model": model,
        "stream": stream,
        "max_tokens": max_tokens,
        "temperature": 1.0 if temperature is None else temperature,
        "top_p": top_p,
        "seed": _integer(data, "seed"),
        "stop": stops,
        "include_usage": bool(options and options.get("include_usage")),
    }


def _content(value: object, where: str) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        parts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise _bad(where, "only text content parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(where, "a text part needs a string 'text'")
            parts.append(text)
        return "".join(parts)
    raise _bad(where, "must be a string or a list of text parts")


def parse_chat(data: Mapping[str, object]) -> Completion:
    """``POST /v1/chat/completions``: ``messages`` with roles system, user, assistant (or tool)."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of {role, content} objects")
    checked: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "must be an object")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise _bad(f"messages[{i}].role", f"unknown role {role!r}")
        checked.append({"role": str(role), "content": _content(m.get("content"), f"messages[{i}]")})
    return Completion(messages=tuple(checked), **_common(data))  # type: ignore[arg-type]


def parse_completion(data: Mapping[str, object]) -> Completion:
    """``POST /v1/completions``: a plain ``prompt`` string (or a list holding one)."""
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt", "must be a non-empty string (one prompt per request)")
    return Completion(prompt=prompt, **_common(data))  # type: ignore[arg-type]
