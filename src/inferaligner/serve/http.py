"""uvicorn's HTTP protocols, with one change: a request the HTTP parser itself rejects (a `Content-Length: abc`, a
malformed request line) is answered in the OpenAI error schema, as JSON, instead of uvicorn's plain-text 400.

`http_protocol()` is what `inferaligner serve` hands uvicorn: the httptools parser where it is installed (uvicorn's
own choice), else h11.
"""

from __future__ import annotations

import functools
import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from inferaligner.serve.protocol import APIError


def parser_error_body(message: str) -> bytes:
    """The JSON body of a 400 for a request the HTTP parser could not read."""
    reason = message.rstrip(".") or "Invalid HTTP request received"
    error = APIError(400, f"{reason}: the request is not valid HTTP/1.1 (check its headers).", code="invalid_http")
    return json.dumps(error.body()).encode()


class JsonErrorsH11(H11Protocol):
    """h11, answering parser errors in the OpenAI error schema."""

    def send_400_response(self, msg: str) -> None:
        _send_json_400(self.transport, msg)


def _send_json_400(transport: object, msg: str) -> None:
    body = parser_error_body(msg)
    head = (
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\nconnection: close\r\n\r\n"
    )
    transport.write(head + body)  # type: ignore[attr-defined]
    transport.close()  # type: ignore[attr-defined]


@functools.cache
def http_protocol() -> type:
    """The protocol class for `uvicorn.Config(http=...)`: httptools where installed, else h11."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return JsonErrorsH11

    class JsonErrorsHttpTools(HttpToolsProtocol):
        """httptools, answering parser errors in the OpenAI error schema."""

        def send_400_response(self, msg: str) -> None:
            _send_json_400(self.transport, msg)

    return JsonErrorsHttpTools
