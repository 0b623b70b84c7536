"""The HTTP layer under the routes.

- ``ApiError``: an error answered with OpenAI's error body.
- ``BodyLimit``: ASGI middleware answering 413 to a request body over the limit (by its Content-Length, or while it
  is read) and 408 to a body not fully received within ``body_timeout_s`` of the request's start (a client that
  sends its body a byte at a time holds nothing for long).
- ``header_timeout_protocol``: uvicorn's HTTP protocol with a deadline for a request's headers: a connection that
  has not sent complete headers ``header_timeout_s`` after it opened (or after its previous response) is closed,
  with a 408 if it had begun a request. uvicorn has no such timeout of its own (its keep-alive timer stops at the
  first byte).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable

from starlette.exceptions import HTTPException

from .responses import error_body


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a 413, one not received within ``timeout_s`` a
    408 (module docstring)."""

    def __init__(self, app: Any, limit: int, timeout_s: float = 30.0) -> None:
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_json(send, 413, _too_large(self.limit))
        received, complete = 0, False
        deadline = time.monotonic() + self.timeout_s

        async def limited() -> dict:
            nonlocal received, complete
            if complete:  # after the body: only the disconnect is left to wait for, for as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"request body not received within {self.timeout_s:g} s") from None
            received += len(message.get("body", b""))
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if received > self.limit:
                raise HTTPException(413, _too_large(self.limit)["error"]["message"])
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> dict:
    return error_body(f"request body too large: the limit is {limit} bytes", code=413)


async def _send_json(send: Callable, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n%s")


def header_timeout_protocol(timeout_s: float) -> type:
    """uvicorn's HTTP protocol class (the one ``http="auto"`` picks) with a deadline for each request's headers."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderTimeout(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def data_received(self, data: bytes) -> None:
            self._started = True
            super().data_received(data)

        def _arm(self) -> None:
            self._started = False  # bytes of a next request arrived
            self.loop.call_later(timeout_s, self._expire, self.cycle)

        def _expire(self, cycle: Any) -> None:
            waiting = self.cycle is cycle and (cycle is None or cycle.response_complete)  # no new request since
            if not waiting or self.transport.is_closing():
                return
            if self._started:  # headers begun and not finished: say why (an idle connection just closes)
                body = json.dumps(error_body(f"request headers not received within {timeout_s:g} s",
                                             code=408)).encode()
                self.transport.write(_TIMEOUT_RESPONSE % (len(body), body))
            self.transport.close()

    return HeaderTimeout
