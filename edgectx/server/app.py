"""The OpenAI-compatible HTTP API over one engine (FastAPI on uvicorn): what `edgectx serve` runs.

    GET  /health               {"status": "ok", "model": ..., "queue": {"running": 1, "waiting": 2}, ...}
    GET  /v1/models            the one model served
    POST /v1/chat/completions  OpenAI's chat completions, streamed as server-sent events or not

A reasoning model's thinking (a chat template that names `<think>`) comes as `reasoning_content`, in the
message and in stream deltas, apart from the answer's `content`, as DeepSeek's API, vLLM and llama.cpp's server
send it (`reasoning_format: "none"` in a request keeps it in the content); `chat_template_kwargs` reach the
template (Qwen3's `enable_thinking: false` asks for no thinking).

Beyond OpenAI's fields, edgectx adds one object named `edgectx` (standard clients ignore unknown fields):
in a stream, chunks with an empty delta carry `{"edgectx": {"prefill": {"done": N, "total": M}}}` while the
prompt is read; the last chunk (and a whole response) carries `{"edgectx": {"citations": [...]}}`, the
passages of the prompt the answer attended to most, retrieved or resident (`document`, `start_token`,
`end_token`, `score`, `text`; empty when nothing was evicted, so nothing needed retrieving).

Every error is OpenAI's JSON shape with a 4xx status (5xx only for a failure of the server itself); requests
past the body limit get 413, a missing or wrong API key 401.

    app = create_app(engine, ServeSettings(api_key=None, model_id="smollm2"))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgectx.engine import Engine
from edgectx.server.errors import ApiError
from edgectx.server.pool import MemoryPool
from edgectx.server.request import ChatRequest, Limits, parse_chat_request
from edgectx.server.runner import Event, Job, Runner
from edgectx.store.conversations import ConversationStore

KEEPALIVE_S = 1.0  # a stream with nothing to say sends an SSE comment this often (and so notices a client gone)


@dataclass
class ServeSettings:
    model_id: str
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    spill_dir: Path | None = None  # where waiting conversations are snapshotted; None: no spilling (dropped)
    max_in_ram: int = 4
    ram_bytes: int = 4 * 2**30
    max_on_disk: int = 32


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (never read whole first)."""
    too_big = ApiError(413, f"The request body is larger than this server's limit of {limit:,} bytes.",
                       code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class RequireKey:
    """ASGI middleware: every /v1 request must carry `Authorization: Bearer KEY` (compared in constant time).
    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would hide a client's disconnect from the route."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                error = ApiError(401, "A valid API key is required: send it as 'Authorization: Bearer KEY'.",
                                 code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class JobStream(StreamingResponse):
    """A streamed answer whose job stops when the response ends for any reason (a client that left, too)."""

    def __init__(self, job: Job, content):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                          "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()  # a no-op once the answer is done


def create_app(engine: Engine, settings: ServeSettings, store: ConversationStore | None = None) -> FastAPI:
    pool = MemoryPool(engine, settings.spill_dir, store=store, max_in_ram=settings.max_in_ram,
                      ram_bytes=settings.ram_bytes, max_on_disk=settings.max_on_disk)
    runner = Runner(engine, pool)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        runner.close()
        pool.close()

    app = FastAPI(title="edgectx", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.runner, app.state.pool = runner, pool
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"No route {request.url.path}: the API is under /v1 (chat/completions, models).",
                   405: f"{request.method} is not allowed on {request.url.path}."}.get(e.status_code, str(e.detail))
        return ApiError(e.status_code, message, code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def failure(request: Request, e: Exception):
        return ApiError(500, "The server failed while answering: see its log.").response()

    if settings.api_key:
        app.add_middleware(RequireKey, key=settings.api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id,
                "queue": {"running": runner.running, "waiting": runner.waiting}, "conversations": pool.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model", "created": created,
                                            "owned_by": "edgectx"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_body(request, settings.limits.max_body_bytes)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "The request body is not valid JSON.", code="invalid_json") from None
        chat = parse_chat_request(data, settings.limits)
        job = runner.submit(chat, asyncio.get_running_loop())
        first = await _first_event(job, request)
        if first is None:  # the client left while the request waited
            return JSONResponse(ApiError(499, "The client closed the request.").body(), status_code=499)
        if first.kind == "error":
            raise first.error
        answer_id, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", settings.model_id
        if chat.stream:
            return JobStream(job, _stream(job, chat, answer_id, model))
        return await _whole(job, request, answer_id, model)

    return app


async def _first_event(job: Job, request: Request) -> Event | None:
    """The job's first event (accepted, or an error), watching for a client that leaves while it waits."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), KEEPALIVE_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                return None


def _chunk(answer_id: str, model: str, delta: dict, finish: str | None = None, **extra) -> dict:
    return {"id": answer_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


async def _stream(job: Job, chat: ChatRequest, answer_id: str, model: str):
    yield _sse(_chunk(answer_id, model, {"role": "assistant", "content": ""}))
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), KEEPALIVE_S)
        except asyncio.TimeoutError:
            yield ": keepalive\n\n"
            continue
        if event.kind == "progress":
            yield _sse(_chunk(answer_id, model, {}, edgectx={"prefill": event.data}))
        elif event.kind == "piece":
            yield _sse(_chunk(answer_id, model, {"content": event.text}))
        elif event.kind == "reasoning":  # the field DeepSeek's API, vLLM and llama.cpp's server stream thinking in
            yield _sse(_chunk(answer_id, model, {"reasoning_content": event.text}))
        elif event.kind == "error":  # headers are out: the error goes as a stream event, as OpenAI's does
            yield _sse(event.error.body())
            return
        elif event.kind == "done":
            d = event.data
            yield _sse(_chunk(answer_id, model, {}, d["finish_reason"], edgectx={"citations": d["citations"]}))
            if chat.include_usage:
                yield _sse({"id": answer_id, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": model, "choices": [], "usage": d["usage"]})
            yield _sse("[DONE]")
            return


async def _whole(job: Job, request: Request, answer_id: str, model: str) -> JSONResponse:
    pieces, reasoning, checked = [], [], time.monotonic()
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), KEEPALIVE_S)
        except asyncio.TimeoutError:
            event = None
        if time.monotonic() - checked >= KEEPALIVE_S:  # pieces may come without a pause: look at the clock
            checked = time.monotonic()
            if await request.is_disconnected():
                job.cancel()
        if event is None:
            continue
        if event.kind == "piece":
            pieces.append(event.text)
        elif event.kind == "reasoning":
            reasoning.append(event.text)
        elif event.kind == "error":
            raise event.error
        elif event.kind == "done":
            d = event.data
            message = {"role": "assistant", "content": "".join(pieces)}
            if reasoning:
                message["reasoning_content"] = "".join(reasoning)
            return JSONResponse({
                "id": answer_id, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": d["finish_reason"]}],
                "usage": d["usage"], "edgectx": {"citations": d["citations"]}})
