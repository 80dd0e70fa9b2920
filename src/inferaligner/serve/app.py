"""The OpenAI-compatible HTTP API: chat and text completions (plain and SSE), models, health and metrics.

Before any route runs, `RequestGuard` checks the API key (before the body is read), caps the body's size and the
time a client may take to send it. Templating and tokenization run off the event loop, so a big prompt never
stalls other clients or `/health`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferaligner.errors import InferAlignerError
from inferaligner.models import context_length
from inferaligner.prompts import chat_token_ids, defuse_special_tokens
from inferaligner.serve.engine import (
    Done,
    Draining,
    Engine,
    Event,
    Failed,
    Job,
    Planned,
    QueueFull,
    TextDelta,
    TokenLogprob,
)
from inferaligner.serve.guard import RequestGuard
from inferaligner.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("inferaligner.serve")
SERVER_ID = f"{socket.gethostname()}:{os.getpid()}"  # which process answered (/health), e.g. among Ray replicas
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


@dataclass(frozen=True)
class ServerConfig:
    """What the server allows; see `inferaligner serve --help`."""

    model_name: str = "inferaligner-demo"
    max_tokens_limit: int = 512
    default_max_tokens: int = 256
    api_key: str | None = None
    allow_client_disable: bool = False
    retry_after_s: int = 1
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise InferAlignerError("The API key is empty: give a real key, or leave --api-key out to serve without.")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise InferAlignerError(
                f"The default max_tokens ({self.default_max_tokens}) must lie in 1..the limit "
                f"({self.max_tokens_limit})."
            )
        if self.max_body_bytes < 1024 or not 0 < self.body_timeout_s < float("inf"):
            raise InferAlignerError(
                "The body limit must be at least 1024 bytes and the body timeout a positive number of seconds."
            )


class Metrics:
    """Prometheus series for one server instance."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "inferaligner_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "inferaligner_request_latency_seconds",
            "Request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80),
        )
        self.prompt_tokens = Counter("inferaligner_prompt_tokens", "Prompt tokens", registry=self.registry)
        self.completion_tokens = Counter("inferaligner_completion_tokens", "Generated tokens", registry=self.registry)
        self.cached_prompt_tokens = Counter(
            "inferaligner_cached_prompt_tokens", "Prompt tokens taken from the prefix cache", registry=self.registry
        )
        self.gate = Counter("inferaligner_gate_decisions", "Gate decisions", ["fired"], registry=self.registry)
        self.batch = Histogram(
            "inferaligner_batch_size",
            "Rows decoded together: each batch, or the running rows after each join",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.first_token = Histogram(
            "inferaligner_time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40),
        )
        self.inter_token = Histogram(
            "inferaligner_inter_token_seconds",
            "Between a request's consecutive generated tokens",
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
        )
        queue = Gauge("inferaligner_queue_depth", "Requests waiting for a batch", registry=self.registry)
        queue.set_function(lambda: engine.queue_depth)
        running = Gauge("inferaligner_running_rows", "Requests being generated now", registry=self.registry)
        running.set_function(lambda: engine.running_rows)
        engine.on_batch.append(self.batch.observe)

    def render(self) -> bytes:
        """The series in Prometheus' text format (reading changes nothing)."""
        return generate_latest(self.registry)


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The FastAPI application around a (not yet started) engine; the app's lifespan starts and drains it."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="InferAligner", lifespan=lifespan)
    app.add_middleware(
        RequestGuard, api_key=config.api_key, max_body_bytes=config.max_body_bytes, body_timeout_s=config.body_timeout_s
    )
    metrics = Metrics(engine)
    tokenizer = engine.aligner.tokenizer
    context = context_length(engine.aligner.model) or 2048

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        kind = first.get("type")
        if kind == "json_invalid":  # its location is a byte offset, not a parameter
            message = f"The request body is not valid JSON (at byte {where or 0}); send a JSON object."
            where = ""
        elif kind == "extra_forbidden":
            message = f"'{where}' is not supported by this server; remove it from the request."
        elif kind == "literal_error" and where.split(".")[-1] in ("echo", "best_of", "suffix"):
            message = f"'{where}' = {first.get('input')!r} is not supported by this server; remove it."
        else:
            message = f"{where or 'body'}: {first.get('msg', 'invalid value')}".replace("Value error, ", "")
        return JSONResponse(APIError(400, message, param=where or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": config.model_name,
            "queue_depth": engine.queue_depth,
            "in_flight": engine.in_flight,
            "mode": engine.aligner.settings.mode.value,
            "scheduler": engine.scheduler,
            "server": SERVER_ID,
        }

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render().decode(), media_type="text/plain; version=0.0.4")

    served = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "inferaligner"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [served]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        if model != config.model_name:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{config.model_name}'.",
                kind="not_found_error",
                param="model",
                code="model_not_found",
            )
        return served

    def make_job(body: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int], chat: bool) -> Job:
        if body.model != config.model_name:
            raise APIError(
                404,
                f"The model '{body.model}' does not exist; this server serves '{config.model_name}'.",
                param="model",
                code="model_not_found",
            )
        wanted = body.requested_tokens()
        if wanted is not None and wanted > config.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens is {wanted}, above this server's limit of {config.max_tokens_limit}; "
                "ask for fewer tokens.",
                param="max_tokens",
            )
        max_tokens = wanted or min(config.default_max_tokens, max(1, context - len(prompt_ids)))
        if len(prompt_ids) + max_tokens > context:
            raise APIError(
                400,
                f"The prompt has {len(prompt_ids)} tokens and max_tokens is {max_tokens}: together "
                f"they exceed the model's context of {context} tokens. Shorten the prompt or lower "
                "max_tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        enabled = body.inferaligner.enabled if body.inferaligner else True
        if not enabled and not config.allow_client_disable:
            raise APIError(403, "This server does not let clients switch InferAligner off.", param="inferaligner")
        temperature = 0.0 if body.greedy else body.temperature
        return Job(
            prompt_ids,
            max_tokens,
            temperature,
            body.top_p,
            body.stop_strings(),
            enabled,
            asyncio.get_running_loop(),
            top_logprobs=body.top_logprobs_wanted(),
            chat=chat,
        )

    async def run(request: Request, endpoint: str, body: Any, prompt_ids: list[int], chat: bool) -> Any:
        started = time.perf_counter()
        status = "200"
        try:
            job = make_job(body, prompt_ids, chat)
            try:
                engine.submit(job)
            except QueueFull:
                busy = "The server is busy: its request queue is full. Retry shortly."
                retry = {"Retry-After": str(config.retry_after_s)}
                raise APIError(429, busy, kind="rate_limit_error", headers=retry) from None
            except Draining:
                raise APIError(
                    503, "The server is shutting down; send the request elsewhere.", kind="server_error"
                ) from None
            metrics.prompt_tokens.inc(len(prompt_ids))
            if body.stream:
                usage_chunk = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(
                    stream(job, chat, endpoint, started, usage_chunk), media_type="text/event-stream"
                )
            return JSONResponse(await complete(request, job, chat))
        except APIError as exc:
            status = str(exc.status)
            raise
        finally:
            if not body.stream or status != "200":
                metrics.requests.labels(endpoint, status).inc()
                metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    def envelope(chat: bool, ident: str, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {"id": ident, "object": kind, "created": int(time.time()), "model": config.model_name}

    def extension(job: Job) -> dict[str, Any]:
        return {
            "gate": job.gate.as_dict() if job.gate else None,
            "intervened": job.intervened,
            "mode": engine.aligner.settings.mode.value,
            "enabled": job.aligned,
            "server": SERVER_ID,
        }

    def usage(job: Job) -> dict[str, Any]:
        return {
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": len(job.tokens),
            "total_tokens": len(job.prompt_ids) + len(job.tokens),
            "prompt_tokens_details": {"cached_tokens": job.cached_tokens},
        }

    def finished(job: Job) -> None:
        metrics.completion_tokens.inc(len(job.tokens))
        metrics.cached_prompt_tokens.inc(job.cached_tokens)
        if job.token_times:
            metrics.first_token.observe(job.token_times[0] - job.created)
            for earlier, later in itertools.pairwise(job.token_times):
                metrics.inter_token.observe(later - earlier)
        if job.gate is not None:
            metrics.gate.labels(str(job.gate.fired).lower()).inc()

    async def complete(request: Request, job: Job, chat: bool) -> dict[str, Any]:
        checked = time.monotonic()
        try:
            while True:
                try:
                    event: Event | None = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():  # the client hung up: free its row at the next step
                        job.cancelled.set()
                if isinstance(event, Failed):
                    raise APIError(500, event.message, kind="server_error")
                if isinstance(event, Done):
                    break
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        finished(job)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        reason = job.finish_reason if job.finish_reason in ("stop", "length") else "stop"
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
        logprobs = logprobs_body(job.logprobs, chat) if job.top_logprobs is not None else None
        if chat:
            choice |= {"message": {"role": "assistant", "content": job.text}, "logprobs": logprobs}
        else:
            choice |= {"text": job.text, "logprobs": logprobs}
        return {
            **envelope(chat, ident, False),
            "choices": [choice],
            "usage": usage(job),
            "inferaligner": extension(job),
        }

    async def stream(job: Job, chat: bool, endpoint: str, started: float, usage_chunk: bool) -> AsyncIterator[str]:
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        status = "200"

        def chunk(
            delta: str | None, reason: str | None, first: bool = False, logprobs: tuple[TokenLogprob, ...] = ()
        ) -> str:
            choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
            entries = logprobs_body(logprobs, chat) if job.top_logprobs is not None and logprobs else None
            if chat:
                choice["delta"] = ({"role": "assistant"} if first else {}) | ({"content": delta} if delta else {})
                choice["logprobs"] = entries
            else:
                choice |= {"text": delta or "", "logprobs": entries}
            body = {**envelope(chat, ident, True), "choices": [choice]}
            if first:
                body["inferaligner"] = extension(job)
            return f"data: {json.dumps(body)}\n\n"

        try:
            while True:
                event = await job.events.get()
                if isinstance(event, Planned):
                    yield chunk(None, None, first=True)
                elif isinstance(event, TextDelta):
                    yield chunk(event.text, None, logprobs=event.logprobs)
                elif isinstance(event, Failed):  # the error, then the end of the stream, as OpenAI's API does
                    status = "500"
                    yield f"data: {json.dumps(APIError(500, event.message, kind='server_error').body())}\n\n"
                    yield "data: [DONE]\n\n"
                    break
                elif isinstance(event, Done):
                    reason = job.finish_reason if job.finish_reason in ("stop", "length") else "stop"
                    yield chunk(None, reason)
                    if usage_chunk:
                        tail = {**envelope(chat, ident, True), "choices": [], "usage": usage(job)}
                        yield f"data: {json.dumps(tail)}\n\n"
                    yield "data: [DONE]\n\n"
                    break
        except asyncio.CancelledError:
            status = "499"
            job.cancelled.set()
            raise
        finally:
            job.cancelled.set()  # nothing reads this job any more
            finished(job)
            metrics.requests.labels(endpoint, status).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    tokenizing = threading.Lock()  # worker threads take turns: a fast tokenizer is not safe to share mid-call

    def chat_ids(body: ChatCompletionRequest) -> list[int]:
        roles = {"developer": "system"}
        messages = [{"role": roles.get(m.role, m.role), "content": m.text()} for m in body.messages]
        named = [i for i, m in enumerate(body.messages) if m.name is not None]
        with tokenizing:
            dropped = [i for i in named if not template_shows_names(messages[i]["role"])]
            if dropped:
                raise APIError(
                    400,
                    f"'messages.{dropped[0]}.name' is not supported: this model's chat template has "
                    "no place for a speaker's name; remove it.",
                    param=f"messages.{dropped[0]}.name",
                )
            for i in named:
                messages[i]["name"] = body.messages[i].name
            return chat_token_ids(tokenizer, messages)

    @functools.cache
    def template_shows_names(role: str) -> bool:
        """Whether the chat template writes the `name` of a message of this role into the prompt (else a name would
        be dropped)."""
        marker = "Zq9NameProbe"
        probe = [{"role": role, "content": "hi", "name": marker}]
        if role != "user":
            probe.append({"role": "user", "content": "hi"})
        try:
            return marker in tokenizer.decode(chat_token_ids(tokenizer, probe))
        except Exception:  # a template that cannot render this probe (e.g. one that wants turns to alternate)
            return False

    def text_ids(prompt: str) -> list[int]:
        with tokenizing:
            return tokenizer(defuse_special_tokens(tokenizer, prompt))["input_ids"]  # raw text, never a control token

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        prompt_ids = await asyncio.to_thread(chat_ids, body)
        return await run(request, "chat", body, prompt_ids, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prompt_ids = await asyncio.to_thread(text_ids, body.prompt)
        if not prompt_ids:
            raise APIError(400, "The prompt is empty; send at least one token of text.", param="prompt")
        return await run(request, "completions", body, prompt_ids, chat=False)

    return app


def logprobs_body(entries: Sequence[TokenLogprob], chat: bool) -> dict[str, Any]:
    """Log-probabilities in OpenAI's shape: chat `{"content": [...]}`, text completions `{"tokens", ...}`."""
    if chat:
        return {
            "content": [
                {
                    "token": e.token,
                    "logprob": e.logprob,
                    "bytes": list(e.token.encode()),
                    "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in e.top],
                }
                for e in entries
            ]
        }
    offsets, position = [], 0
    for e in entries:
        offsets.append(position)
        position += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": offsets,
    }
