"""``scriptorium serve``'s HTTP side: OpenAI's chat/completions API and the chat page.

Why Starlette (+ uvicorn): the server must hold many slow streams open while one thread decodes,
which is what an asyncio server does cheaply, and server-sent events are one
``StreamingResponse``. Starlette is the small, well-kept ASGI toolkit that Dagster's webserver
and MLflow already install (so it adds nothing to the environment); FastAPI would add pydantic
request models whose automatic 422 answers are not the 400 error objects OpenAI clients expect.

Requests go to a :class:`~llm_core.batching.BatchEngine`, which decodes every running request in
one batch on its own thread; each request's tokens come back to the event loop through an
``asyncio.Queue`` (``call_soon_threadsafe``). A client that goes away (the page's stop button, a
closed connection) cancels its request, which leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from tokenizers import Tokenizer

from llm_core.batching import BatchEngine, GenRequest, QueueFull, Sampling
from pipeline.serve.api import ApiError, Completion, parse_chat, parse_completion, parse_json
from pipeline.serve.text import TextStream

__all__ = ["ServeSettings", "build_app"]

PAGE = Path(__file__).with_name("static") / "chat.html"


@dataclass(frozen=True)
class ServeSettings:
    """What the server enforces: the model's id and the request limits."""

    model_id: str
    max_tokens_cap: int  # the most tokens one request may ask for
    default_max_tokens: int  # when a request names none (still within the context)
    max_body_bytes: int = 1 << 20


class _Served:
    """The model side of the app: tokenizer, chat tokens, engine."""

    def __init__(self, engine: BatchEngine, tokenizer: Tokenizer, settings: ServeSettings) -> None:
        from llm_core.sft import ChatSpecials
        from llm_core.tokenizer import EOT

        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.specials = ChatSpecials.from_tokenizer(tokenizer)
        self.eot = tokenizer.token_to_id(EOT)
        self.created = int(time.time())

    def prompt_ids(self, req: Completion) -> tuple[list[int], tuple[int, ...]]:
        """The prompt's token ids and the stop tokens: the chat template for messages."""
        from llm_core.sft import encode_prompt

        if req.prompt is not None:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=False).ids
            return ids, (self.eot,)
        try:
            ids = encode_prompt(self.tokenizer, list(req.messages))
        except ValueError as exc:
            raise ApiError(400, str(exc), "invalid_value", "messages") from exc
        return ids, (self.specials.end, self.eot)

    def sampling(self, req: Completion, n_prompt: int, stop_ids: tuple[int, ...]) -> Sampling:
        ctx = self.engine.context_length
        cap = self.settings.max_tokens_cap
        if req.max_tokens is not None and req.max_tokens > cap:
            raise ApiError(
                400,
                f"max_tokens={req.max_tokens} is above this server's cap of {cap}",
                "max_tokens_too_large",
                "max_tokens",
            )
        room = ctx - n_prompt
        wanted = req.max_tokens or min(self.settings.default_max_tokens, cap, room)
        if room < 1 or wanted > room:
            raise ApiError(
                400,
                f"this model's context is {ctx} tokens; the prompt has {n_prompt} and "
                f"max_tokens is {wanted}: shorten the prompt or lower max_tokens",
                "context_length_exceeded",
                "messages" if req.prompt is None else "prompt",
            )
        return Sampling(
            max_tokens=wanted,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop_ids=stop_ids,
        )


def _error(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past ``limit`` bytes, announced or not."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over {limit} bytes", "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _sse(obj: object) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _Generation:
    """One request in flight: engine events arrive on an asyncio queue."""

    def __init__(self, served: _Served, ids: list[int], sampling: Sampling) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int | None, str | None]] = asyncio.Queue()
        self.request = GenRequest(ids, sampling, self._on_event)
        self.n_prompt = len(ids)
        try:
            served.engine.submit(self.request)
        except QueueFull as exc:
            raise ApiError(
                503, f"the server is busy ({exc}); retry shortly", "server_busy"
            ) from exc
        except ValueError as exc:
            raise ApiError(400, str(exc), "invalid_value") from exc

    def _on_event(self, token: int | None, finish: str | None) -> None:  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (token, finish))
        except RuntimeError:  # the event loop is gone (server shutdown): nobody to tell
            self.request.cancel()

    async def events(self, text: TextStream) -> AsyncIterator[tuple[str, str | None]]:
        """(text piece, finish_reason) pairs; the last one carries the finish reason. Leaving
        early (a stop string, a client gone) cancels the request in the engine."""
        try:
            while True:
                token, finish = await self.queue.get()
                if token is not None:
                    piece = text.push(token)
                    if text.stopped:
                        self.request.cancel()
                        yield piece, "stop"
                        return
                    if piece:
                        yield piece, None
                    continue
                if finish is not None and finish.startswith("error"):
                    raise RuntimeError(finish)
                yield text.finish(), "stop" if finish == "cancelled" else finish
                return
        finally:
            self.request.cancel()  # no-op when finished; frees the batch slot otherwise


def build_app(engine: BatchEngine, tokenizer: Tokenizer, settings: ServeSettings) -> Starlette:
    """The ASGI app over a started engine (the caller starts and stops the engine)."""
    served = _Served(engine, tokenizer, settings)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(served)]})

    async def model(request: Request) -> Response:
        if request.path_params["model"] != settings.model_id:
            return _error(_unknown_model(request.path_params["model"]))
        return JSONResponse(_model_card(served))

    async def health(request: Request) -> Response:
        running, waiting = engine.load
        return JSONResponse(
            {
                "status": "ok",
                "running": running,
                "waiting": waiting,
                "steps": engine.steps,
                "max_batch_seen": engine.max_rows_seen,
                "finished": dict(engine.finished),
            }
        )

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def chat(request: Request) -> Response:
        return await _complete(request, chat=True)

    async def completions(request: Request) -> Response:
        return await _complete(request, chat=False)

    async def _complete(request: Request, chat: bool) -> Response:
        try:
            data = parse_json(await _read_body(request, settings.max_body_bytes))
            req = parse_chat(data) if chat else parse_completion(data)
            if req.model != settings.model_id:
                raise _unknown_model(req.model)
            ids, stop_ids = served.prompt_ids(req)
            gen = _Generation(served, ids, served.sampling(req, len(ids), stop_ids))
        except ApiError as exc:
            return _error(exc)
        text = TextStream(tokenizer, req.stop)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            return StreamingResponse(
                _stream(gen, text, req, rid, chat, served),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        parts, finish = [], None
        async for piece, reason in gen.events(text):
            parts.append(piece)
            finish = reason
        reply = "".join(parts)
        choice: dict[str, object] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": reply}
        else:
            choice["text"] = reply
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": settings.model_id,
                "choices": [choice],
                "usage": _usage(gen, text),
            }
        )

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        message = "method not allowed" if status == 405 else f"no route {request.url.path}"
        return JSONResponse(
            ApiError(
                status, message, "not_found" if status == 404 else "method_not_allowed"
            ).body(),
            status_code=status,
        )

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/favicon.ico", lambda request: Response(status_code=204), methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def _unknown_model(name: str) -> ApiError:
    return ApiError(
        404, f"the model {name!r} does not exist on this server", "model_not_found", "model"
    )


def _model_card(served: _Served) -> dict[str, object]:
    return {
        "id": served.settings.model_id,
        "object": "model",
        "created": served.created,
        "owned_by": "scriptorium",
        "context_length": served.engine.context_length,
    }


def _usage(gen: _Generation, text: TextStream) -> dict[str, int]:
    n = len(text.ids)
    return {"prompt_tokens": gen.n_prompt, "completion_tokens": n, "total_tokens": gen.n_prompt + n}


async def _stream(
    gen: _Generation, text: TextStream, req: Completion, rid: str, chat: bool, served: _Served
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    created, model = int(time.time()), served.settings.model_id

    def chunk(piece: str | None, finish: str | None) -> dict[str, object]:
        choice: dict[str, object] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["delta"] = {} if piece is None else {"content": piece}
        else:
            choice["text"] = piece or ""
        obj = "chat.completion.chunk" if chat else "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}

    if chat:
        first = chunk("", None)
        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}  # type: ignore[index]
        yield _sse(first)
    try:
        async for piece, finish in gen.events(text):
            if piece:
                yield _sse(chunk(piece, None))
            if finish is not None:
                yield _sse(chunk(None, finish))
    except RuntimeError as exc:  # the engine failed: tell the client inside the stream
        yield _sse(ApiError(500, str(exc), "engine_error").body())
        return
    if req.include_usage:
        usage = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion"}
        yield _sse(
            {**usage, "created": created, "model": model, "choices": [], "usage": _usage(gen, text)}
        )
    yield "data: [DONE]\n\n"
