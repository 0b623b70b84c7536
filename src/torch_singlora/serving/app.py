"""The HTTP server: FastAPI routes that speak the OpenAI API (as vLLM's server does) over a ``Service``.

Routes: ``GET /v1/models`` (the base model, then every adapter, each with ``parent``), ``POST /v1/completions``,
``POST /v1/chat/completions`` (chat template; ``stream=true`` gives server-sent events ending in ``data: [DONE]``),
``POST /classify`` and ``/v1/classify`` (classification models, vLLM's shape), ``GET /health``; behind the API
key only (and only when one is set): ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``,
``GET /v1/lora_adapters`` (memory per adapter). The request's ``model`` picks the adapter. ``GET /`` is the browser
playground (``static/``: chat and side-by-side comparison over this API).

Every bad request gets a 4xx with OpenAI's error body and the server goes on serving: 400 (invalid JSON, fields,
options not implemented, limits), 401 (API key), 403 (admin without a key), 404 (unknown model), 413 (body too
large), 429 (queue full). A client that disconnects (mid-stream or not) cancels its rows at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from ..errors import SingLoRAError
from . import protocol
from .asgi import ApiError, BodyLimit
from .engine import ClassificationRequest, GenerationRequest, Overloaded, SamplingParams
from .service import NotFound, Service
from .text import TextStream, chat_prompt_ids


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


class _Choices:
    """The engine requests of one API request (one per prompt x n), their text streams and results."""

    def __init__(self, service: Service, key: str, prompts: list[list[int]], n: int, params: SamplingParams,
                 stops: list[str]) -> None:
        self.service, self.key = service, key
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.prompt_tokens = sum(map(len, prompts))
        self.requests: list[GenerationRequest] = []
        self.streams: list[TextStream] = []
        for prompt in prompts:
            for j in range(n):
                index = len(self.requests)
                seed = None if params.seed is None else params.seed + j
                sampling = SamplingParams(params.max_tokens, params.temperature, params.top_p, seed,
                                          params.stop_token_ids)
                self.requests.append(GenerationRequest(key, prompt, sampling, self._emitter(index)))
                self.streams.append(TextStream(service.tokenizer, stops))
        self.texts = [""] * len(self.requests)
        self.finish: list[str | None] = [None] * len(self.requests)
        self.closed = False

    def _emitter(self, index: int) -> Callable[[str, Any], None]:
        def emit(kind: str, value: Any) -> None:  # on the engine's thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is stopping
                self.loop.call_soon_threadsafe(self.events.put_nowait, (index, kind, value))
        return emit

    def submit(self) -> None:
        self.service.acquire(self.key)
        try:
            for request in self.requests:
                self.service.engine.submit(request)
        except Overloaded as exc:
            self.close()
            raise ApiError(429, str(exc), kind="server_busy_error", code=429) from None

    def close(self) -> None:
        """Cancel what is still running and release the adapter (once; safe to call again)."""
        for request in self.requests:
            request.cancelled = True
        if not self.closed:
            self.closed = True
            self.service.release(self.key)

    async def pieces(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """``(choice index, text piece, finish reason or None)`` as the engine produces tokens; releases the
        adapter and cancels what is left when the consumer stops early (a disconnect)."""
        left = len(self.requests)
        try:
            while left:
                index, kind, value = await self.events.get()
                if self.finish[index] is not None:
                    continue
                stream = self.streams[index]
                if kind == "token":
                    piece = stream.push(value)
                    if stream.stopped:  # a stop string: end this choice now
                        self.requests[index].cancelled = True
                        self.finish[index], left = "stop", left - 1
                        yield index, piece, "stop"
                    elif piece:
                        yield index, piece, None
                elif kind == "done":
                    self.finish[index], left = ("stop" if value == "cancelled" else value), left - 1
                    yield index, stream.flush(), self.finish[index]
                else:
                    raise ApiError(500, str(value), kind="internal_error", code=500)
        finally:
            self.close()

    async def collect(self, is_disconnected: Callable) -> None:
        """Run to the end, keeping the texts; stops early (cancelling) if the client goes away."""
        pieces = self.pieces()
        try:
            while True:
                next_piece = asyncio.ensure_future(pieces.__anext__())
                while not next_piece.done():
                    await asyncio.wait([next_piece], timeout=0.5)
                    if not next_piece.done() and await is_disconnected():
                        next_piece.cancel()
                        return
                try:
                    index, piece, _ = next_piece.result()
                except StopAsyncIteration:
                    return
                self.texts[index] += piece
        finally:
            await pieces.aclose()
            self.close()

    def completion_tokens(self) -> int:
        return sum(len(r.generated) for r in self.requests)


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
    app.add_middleware(BodyLimit, limit=service.limits.max_body_bytes)

    def answer(error: ApiError) -> JSONResponse:
        return JSONResponse(protocol.error_body(error.message, error.kind, error.param, error.code), error.status)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        param = where or None
        return answer(ApiError(400, f"{where or 'body'}: {first.get('msg')}", param=param))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return answer(ApiError(exc.status_code, str(exc.detail), code=exc.status_code))

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return answer(ApiError(404, str(exc), param="model", code="model_not_found"))

    @app.exception_handler(SingLoRAError)
    async def _bad(_: Request, exc: SingLoRAError) -> JSONResponse:
        return answer(ApiError(400, str(exc)))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return answer(ApiError(500, f"internal error: {type(exc).__name__}", kind="internal_error", code=500))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "Incorrect API key provided (send Authorization: Bearer <key>)",
                           code="invalid_api_key")

    def admin(request: Request) -> None:
        if api_key is None:
            raise ApiError(403, "the admin endpoints are off: start the server with --api-key to use them")
        authorize(request)

    limits = service.limits

    def check_task(task: str) -> None:
        if service.task != task:
            route = "/classify" if service.task == "classify" else "/v1/completions or /v1/chat/completions"
            raise ApiError(400, f"this server runs a {service.task} model: use {route}")

    def sampling(body: protocol._Request, prompts: list[list[int]], default_max_tokens: int) -> SamplingParams:
        unsupported = body.unsupported()
        if unsupported:
            raise ApiError(400, f"not supported by this server: {', '.join(unsupported)}", param=unsupported[0])
        if not prompts:
            raise ApiError(400, "prompt: no prompt given", param="prompt")
        if len(prompts) * body.n > limits.max_choices:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={body.n} exceeds this server's limit of "
                                f"{limits.max_choices} choices per request", param="n")
        requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if requested is not None and requested > limits.max_tokens:
            raise ApiError(400, f"max_tokens={requested} exceeds this server's limit of {limits.max_tokens}",
                           param="max_tokens")
        vocab = len(service.tokenizer)
        longest = max(map(len, prompts))
        for prompt in prompts:
            if not prompt:
                raise ApiError(400, "prompt: a prompt is empty", param="prompt")
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        if longest > limits.max_prompt_tokens:
            raise ApiError(400, f"prompt: {longest} tokens exceeds this server's limit of {limits.max_prompt_tokens}",
                           param="prompt")
        room = service.max_model_len - longest
        max_tokens = requested if requested is not None else min(default_max_tokens, room)
        if max_tokens > room:
            raise ApiError(400, f"This model's maximum context length is {service.max_model_len} tokens; the prompt "
                                f"has {longest} and max_tokens is {max_tokens}", param="max_tokens")
        return SamplingParams(max_tokens, body.temperature, body.top_p, body.seed, service.stop_token_ids)

    async def generate(body: protocol._Request, prompts: list[list[int]], default_max_tokens: int, chat: bool,
                       request: Request) -> Any:
        key = service.resolve(body.model)
        params = sampling(body, prompts, default_max_tokens)
        choices = _Choices(service, key, prompts, body.n, params, body.stops())
        choices.submit()
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": protocol.now(),
                "model": body.model}
        if not body.stream:
            await choices.collect(request.is_disconnected)
            build = protocol.chat_choice if chat else protocol.completion_choice
            return {**head, "choices": [build(i, text, choices.finish[i]) for i, text in enumerate(choices.texts)],
                    "usage": protocol.usage(choices.prompt_tokens, choices.completion_tokens())}
        chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(index: int, piece: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece else {})
                return _sse({**chunk_head, "choices": [protocol.chat_delta(index, delta, finish)]})
            return _sse({**chunk_head, "choices": [protocol.completion_choice(index, piece or "", finish)]})

        async def events() -> AsyncIterator[str]:
            if chat:
                for index in range(len(choices.requests)):
                    yield chunk(index, None, None, role=True)
            async for index, piece, finish in choices.pieces():
                if piece and finish:  # the last text, then the finish reason in a chunk of its own
                    yield chunk(index, piece, None)
                    piece = None
                yield chunk(index, piece, finish)
            if body.include_usage():
                yield _sse({**chunk_head, "choices": [],
                            "usage": protocol.usage(choices.prompt_tokens, choices.completion_tokens())})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(choices.close))

    def tokenize(texts: list[str]) -> list[list[int]]:
        return [service.tokenizer(text)["input_ids"] for text in texts]

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        def card(name: str, parent: str | None) -> dict:
            return {"id": name, "object": "model", "created": service.created, "owned_by": "singlora",
                    "root": name, "parent": parent}
        return {"object": "list", "data": [card(service.name, None)] + [card(n, service.name) for n in service.keys]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: protocol.CompletionRequest, request: Request) -> Any:
        check_task("generate")
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = tokenize([prompt])
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = tokenize(prompt)
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = [list(p) for p in prompt]
        return await generate(body, prompts, 16, False, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request) -> Any:
        check_task("generate")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            prompt = chat_prompt_ids(service.tokenizer, messages)
        except ValueError as exc:  # SingLoRAError too
            message = str(exc) if str(exc).startswith("messages") else f"messages: {exc}"
            raise ApiError(400, message, param="messages") from None
        return await generate(body, [prompt], limits.max_tokens, True, request)

    @app.post("/classify", dependencies=[Depends(authorize)])
    @app.post("/v1/classify", dependencies=[Depends(authorize)])
    async def classify(body: protocol.ClassificationRequest) -> dict:
        check_task("classify")
        key = service.resolve(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > limits.max_choices:
            raise ApiError(400, f"input: give 1 to {limits.max_choices} texts", param="input")
        sequences = [ids[: limits.max_prompt_tokens] for ids in tokenize(texts)]
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def emit(kind: str, value: Any) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result((kind, value)))

        job = ClassificationRequest(key, sequences, emit)
        service.acquire(key)
        try:
            try:
                service.engine.submit(job)
            except Overloaded as exc:
                raise ApiError(429, str(exc), kind="server_busy_error", code=429) from None
            kind, value = await done
        finally:
            job.cancelled = True
            service.release(key)
        if kind == "error":
            raise ApiError(500, str(value), kind="internal_error", code=500)
        labels = service.labels_for(key)
        data = [{"index": i, "label": labels[int(p.argmax())], "probs": p.tolist(), "num_classes": len(p)}
                for i, p in enumerate(value)]
        return {"id": protocol.new_id("classify"), "object": "list", "created": protocol.now(), "model": body.model,
                "data": data, "usage": protocol.usage(sum(map(len, sequences)), 0)}

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(admin)])
    async def load_adapter(body: protocol.LoadAdapterRequest) -> dict:
        await service.load_runtime(body.lora_name, body.lora_path, body.replace)
        return {"object": "adapter", "id": body.lora_name, "status": "loaded"}

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(admin)])
    async def unload_adapter(body: protocol.UnloadAdapterRequest) -> dict:
        service.unload_runtime(body.lora_name)
        return {"object": "adapter", "id": body.lora_name, "status": "unloaded"}

    @app.get("/v1/lora_adapters", dependencies=[Depends(admin)])
    async def adapters() -> dict:
        memory = service.bank.memory()
        data = [{"id": name, "bank_key": key, "in_flight": service.inflight.get(key, 0),
                 "bytes": memory["per_adapter"].get(key)} for name, key in service.keys.items()]
        return {"object": "list", "data": data, "allocated_bytes": memory["allocated"],
                "resident": memory["adapters"]}

    static = Path(__file__).with_name("static")  # the browser playground: public files (no API key to load them)

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(static / "index.html")

    app.mount("/static", StaticFiles(directory=static), name="static")
    return app


def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> tuple[Any, threading.Thread, int]:
    """Run ``app`` with uvicorn in a background thread (tests, benchmarks); returns ``(server, thread, port)``.
    Stop it with ``server.should_exit = True; thread.join()``."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SingLoRAError("the server did not start")
        threading.Event().wait(0.01)
    return server, thread, sock.getsockname()[1]


