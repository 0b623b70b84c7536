"""The HTTP server: FastAPI routes that speak the OpenAI API (as vLLM's server does) over a ``Service``. Routes keep
HTTP only (authentication, status codes, error mapping); ``serving.py`` turns requests into sessions and answers.

Routes: ``GET /v1/models`` (the base model, then every adapter, each with ``parent``), ``POST /v1/completions``,
``POST /v1/chat/completions`` (chat template; ``stream=true`` gives server-sent events ending in ``data: [DONE]``),
``POST /classify`` and ``/v1/classify`` (classification models, vLLM's shape), ``POST /tokenize`` and
``/detokenize`` (vLLM's shapes); open to all: ``GET /health`` (503 once the engine has stopped), ``GET /version``,
``GET /metrics`` (Prometheus text, ``metrics.py``); behind the API key only (and only when one is set):
``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``, ``GET /v1/lora_adapters`` (memory per adapter).
The request's ``model`` picks the adapter. ``GET /`` is the browser playground (``static/``: chat and side-by-side
comparison over this API).

Every bad request gets a 4xx with OpenAI's error body and the server goes on serving: 400 (invalid JSON, fields out
of bounds, options not implemented, limits), 401 (API key), 403 (admin without a key), 404 (unknown model), 408
(headers or body too slow), 413 (body too large), 429 (queue full). Error messages quote at most a few dozen
characters of what the client sent.
"""

from __future__ import annotations

import contextlib
import hmac
import re
import socket
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import SingLoRAError
from . import protocol
from .asgi import ApiError, BodyLimit, header_timeout_protocol
from .metrics import CONTENT_TYPE
from .responses import error_body, shorten
from .service import NotFound, RequestFailed, Service
from .serving import OpenAIServing
from .worker import Overloaded


def create_app(service: Service, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving ``service``; starts and stops its engine with the app's lifespan."""
    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="singlora serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=service.limits.max_body_bytes, timeout_s=service.limits.body_timeout_s)
    add_error_handlers(app)
    keys = ApiKey(api_key)
    serving = OpenAIServing(service)
    app.include_router(openai_router(serving, keys))
    app.include_router(info_router(service))
    app.include_router(admin_router(service, keys))
    mount_playground(app)
    return app


def answer(error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.kind, error.param, error.code), error.status)


_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)$|[^\w]")  # pydantic's union branches in a location


def _invalid(exc: RequestValidationError) -> ApiError:
    """A 400 naming the first invalid field (its path in the body), quoting none of its value."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return ApiError(400, "body: not valid JSON")
    path = []
    for part in first.get("loc", ())[1:] if first.get("loc", ())[:1] == ("body",) else first.get("loc", ()):
        if isinstance(part, str) and _TYPE_TAG.search(part):
            break
        path.append(str(part))
    where = shorten(".".join(path))
    message = str(first.get("msg", "invalid"))
    if first.get("type") == "extra_forbidden":
        message = "unrecognized request argument"
    elif message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return ApiError(400, f"{where or 'body'}: {message}", param=where or None)


def add_error_handlers(app: FastAPI) -> None:
    """Map every exception a route can raise to OpenAI's error body (nothing escapes as a bare 500)."""
    handlers: dict[type, Any] = {
        ApiError: lambda exc: exc,
        RequestValidationError: _invalid,
        HTTPException: lambda exc: ApiError(exc.status_code, str(exc.detail), code=exc.status_code),
        NotFound: lambda exc: ApiError(404, str(exc), param="model", code="model_not_found"),
        Overloaded: lambda exc: ApiError(429, str(exc), kind="server_busy_error", code=429),
        SingLoRAError: lambda exc: ApiError(400, str(exc)),
        RequestFailed: lambda exc: ApiError(500, str(exc), kind="internal_error", code=500),
        Exception: lambda exc: ApiError(500, f"internal error: {type(exc).__name__}", kind="internal_error",
                                        code=500),
    }
    for kind, convert in handlers.items():
        async def handle(_: Request, exc: Exception, convert: Any = convert) -> JSONResponse:
            return answer(convert(exc))
        app.add_exception_handler(kind, handle)


class ApiKey:
    """``Authorization: Bearer KEY`` checks: ``user`` (when a key is set) and ``admin`` (a key must be set)."""

    def __init__(self, key: str | None) -> None:
        self.key = key

    def user(self, request: Request) -> None:
        if self.key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
            raise ApiError(401, "Incorrect API key provided (send Authorization: Bearer <key>)",
                           code="invalid_api_key")

    def admin(self, request: Request) -> None:
        if self.key is None:
            raise ApiError(403, "the admin endpoints are off: start the server with --api-key to use them")
        self.user(request)


def openai_router(serving: OpenAIServing, keys: ApiKey) -> APIRouter:
    """The API's routes (behind the key when one is set)."""
    router = APIRouter(dependencies=[Depends(keys.user)])
    service = serving.service

    @router.get("/v1/models")
    async def models() -> dict:
        def card(name: str, parent: str | None) -> dict:
            return {"id": name, "object": "model", "created": service.created, "owned_by": "singlora",
                    "root": name, "parent": parent}
        return {"object": "list", "data": [card(service.name, None)] + [card(n, service.name) for n in service.keys]}

    @router.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: Request) -> Any:
        return await serving.completions(body, request)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request) -> Any:
        return await serving.chat(body, request)

    @router.post("/classify")
    @router.post("/v1/classify")
    async def classify(body: protocol.ClassificationRequest) -> dict:
        return await serving.classify(body)

    @router.post("/tokenize")
    async def tokenize(body: protocol.TokenizeRequest) -> dict:
        return serving.tokenize_request(body)

    @router.post("/detokenize")
    async def detokenize(body: protocol.DetokenizeRequest) -> dict:
        return serving.detokenize_request(body)

    return router


def info_router(service: Service) -> APIRouter:
    """Health, version and metrics (no key: load balancers and Prometheus scrape them)."""
    router = APIRouter()

    @router.get("/health")
    async def health() -> JSONResponse:
        alive = service.engine.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, 200 if alive else 503)

    @router.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    return router


def admin_router(service: Service, keys: ApiKey) -> APIRouter:
    """Run-time adapter management, behind the API key (off without one)."""
    router = APIRouter(dependencies=[Depends(keys.admin)])

    @router.post("/v1/load_lora_adapter")
    async def load_adapter(body: protocol.LoadAdapterRequest) -> dict:
        await service.load_runtime(body.lora_name, body.lora_path, body.replace)
        return {"object": "adapter", "id": body.lora_name, "status": "loaded"}

    @router.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: protocol.UnloadAdapterRequest) -> dict:
        service.unload_runtime(body.lora_name)
        return {"object": "adapter", "id": body.lora_name, "status": "unloaded"}

    @router.get("/v1/lora_adapters")
    async def adapters() -> dict:
        memory = service.bank.memory()
        data = [{"id": name, "bank_key": key, "in_flight": service.inflight.get(key, 0),
                 "bytes": memory["per_adapter"].get(key)} for name, key in service.keys.items()]
        return {"object": "list", "data": data, "allocated_bytes": memory["allocated"],
                "resident": memory["adapters"]}

    return router


def mount_playground(app: FastAPI) -> None:
    """``GET /``: the browser playground (``static/``); public files (no API key to load them)."""
    static = Path(__file__).with_name("static")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(static / "index.html")

    app.mount("/static", StaticFiles(directory=static), name="static")


def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, *,
                    header_timeout_s: float = 10.0) -> tuple[Any, threading.Thread, int]:
    """Run ``app`` with uvicorn in a background thread (tests, benchmarks); returns ``(server, thread, port)``.
    Stop it with ``server.should_exit = True; thread.join()``."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           http=header_timeout_protocol(header_timeout_s)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SingLoRAError("the server did not start")
        threading.Event().wait(0.01)
    return server, thread, sock.getsockname()[1]
