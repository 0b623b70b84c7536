"""The HTTP layer under the routes: ``ApiError`` (an error answered with OpenAI's error body) and ``BodyLimit`` (ASGI
middleware answering 413 to a request body over the limit, by its Content-Length or while it is read)."""

from __future__ import annotations

import json
from typing import Any, Callable

from starlette.exceptions import HTTPException

from . import protocol


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a 413 (by its Content-Length, or while read)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_json(send, 413, _too_large(self.limit))
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, _too_large(self.limit)["error"]["message"])
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> dict:
    return protocol.error_body(f"request body too large: the limit is {limit} bytes", code=413)


async def _send_json(send: Callable, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
