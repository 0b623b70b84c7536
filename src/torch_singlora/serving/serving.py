"""The OpenAI serving layer (vLLM's ``serving_completion`` / ``serving_chat`` / ``serving_tokenization``): a request
validated by ``protocol.py`` becomes prompts and sampling parameters checked against the server's limits, a
generation session (``Service.open_session``), and a JSON answer or a server-sent-event stream in the shapes of
``responses.py``. The routes (``app.py``) only call it.

Failures stay with their request: a choice that fails while generating (its sampling, its text, its adapter) ends
its own request alone, with a 500 carrying its own message, or on a stream with an OpenAI error event
(``data: {"error": {...}}``) and then ``data: [DONE]``. A client that goes away, streamed or not, cancels its rows
at once: they leave the engine's batch within one step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from . import protocol, responses
from .asgi import ApiError
from .engine import SamplingParams
from .service import Service
from .session import Choice, Event, GenerationSession
from .text import chat_prompt_ids

T = TypeVar("T")
DONE = "data: [DONE]\n\n"


def sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    """Return once the client has gone (or the response is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Run ``work`` while watching the connection: ``(True, result)``, or ``(False, None)`` as soon as the client
    disconnects (``work`` is then cancelled)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return True, task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False, None


class SessionStream(StreamingResponse):
    """Server-sent events of a session. A client that goes away cancels the session's rows at once (not at the next
    write), and the session is closed however the stream ends, even if it never started."""

    def __init__(self, session: GenerationSession, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.session = session

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await _disconnected(receive)
                self.session.cancel()
                group.cancel_scope.cancel()
        finally:
            self.session.close()


@dataclass(frozen=True)
class _Format:
    """How the completions and the chat API shape the same results."""

    chat: bool

    @property
    def prefix(self) -> str:
        return "chatcmpl" if self.chat else "cmpl"

    def object(self, stream: bool) -> str:
        if self.chat:
            return "chat.completion.chunk" if stream else "chat.completion"
        return "text_completion"

    def logprobs(self, service: Service, entries: list, offset: int = 0) -> dict[str, Any] | None:
        if not entries:
            return None
        if self.chat:
            return responses.chat_logprobs(entries, service.token_text)
        return responses.completion_logprobs(entries, service.token_text, offset)

    def choice(self, index: int, choice: Choice, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        build = responses.chat_choice if self.chat else responses.completion_choice
        return build(index, choice.text, choice.finish, logprobs)

    def chunk(self, index: int, text: str | None, finish: str | None, logprobs: dict[str, Any] | None = None,
              role: bool = False) -> dict[str, Any]:
        if not self.chat:
            return responses.completion_choice(index, text or "", finish, logprobs)
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return responses.chat_delta(index, delta, finish, logprobs)


COMPLETION, CHAT = _Format(chat=False), _Format(chat=True)


class OpenAIServing:
    """Completions, chat, classification and tokenization over a ``Service`` (module docstring)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def check_task(self, task: str) -> None:
        if self.service.task != task:
            route = "/classify" if self.service.task == "classify" else "/v1/completions or /v1/chat/completions"
            raise ApiError(400, f"this server runs a {self.service.task} model: use {route}")

    # ---- prompts and parameters ---------------------------------------------------------------------------------

    def tokenize(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.service.tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]

    def completion_prompts(self, body: protocol.CompletionRequest) -> list[list[int]]:
        prompt = body.prompt
        if isinstance(prompt, str):
            return self.tokenize([prompt])
        if prompt and all(isinstance(p, str) for p in prompt):
            return self.tokenize(prompt)
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return [list(p) for p in prompt]

    def chat_prompt(self, messages: list[protocol.ChatMessage]) -> list[int]:
        try:
            return chat_prompt_ids(self.service.tokenizer, [{"role": m.role, "content": m.text()} for m in messages])
        except ValueError as exc:  # SingLoRAError too
            message = str(exc) if str(exc).startswith("messages") else f"messages: {exc}"
            raise ApiError(400, message, param="messages") from None

    def check_ids(self, name: str, ids: Any) -> None:
        vocab = self.service.vocab_size
        if any(not 0 <= int(t) < vocab for t in ids):
            raise ApiError(400, f"{name}: token ids must be in [0, {vocab})", param=name)

    def check_prompts(self, prompts: list[list[int]], n: int) -> None:
        limits = self.service.limits
        if not prompts:
            raise ApiError(400, "prompt: no prompt given", param="prompt")
        if len(prompts) * n > limits.max_choices:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={n} exceeds this server's limit of "
                                f"{limits.max_choices} choices per request", param="n")
        for prompt in prompts:
            if not prompt:
                raise ApiError(400, "prompt: a prompt is empty", param="prompt")
            self.check_ids("prompt", prompt)
            if len(prompt) > limits.max_prompt_tokens:
                raise ApiError(400, f"prompt: {len(prompt)} tokens exceeds this server's limit of "
                                    f"{limits.max_prompt_tokens}", param="prompt")

    def sampling(self, body: protocol._Generate, prompts: list[list[int]], default_max_tokens: int) -> SamplingParams:
        """The engine's parameters for ``body``, checked against the server's limits and the model."""
        service, limits = self.service, self.service.limits
        self.check_prompts(prompts, body.n)
        requested = body.requested_max_tokens()
        if requested is not None and requested > limits.max_tokens:
            raise ApiError(400, f"max_tokens={requested} exceeds this server's limit of {limits.max_tokens}",
                           param="max_tokens")
        longest = max(map(len, prompts))
        room = service.max_model_len - longest
        max_tokens = requested if requested is not None else min(default_max_tokens, room)
        if max_tokens > room or max_tokens < 1:
            raise ApiError(400, f"This model's maximum context length is {service.max_model_len} tokens; the prompt "
                                f"has {longest} and max_tokens is {max_tokens}", param="max_tokens")
        if body.min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens={body.min_tokens} is more than max_tokens={max_tokens}",
                           param="min_tokens")
        self.check_ids("stop_token_ids", body.stop_token_ids or [])
        self.check_ids("logit_bias", (body.logit_bias or {}).keys())
        stops = set(body.stop_token_ids or ()) | (set() if body.ignore_eos else set(service.stop_token_ids))
        return body.sampling(max_tokens, frozenset(stops))

    # ---- generation ---------------------------------------------------------------------------------------------

    async def completions(self, body: protocol.CompletionRequest, request: Request) -> Any:
        self.check_task("generate")
        return await self._generate(body, self.completion_prompts(body), 16, COMPLETION, request)

    async def chat(self, body: protocol.ChatCompletionRequest, request: Request) -> Any:
        self.check_task("generate")
        prompt = self.chat_prompt(body.messages)
        return await self._generate(body, [prompt], self.service.limits.max_tokens, CHAT, request)

    async def _generate(self, body: protocol._Generate, prompts: list[list[int]], default_max_tokens: int,
                        form: _Format, request: Request) -> Any:
        params = self.sampling(body, prompts, default_max_tokens)
        session = self.service.open_session(body.model, prompts, body.n, params, body.stops(),
                                            skip_special_tokens=body.skip_special_tokens)
        head = {"id": responses.new_id(form.prefix), "object": form.object(body.stream),
                "created": responses.now(), "model": body.model}
        if body.stream:
            return SessionStream(session, self._events(session, form, head, body.include_usage()))
        try:
            finished, choices = await unless_disconnected(request, session.collect())
        finally:
            session.close()
        if not finished:
            return Response(status_code=499)  # nobody reads it: the client has gone
        failed = next((c.error for c in choices if c.error), None)
        if failed is not None:
            raise ApiError(500, f"generation failed: {failed}", kind="internal_error", code=500)
        return {**head, "choices": [form.choice(i, c, form.logprobs(self.service, c.logprobs))
                                    for i, c in enumerate(choices)],
                "usage": responses.usage(session.prompt_tokens, session.completion_tokens())}

    async def _events(self, session: GenerationSession, form: _Format, head: dict[str, Any],
                      include_usage: bool) -> AsyncIterator[str]:
        """The stream's events: a role chunk per choice (chat), a chunk per text piece (and its token's logprobs),
        a chunk per finish reason, the usage if asked, ``[DONE]``; an error event ends a stream whose choice failed."""
        def chunk(choice: dict[str, Any]) -> str:
            return sse({**head, "choices": [choice]})

        try:
            if form.chat:
                for index in range(len(session.requests)):
                    yield chunk(form.chunk(index, None, None, role=True))
            offsets = [0] * len(session.requests)
            async for event in session.events():
                if event.error is not None:
                    yield sse(responses.error_body(f"generation failed: {event.error}", "internal_error", code=500))
                    break
                text = self._piece(session, form, event, offsets)
                if text is not None:
                    yield chunk(text)
            else:
                if include_usage:
                    yield sse({**head, "choices": [],
                               "usage": responses.usage(session.prompt_tokens, session.completion_tokens())})
            yield DONE
        finally:
            session.close()

    def _piece(self, session: GenerationSession, form: _Format, event: Event, offsets: list[int]) -> dict | None:
        """The stream chunk of one event (None for a delta that adds nothing)."""
        if event.delta is None:
            return form.chunk(event.index, None, session.choices[event.index].finish)
        delta = event.delta
        entries = [(delta.token, delta.logprob, delta.top or [])] if delta.logprob is not None else []
        if not delta.text and not entries:
            return None
        logprobs = form.logprobs(self.service, entries, offsets[event.index])
        offsets[event.index] += len(delta.text)
        return form.chunk(event.index, delta.text, None, logprobs)

    # ---- classification and tokenization ------------------------------------------------------------------------

    async def classify(self, body: protocol.ClassificationRequest) -> dict[str, Any]:
        self.check_task("classify")
        limits = self.service.limits
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > limits.max_choices:
            raise ApiError(400, f"input: give 1 to {limits.max_choices} texts", param="input")
        sequences = [ids[: limits.max_prompt_tokens] for ids in self.tokenize(texts)]
        probabilities, labels = await self.service.classify(body.model, sequences)
        data = [{"index": i, "label": labels[int(p.argmax())], "probs": p.tolist(), "num_classes": len(p)}
                for i, p in enumerate(probabilities)]
        return {"id": responses.new_id("classify"), "object": "list", "created": responses.now(),
                "model": body.model, "data": data, "usage": responses.usage(sum(map(len, sequences)), 0)}

    def tokenize_request(self, body: protocol.TokenizeRequest) -> dict[str, Any]:
        """``POST /tokenize``: a prompt's ids, or the ids the chat endpoint would run for ``messages``."""
        if body.model is not None:
            self.service.resolve(body.model)
        if body.messages is not None:
            self.check_task("generate")
            tokens = self.chat_prompt(body.messages)
        else:
            tokens = self.tokenize([body.prompt], body.add_special_tokens)[0]
        return {"count": len(tokens), "max_model_len": self.service.max_model_len, "tokens": tokens,
                "token_strs": None}

    def detokenize_request(self, body: protocol.DetokenizeRequest) -> dict[str, Any]:
        if body.model is not None:
            self.service.resolve(body.model)
        self.check_ids("tokens", body.tokens)
        return {"prompt": self.service.tokenizer.decode(body.tokens)}
