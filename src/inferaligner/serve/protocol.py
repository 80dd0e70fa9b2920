"""The OpenAI-compatible API's shapes: requests (strict), responses, stream chunks, models, and the error schema.

Request types are strict (`"stream": "yes"` or `"max_tokens": true` are errors, not conversions) and unknown fields
are rejected with a 400 that names them: a parameter is either honoured or refused, never ignored. Responses are
dumped by `dump()`: every field, `null` included (`"logprobs": null`), except the ones a shape leaves out when
they do not apply (a chunk's `usage`, a delta's `role` after the first chunk).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
ROLE_WORDS = frozenset({"system", "user", "assistant", "developer", "tool", "function", "ipython"})
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20  # chat completions
MAX_LOGPROBS = 5  # text completions
MIN_TEMPERATURE = 1e-2
"""Temperatures above 0 but below this decode greedily: dividing the logits by a vanishing temperature overflows,
and the distribution is already all on the most likely token."""


def check_text(value: str, name: str) -> str:
    """Text must be valid Unicode (a lone surrogate cannot be tokenized)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} holds a lone surrogate (\\ud800-\\udfff): send valid Unicode text") from None
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    """A text part of a message's content (the list form current OpenAI clients send)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _valid_text(cls, value: str | list[TextPart]) -> str | list[TextPart]:
        for text in [value] if isinstance(value, str) else [p.text for p in value]:
            check_text(text, "content")
        return value

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        """OpenAI's form (letters, digits, '_' and '-', at most 64), and never a role's name: a template that writes
        the name where the role goes must not turn a user turn into an assistant or system turn."""
        if value is None:
            return None
        if not NAME.fullmatch(value):
            raise ValueError("a name holds 1 to 64 letters, digits, '_' or '-'")
        if value.lower() in ROLE_WORDS:
            raise ValueError(f"a name cannot be a role ({value!r})")
        return value

    def text(self) -> str:
        """The content as one text (text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class AlignmentOptions(_Strict):
    """The `inferaligner` extension field of a request."""

    enabled: bool = True


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    inferaligner: AlignmentOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings are allowed, got {len(stops)}")
        for stop in stops:
            check_text(stop, "stop")
        return value

    @model_validator(mode="after")
    def _seed_needs_greedy(self) -> _Common:
        if self.seed is not None and self.greedy is False:
            raise ValueError("seed is only supported with temperature 0 (batched sampling shares one generator)")
        return self

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Common:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives per token to return; `None`: no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: str
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: Literal[False] = False
    best_of: Literal[1] = 1
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _valid_prompt(cls, value: str) -> str:
        return check_text(value, "prompt")

    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives per token to return; `None`: no log-probabilities."""
        return self.logprobs


class APIError(Exception):
    """An error answered with the OpenAI error schema."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------------------
# Responses


class _Out(BaseModel):
    """A response shape. `dump()` writes every field, except those in `OMIT_IF_NONE` when they are `None`."""

    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset()

    def dump(self) -> dict[str, Any]:
        return {
            name: _dumped(value)
            for name in type(self).model_fields
            if (value := getattr(self, name)) is not None or name not in self.OMIT_IF_NONE
        }


def _dumped(value: Any) -> Any:
    if isinstance(value, _Out):
        return value.dump()
    if isinstance(value, list):
        return [_dumped(v) for v in value]
    return value


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(_Out):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[TokenLogprobEntry]


class TextLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class Message(_Out):
    role: Literal["assistant"] = "assistant"
    content: str


class Delta(_Out):
    OMIT_IF_NONE = frozenset({"role", "content"})

    role: Literal["assistant"] | None = None
    content: str | None = None


class Choice(_Out):
    """One choice of a completion or of a stream chunk (chat: `message` or `delta`; text: `text`)."""

    OMIT_IF_NONE = frozenset({"message", "delta", "text"})

    index: int = 0
    finish_reason: Literal["stop", "length"] | None
    message: Message | None = None
    delta: Delta | None = None
    text: str | None = None
    logprobs: ChatLogprobs | TextLogprobs | None


class PromptTokensDetails(_Out):
    cached_tokens: int


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class GateReport(_Out):
    fired: bool
    score: float | None
    layer: int


class Extension(_Out):
    """The `inferaligner` field: what the gate said and what the server did with the request."""

    gate: GateReport | None
    intervened: bool
    mode: str
    enabled: bool
    server: str


class Completion(_Out):
    """A whole answer (`chat.completion` or `text_completion`), or one stream chunk (`...chunk`)."""

    OMIT_IF_NONE = frozenset({"usage", "inferaligner"})

    id: str
    object: Literal["chat.completion", "chat.completion.chunk", "text_completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    inferaligner: Extension | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "inferaligner"


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]
