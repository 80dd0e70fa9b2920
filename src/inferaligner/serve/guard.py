"""`RequestGuard`: the checks every request passes before any route reads it.

1. The API key, from the headers alone: a client without the key gets 401 before its body is read, parsed,
   templated or tokenized. Only `Authorization: Bearer <key>` counts.
2. The body's size: a declared `Content-Length` over the limit gets 413 at once; a body that grows past the limit
   while it arrives gets 413 as soon as it does.
3. The body's pace: the whole body must arrive within `body_timeout_s` of the request's headers; a client that
   stops sending, or trickles its body a byte at a time, gets 408 when that deadline passes.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]


class RequestGuard:
    """Pure ASGI middleware: key, body size and body deadline, answered in the OpenAI error schema."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app, self.api_key = app, api_key
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await _reject(send, *refusal)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        body = await self._read_body(receive, send)
        if body is None:
            return
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    def _refusal(self, scope: Scope) -> tuple[int, str, str, str] | None:
        """What the headers alone refuse (status, message, type, code): a missing key, a body declared too big or
        not a number of bytes."""
        if self.api_key is not None and scope["path"].startswith("/v1/") and not self._authorised(scope):
            return (
                401,
                "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                "authentication_error",
                "invalid_api_key",
            )
        declared = _header(scope, b"content-length") if scope["method"] in ("POST", "PUT", "PATCH") else None
        if declared is not None and not declared.isdigit():  # uvicorn's parser refuses these first; Ray's may not
            return (
                400,
                f"Content-Length {declared[:20]!r} is not a number of bytes.",
                "invalid_request_error",
                "invalid_http",
            )
        if declared is not None and int(declared) > self.max_body_bytes:
            return _too_large(self.max_body_bytes)
        return None

    async def _read_body(self, receive: Any, send: Any) -> bytes | None:
        """The whole body, read within one deadline; `None` when the client left or was answered (413, 408)."""
        body = bytearray()
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s  # one deadline for the whole body
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                await _reject(
                    send,
                    408,
                    f"The request body did not arrive within {self.body_timeout_s:g} s.",
                    "invalid_request_error",
                    "request_timeout",
                )
                return None
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await _reject(send, *_too_large(self.max_body_bytes))
                return None
            if not message.get("more_body", False):
                return bytes(body)

    def _authorised(self, scope: Scope) -> bool:
        header = _header(scope, b"authorization") or ""
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), self.api_key.encode())


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _too_large(limit: int) -> tuple[int, str, str, str]:
    """The 413 refusal (status, message, type, code) of a body over the limit, declared or sent."""
    return (
        413,
        f"The request body is larger than this server's limit of {limit} bytes.",
        "invalid_request_error",
        "request_too_large",
    )


async def _reject(send: Any, status: int, message: str, kind: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
