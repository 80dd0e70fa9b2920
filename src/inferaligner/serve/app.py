"""The HTTP layer: routes, error answers and the engine's lifespan. The API's logic is `serve.openai.OpenAIServing`,
its shapes `serve.protocol`, its series `serve.metrics`, its settings `serve.settings`.

Before any route runs, `RequestGuard` checks the API key (before the body is read), caps the body's size and the
time a client may take to send it. Templating and tokenization run off the event loop, so a big prompt never
stalls other clients or `/health`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferaligner.serve.engine import Engine
from inferaligner.serve.guard import RequestGuard
from inferaligner.serve.metrics import Metrics
from inferaligner.serve.openai import SERVER_ID, OpenAIServing
from inferaligner.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from inferaligner.serve.settings import ServeSettings


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    """The FastAPI application around a (not yet started) engine; the app's lifespan starts and drains it."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="InferAligner", lifespan=lifespan)
    app.add_middleware(
        RequestGuard,
        api_key=settings.api_key,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
    )
    metrics = Metrics(engine)
    serving = OpenAIServing(engine, settings, metrics)
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": settings.served_model_name,
            "queue_depth": engine.queue_depth,
            "in_flight": engine.in_flight,
            "mode": engine.aligner.settings.mode.value,
            "scheduler": engine.scheduler,
            "server": SERVER_ID,
        }

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render().decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return serving.models().dump()

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        return serving.model(model).dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        prompt_ids = await asyncio.to_thread(serving.chat_prompt, body)
        return _response(await serving.respond(body, prompt_ids, "chat", request.is_disconnected))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prompt_ids = await asyncio.to_thread(serving.text_prompt, body)
        return _response(await serving.respond(body, prompt_ids, "completions", request.is_disconnected))

    return app


def _response(answer: dict[str, Any] | AsyncIterator[str]) -> JSONResponse | StreamingResponse:
    if isinstance(answer, dict):
        return JSONResponse(answer)
    return StreamingResponse(answer, media_type="text/event-stream")


async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """A request the schema refuses: 400, naming the first field at fault (never a byte offset)."""
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    kind = first.get("type")
    if kind == "json_invalid":  # its location is a byte offset, not a parameter
        message, where = f"The request body is not valid JSON (at byte {where or 0}); send a JSON object.", ""
    elif kind == "extra_forbidden":
        message = f"'{where}' is not supported by this server; remove it from the request."
    elif kind == "literal_error" and where.split(".")[-1] in ("echo", "best_of", "suffix"):
        message = f"'{where}' = {first.get('input')!r} is not supported by this server; remove it."
    else:
        message = f"{where or 'body'}: {first.get('msg', 'invalid value')}".replace("Value error, ", "")
    return JSONResponse(APIError(400, message, param=where or None).body(), status_code=400)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)
