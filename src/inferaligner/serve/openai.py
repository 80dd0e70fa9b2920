"""`OpenAIServing`: the OpenAI API's logic without HTTP. A request becomes a job for the engine (checked against the
server's limits), and the job's events become a response or a stream of chunks (`serve.protocol` shapes). The app
(`serve.app`) only routes to it; tests can drive it directly.

Templating and tokenization run under one lock (a fast tokenizer is not safe to share mid-call) and are meant to be
called off the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

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
from inferaligner.serve.metrics import Metrics
from inferaligner.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatLogprobs,
    Choice,
    Completion,
    CompletionRequest,
    Delta,
    Extension,
    GateReport,
    Message,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TextLogprobs,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
)
from inferaligner.serve.settings import ServeSettings

SERVER_ID = f"{socket.gethostname()}:{os.getpid()}"  # which process answered (/health), e.g. among Ray replicas
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
Request = ChatCompletionRequest | CompletionRequest


class OpenAIServing:
    """Chat and text completions, plain and streamed, and the model list, for one engine."""

    def __init__(self, engine: Engine, settings: ServeSettings, metrics: Metrics) -> None:
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.tokenizer = engine.aligner.tokenizer
        self.context = context_length(engine.aligner.model) or 2048
        self.card = ModelCard(id=settings.served_model_name)
        self._tokenizing = threading.Lock()

    # --- models -------------------------------------------------------------------------------------------------

    def models(self) -> ModelList:
        return ModelList(data=[self.card])

    def model(self, ident: str) -> ModelCard:
        self._check_model(ident, kind="not_found_error")
        return self.card

    def _check_model(self, ident: str, kind: str = "invalid_request_error") -> None:
        """404 unless `ident` is the model this server serves."""
        if ident != self.card.id:
            raise APIError(
                404,
                f"The model '{ident}' does not exist; this server serves '{self.card.id}'.",
                kind=kind,
                param="model",
                code="model_not_found",
            )

    # --- prompts (call off the event loop) ----------------------------------------------------------------------

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        """The conversation's prompt tokens; a speaker's `name` goes in where the template writes it, else 400."""
        roles = {"developer": "system"}
        messages = [{"role": roles.get(m.role, m.role), "content": m.text()} for m in body.messages]
        with self._tokenizing:
            for index, given in enumerate(body.messages):
                if given.name is None:
                    continue
                if not self._template_shows_names(messages[index]["role"]):
                    raise APIError(
                        400,
                        f"'messages.{index}.name' is not supported: this model's chat template has "
                        "no place for a speaker's name; remove it.",
                        param=f"messages.{index}.name",
                    )
                messages[index]["name"] = given.name
            return chat_token_ids(self.tokenizer, messages)

    def text_prompt(self, body: CompletionRequest) -> list[int]:
        """A raw prompt's tokens (never a control token); 400 when it has none."""
        with self._tokenizing:
            ids = self.tokenizer(defuse_special_tokens(self.tokenizer, body.prompt))["input_ids"]
        if not ids:
            raise APIError(400, "The prompt is empty; send at least one token of text.", param="prompt")
        return ids

    @functools.cache  # noqa: B019 (one serving object per server: the cache lives as long as the server)
    def _template_shows_names(self, role: str) -> bool:
        """Whether the chat template writes the `name` of a message of this role into the prompt."""
        marker = "Zq9NameProbe"
        probe = [{"role": role, "content": "hi", "name": marker}]
        if role != "user":
            probe.append({"role": "user", "content": "hi"})
        try:
            return marker in self.tokenizer.decode(chat_token_ids(self.tokenizer, probe))
        except Exception:  # a template that cannot render this probe (e.g. one that wants turns to alternate)
            return False

    # --- one request ------------------------------------------------------------------------------------------------

    async def respond(
        self, body: Request, prompt_ids: list[int], endpoint: str, client_gone: Callable[[], Awaitable[bool]]
    ) -> dict[str, Any] | AsyncIterator[str]:
        """The whole answer, or (`stream`) the SSE lines of its chunks; 4xx/5xx as `APIError`. Every request is
        counted in the metrics once: here, or when its stream ends."""
        chat = isinstance(body, ChatCompletionRequest)
        started = time.perf_counter()
        try:
            job = self._submit(body, prompt_ids, chat)
            if body.stream:
                usage = bool(body.stream_options and body.stream_options.include_usage)
                return self._stream(job, chat, endpoint, started, usage)
            answer = await self._answer(job, chat, client_gone)
        except APIError as exc:
            self.metrics.request(endpoint, str(exc.status), time.perf_counter() - started)
            raise
        except asyncio.CancelledError:  # the client (or Ray Serve for it) gave up
            self.metrics.request(endpoint, "499", time.perf_counter() - started)
            raise
        self.metrics.request(endpoint, "200", time.perf_counter() - started)
        return answer

    def _submit(self, body: Request, prompt_ids: list[int], chat: bool) -> Job:
        job = self._job(body, prompt_ids, chat)
        try:
            self.engine.submit(job)
        except QueueFull:
            raise APIError(
                429,
                "The server is busy: its request queue is full. Retry shortly.",
                kind="rate_limit_error",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from None
        except Draining:
            raise APIError(
                503, "The server is shutting down; send the request elsewhere.", kind="server_error"
            ) from None
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        return job

    def _job(self, body: Request, prompt_ids: list[int], chat: bool) -> Job:
        """The request as a job, once it is within what this server and model allow."""
        self._check_model(body.model)
        wanted, limit = body.requested_tokens(), self.settings.max_tokens_limit
        if wanted is not None and wanted > limit:
            raise APIError(
                400,
                f"max_tokens is {wanted}, above this server's limit of {limit}; ask for fewer tokens.",
                param="max_tokens",
            )
        max_tokens = wanted or min(self.settings.max_tokens_default, max(1, self.context - len(prompt_ids)))
        if len(prompt_ids) + max_tokens > self.context:
            raise APIError(
                400,
                f"The prompt has {len(prompt_ids)} tokens and max_tokens is {max_tokens}: together "
                f"they exceed the model's context of {self.context} tokens. Shorten the prompt or lower "
                "max_tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        enabled = body.inferaligner.enabled if body.inferaligner else True
        if not enabled and not self.settings.allow_client_disable:
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

    async def _answer(self, job: Job, chat: bool, client_gone: Callable[[], Awaitable[bool]]) -> dict[str, Any]:
        """Wait for the job's end (checking every `DISCONNECT_POLL_S` that the client is still there), then shape it."""
        checked = time.monotonic()
        try:
            while not isinstance(event := await self._next(job), Done):
                if isinstance(event, Failed):
                    raise APIError(500, event.message, kind="server_error")
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await client_gone():  # the client hung up: free its row at the next step
                        job.cancelled.set()
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        self.metrics.finished(job)
        logprobs = logprobs_body(job.logprobs, chat) if job.top_logprobs is not None else None
        content = {"message": Message(content=job.text)} if chat else {"text": job.text}
        choice = Choice(index=0, finish_reason=_reason(job), logprobs=logprobs, **content)
        return self._completion(job, chat, False, [choice], usage=_usage(job), inferaligner=self._extension(job))

    @staticmethod
    async def _next(job: Job) -> Event | None:
        """The job's next event, or `None` after `DISCONNECT_POLL_S` without one."""
        try:
            return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            return None

    async def _stream(self, job: Job, chat: bool, endpoint: str, started: float, usage: bool) -> AsyncIterator[str]:
        """The job's events as SSE lines: a first chunk with the gate's report, one per text delta, the finish, the
        usage chunk when asked, `[DONE]`; a failure sends the error, then `[DONE]`."""
        ident, status = _ident(chat), "200"
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, Failed):  # the error, then the end of the stream, as OpenAI's API does
                    status = "500"
                    yield _sse(APIError(500, event.message, kind="server_error").body())
                    break
                for chunk in self._chunks(job, chat, ident, event, usage):
                    yield _sse(chunk)
                if isinstance(event, Done):
                    break
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            status = "499"
            raise
        finally:
            job.cancelled.set()  # nothing reads this job any more
            self.metrics.finished(job)
            self.metrics.request(endpoint, status, time.perf_counter() - started)

    def _chunks(self, job: Job, chat: bool, ident: str, event: Event, usage: bool) -> list[dict[str, Any]]:
        """The chunks one event makes."""
        if isinstance(event, Planned):
            return [self._chunk(job, chat, ident, Delta(role="assistant"), None, (), first=True)]
        if isinstance(event, TextDelta):
            return [self._chunk(job, chat, ident, Delta(content=event.text or None), None, event.logprobs)]
        if not isinstance(event, Done):
            return []
        chunks = [self._chunk(job, chat, ident, Delta(), _reason(job), ())]
        if usage:
            chunks.append(self._completion(job, chat, True, [], ident=ident, usage=_usage(job)))
        return chunks

    def _chunk(
        self,
        job: Job,
        chat: bool,
        ident: str,
        delta: Delta,
        reason: str | None,
        logprobs: Sequence[TokenLogprob],
        first: bool = False,
    ) -> dict[str, Any]:
        entries = logprobs_body(logprobs, chat) if job.top_logprobs is not None and logprobs else None
        content = {"delta": delta} if chat else {"text": delta.content or ""}
        choice = Choice(index=0, finish_reason=reason, logprobs=entries, **content)
        extension = self._extension(job) if first else None
        return self._completion(job, chat, True, [choice], ident=ident, inferaligner=extension)

    def _completion(
        self, job: Job, chat: bool, chunk: bool, choices: list[Choice], ident: str | None = None, **extra: Any
    ) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return Completion(
            id=ident or _ident(chat),
            object=kind,
            created=int(time.time()),
            model=self.card.id,
            choices=choices,
            **extra,
        ).dump()

    def _extension(self, job: Job) -> Extension:
        gate = GateReport(**job.gate.as_dict()) if job.gate else None
        return Extension(
            gate=gate,
            intervened=job.intervened,
            mode=self.engine.aligner.settings.mode.value,
            enabled=job.aligned,
            server=SERVER_ID,
        )


def logprobs_body(entries: Sequence[TokenLogprob], chat: bool) -> ChatLogprobs | TextLogprobs:
    """Log-probabilities in OpenAI's shape: chat `{"content": [...]}`, text completions `{"tokens", ...}`."""
    if chat:
        return ChatLogprobs(
            content=[
                TokenLogprobEntry(
                    token=e.token,
                    logprob=e.logprob,
                    bytes=list(e.token.encode()),
                    top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in e.top],
                )
                for e in entries
            ]
        )
    offsets, position = [], 0
    for e in entries:
        offsets.append(position)
        position += len(e.token)
    return TextLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[dict(e.top) for e in entries],
        text_offset=offsets,
    )


def _usage(job: Job) -> Usage:
    prompt, completion = len(job.prompt_ids), len(job.tokens)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=job.cached_tokens),
    )


def _reason(job: Job) -> str:
    return job.finish_reason if job.finish_reason in ("stop", "length") else "stop"


def _ident(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"
