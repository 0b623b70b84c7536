"""One API request's generation (``GenerationSession``): the engine rows it runs (one per prompt x ``n``), their
events brought back to the event loop, and its life: opened by ``Service.open_session`` (adapter acquired, rows
submitted), read (``events()`` or ``collect()``), closed (rows cancelled, adapter released, metrics recorded),
each once, whichever way the request ends: answered, streamed, abandoned by its client, failed or refused."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from .engine import Delta, GenerationRequest, SamplingParams
from .responses import TokenLogprob
from .text import TextStream


class Host(Protocol):
    """What a session needs of the ``Service`` that opens it."""

    tokenizer: Any
    engine: Any
    metrics: Any

    def acquire(self, key: str) -> None: ...

    def release(self, key: str) -> None: ...


@dataclass
class Choice:
    """What one row produced: its text pieces, its tokens' logprobs (when asked), how it ended."""

    pieces: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass
class Event:
    """One thing that happened to choice ``index``: a ``delta`` (text and logprobs), its ``finish`` reason, or its
    ``error``."""

    index: int
    delta: Delta | None = None
    finish: str | None = None
    error: str | None = None


class GenerationSession:
    """The rows of one API request (module docstring). ``model`` is the public name (for metrics), ``key`` the bank
    key serving it; ``params`` apply to every row (choice ``j`` of a prompt seeded ``seed + j``)."""

    def __init__(self, service: Host, model: str, key: str, prompts: list[list[int]], n: int,
                 params: SamplingParams, stops: list[str], *, skip_special_tokens: bool = True) -> None:
        self.service, self.model, self.key = service, model, key
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.prompt_tokens = sum(map(len, prompts)) * n
        self.requests: list[GenerationRequest] = []
        for prompt in prompts:
            for j in range(n):
                seeded = params if params.seed is None else dataclasses.replace(params, seed=params.seed + j)
                text = TextStream(service.tokenizer, stops, skip_special_tokens=skip_special_tokens)
                self.requests.append(GenerationRequest(key, prompt, seeded, self._emitter(len(self.requests)), text))
        self.choices = [Choice() for _ in self.requests]
        self.opened = self.closed = False

    def _emitter(self, index: int) -> Callable[[str, Any], None]:
        def emit(kind: str, value: Any) -> None:  # on the engine's thread
            event = (Event(index, delta=value) if kind == "token" else
                     Event(index, finish=value) if kind == "done" else Event(index, error=str(value)))
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is stopping
                self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        return emit

    def open(self) -> None:
        """Acquire the adapter and submit every row (``Overloaded`` if the queue is full: nothing stays behind)."""
        self.service.acquire(self.key)
        self.opened = True
        try:
            for request in self.requests:
                self.service.engine.submit(request)
        except BaseException:
            self.close("refused")
            raise

    def cancel(self) -> None:
        """Stop every row (each leaves the engine's batch at its next step)."""
        for request in self.requests:
            request.cancelled = True

    def close(self, outcome: str | None = None) -> None:
        """Cancel what still runs, release the adapter, record the request's metrics. Once; safe to call again."""
        self.cancel()
        if self.closed or not self.opened:
            return
        self.closed = True
        self.service.release(self.key)
        if outcome is None:
            ends = {c.finish for c in self.choices}
            outcome = ("error" if any(c.error for c in self.choices) else
                       "cancelled" if None in ends or "cancelled" in ends else "ok")
        self.service.metrics.request_done(self.model, outcome, self.prompt_tokens, self.completion_tokens())

    def completion_tokens(self) -> int:
        return sum(len(r.generated) for r in self.requests)

    async def events(self) -> AsyncIterator[Event]:
        """Every choice's events in order, until each has finished or failed; the choices' state follows."""
        left = len(self.requests)
        while left:
            event = await self.queue.get()
            choice = self.choices[event.index]
            if choice.finish is not None or choice.error is not None:
                continue
            if event.delta is not None:
                choice.pieces.append(event.delta.text)
                if event.delta.logprob is not None:
                    choice.logprobs.append((event.delta.token, event.delta.logprob, event.delta.top or []))
            else:
                choice.finish = "stop" if event.finish == "cancelled" else event.finish
                choice.error = event.error
                left -= 1
            yield event

    async def collect(self) -> list[Choice]:
        """Run every choice to its end; the choices."""
        async for _ in self.events():
            pass
        return self.choices

