"""The batching engines. ``GenerationEngine`` (here) batches causal-LM generation continuously, as vLLM does at the
iteration level; ``ClassificationEngine`` (``classify.py``) batches sequence classification. One worker thread
(``worker.py``) runs every forward; requests for any adapters share each batch through the ``AdapterBank``
(``bank.use(names)``, one adapter name per row).

Each step of the generation engine:

1. waiting requests form a *prefill group* (left-padded together) while the group's padded tokens fit the step's
   token budget (``max_step_tokens`` minus the running rows); a prompt longer than the budget is prefilled alone,
   in chunks of the budget, one chunk per step (chunked prefill: a long prompt delays the running rows by one
   chunk per step, never by its whole prefill). When the engine is idle it first waits ``batch_window_s`` for more
   requests to arrive;
2. rows that finished, were cancelled or failed since the last step leave the batch (their slots free);
3. the running rows decode one token each (one forward);
4. the prefill group runs its next chunk; when its prompts are done, its rows sample their first token and join
   the batch (their key/value rows padded on the left to the batch's length and appended);
5. rows that finished in this step leave: a cancelled request holds its row for at most one step.

Each row samples with its own parameters and generator (``sampling.py``) and detokenizes its text on this thread
(its ``text``: incremental, applying its stop strings), so nothing of the sort runs on the server's event loop.
Row isolation: everything computed for one row (sampling, stop strings, detokenizing, its adapter still being
served) runs under that row's own error handling, and a failure ends that row alone with an ``error`` event. Only
a failing forward fails the rows of that forward.

Events, through each request's ``emit(kind, value)`` on the worker thread: ``("token", Delta)`` per token (and one
``Delta`` without a token for text held back at the end), then ``("done", finish_reason)`` (``"stop"``,
``"length"``, ``"cancelled"``) or ``("error", message)``.
"""

from __future__ import annotations

import collections
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SingLoRAError
from .classify import ClassificationEngine, ClassificationRequest
from .sampling import History, Sampled, SamplingParams, sample
from .worker import Observer, Overloaded, UseAdapters, Worker

__all__ = ["ClassificationEngine", "ClassificationRequest", "Delta", "GenerationEngine", "GenerationRequest",
           "Overloaded", "SamplingParams"]


@dataclass
class Delta:
    """What one step added to a row: its ``token`` (None for text held back until the end), the ``text`` that
    became final, and the token's raw ``logprob`` and ``top`` ``[(token, logprob)]`` when the row asked."""

    token: int | None
    text: str = ""
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class Detokenizer(Protocol):
    """Turns a row's tokens into text as they come (``text.TextStream``); ``stopped`` once a stop string appeared."""

    stopped: bool

    def push(self, token: int) -> str: ...

    def flush(self) -> str: ...


@dataclass
class GenerationRequest:
    """One generation: ``adapter`` (a bank name or ``"__base__"``), ``prompt`` token ids, its sampling ``params``,
    ``emit`` (module docstring) and an optional ``text`` detokenizer. Set ``cancelled`` from any thread to stop it:
    its row leaves the batch at the next step."""

    adapter: str
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[str, Any], None]
    text: Detokenizer | None = None
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    history: History | None = None
    finish: str | None = None  # "stop", "length", "cancelled", "error"; "told" once its end was emitted
    error: str | None = None

    def fail(self, exc: BaseException) -> None:
        """End this row with an error (emitted when it leaves the batch)."""
        self.finish, self.error = "error", f"{type(exc).__name__}: {exc}"


@dataclass
class _Prefill:
    """A group of requests being prefilled: ``ids`` / ``mask`` ``(R, W)`` left-padded, ``cache`` their keys and
    values so far, ``done`` the columns already run."""

    requests: list[GenerationRequest]
    ids: Tensor
    mask: Tensor
    cache: Any
    done: int = 0


def _cache_argument(model: nn.Module) -> str:
    """The keyword a transformers causal LM takes its key/value cache by (``cache`` from transformers 5.2x,
    ``past_key_values`` before)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class GenerationEngine(Worker):
    """Continuous batching of ``GenerationRequest``s over a causal LM (module docstring).

    ``max_step_tokens``: the tokens one step may run (the running rows' one token each plus a prefill chunk); at
    least ``max_batch_size``. ``adapter_ok(name)``, if given, tells whether an adapter is still served: a row whose
    adapter is not fails alone.

    Attributes (batch state, worker thread only): ``rows`` (the running requests), ``cache`` (their key/value
    cache, rows left-padded to one length), ``mask`` ``(B, S)`` (1 = a real token), ``last`` ``(B,)``;
    ``prefilling`` (the group being prefilled), ``waiting`` (taken from the queue, not yet in a group).
    """

    def __init__(self, model: nn.Module, use_adapters: UseAdapters, *, max_batch_size: int = 16,
                 batch_window_s: float = 0.01, max_queue: int = 1024, max_step_tokens: int = 256,
                 adapter_ok: Callable[[str], bool] | None = None, observer: Observer | None = None) -> None:
        super().__init__(model, use_adapters, max_batch_size=max_batch_size, batch_window_s=batch_window_s,
                         max_queue=max_queue, observer=observer)
        if not isinstance(max_step_tokens, int) or max_step_tokens < max_batch_size:
            raise SingLoRAError(f"max_step_tokens={max_step_tokens!r} must be an int >= max_batch_size "
                                f"({max_batch_size})")
        from transformers import DynamicCache

        self.max_step_tokens = max_step_tokens
        self.adapter_ok = adapter_ok
        self._new_cache = lambda: DynamicCache(config=self.model.config)
        self._cache_kw = _cache_argument(self.model)
        self.rows: list[GenerationRequest] = []
        self.waiting: collections.deque[GenerationRequest] = collections.deque()
        self.prefilling: _Prefill | None = None
        self._reset_batch()

    # ---- one step -------------------------------------------------------------------------------------------------

    def _step(self) -> None:
        self._admit()
        self._check_adapters()
        self._drop_finished()
        if self.rows:
            self._guarded(self.rows, self._decode)
        if self.prefilling is not None:
            self._guarded(self.prefilling.requests, self._prefill_chunk)
        self._drop_finished()

    def _guarded(self, requests: list[GenerationRequest], run: Callable[[], None]) -> None:
        """``run()`` one forward; if it fails, ``requests`` (its rows) fail and nothing else does."""
        try:
            run()
        except Exception as exc:  # a bug or an OOM in this forward
            self._fail(list(requests), f"internal error: {type(exc).__name__}: {exc}")

    def _budget(self) -> int:
        """Prefill tokens this step may run besides the running rows' decode."""
        return max(1, self.max_step_tokens - len(self.rows))

    def _admit(self) -> None:
        """Take waiting requests up to the batch size; start a prefill group if none is running."""
        held = len(self.rows) + len(self.waiting) + (len(self.prefilling.requests) if self.prefilling else 0)
        self.waiting.extend(self._take(self.max_batch_size - held, wait=held == 0))
        for request in [r for r in self.waiting if r.cancelled or not self._served(r)]:
            self.waiting.remove(request)
            self._end(request)
        if self.prefilling is None and self.waiting:
            self.prefilling = self._group()

    def _served(self, request: GenerationRequest) -> bool:
        """False (and the request failed) if its adapter is no longer served."""
        if self.adapter_ok is None or request.finish is not None or self.adapter_ok(request.adapter):
            return True
        request.fail(SingLoRAError(f"adapter {request.adapter!r} is no longer served"))
        return False

    def _check_adapters(self) -> None:
        for request in self.rows:
            self._served(request)
        group = self.prefilling
        if group is not None and not all(self._served(r) and not r.cancelled for r in group.requests):
            self.prefilling = None  # restart it without them (a group of several fits one step: nothing is lost)
            self.waiting.extendleft(reversed([r for r in group.requests if r.finish is None and not r.cancelled]))
            for request in group.requests:
                if request.finish is not None or request.cancelled:
                    self._end(request)

    def _group(self) -> _Prefill:
        """The waiting requests (in order) whose left-padded prompts fit one step's budget; at least the first."""
        budget = self._budget()
        group = [self.waiting.popleft()]
        width = len(group[0].prompt)
        while self.waiting and max(width, len(self.waiting[0].prompt)) * (len(group) + 1) <= budget:
            group.append(self.waiting.popleft())
            width = max(width, len(group[-1].prompt))
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, request in enumerate(group):
            ids[i, width - len(request.prompt):] = torch.tensor(request.prompt)
            mask[i, width - len(request.prompt):] = 1
            if request.params.seed is not None:
                request.generator = torch.Generator().manual_seed(request.params.seed)
        return _Prefill(group, ids.to(self.device), mask.to(self.device), self._new_cache())

    # ---- forwards -------------------------------------------------------------------------------------------------

    def _forward(self, kind: str, names: list[str], ids: Tensor, mask: Tensor, positions: Tensor,
                 cache: Any) -> Tensor:
        """Logits of the last position, ``(B, vocab)``, float32."""
        with self.use_adapters(names):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{self._cache_kw: cache})
        self._observe(kind, len(names), ids.numel() if kind == "decode" else int(mask[:, -ids.shape[1]:].sum()))
        return out.logits[:, -1].float()

    def _decode(self) -> None:
        """One token for every running row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)
        positions = self.mask.sum(1, keepdim=True) - 1
        logits = self._forward("decode", [r.adapter for r in self.rows], self.last[:, None], self.mask, positions,
                               self.cache)
        self._accept(list(range(len(self.rows))), sample(logits, self.rows))

    def _prefill_chunk(self) -> None:
        """The prefill group's next chunk; when its prompts are done, its rows join the batch with a first token."""
        group = self.prefilling
        width = group.ids.shape[1]
        end = min(width, group.done + max(1, self._budget() // len(group.requests)))
        positions = (group.mask.cumsum(1) - 1).clamp(min=0)
        logits = self._forward("prefill", [r.adapter for r in group.requests], group.ids[:, group.done:end],
                               group.mask[:, :end], positions[:, group.done:end], group.cache)
        group.done = end
        if end < width:
            return
        self.prefilling = None
        for request in group.requests:
            if request.params.penalized:
                request.history = History(request.prompt, logits.shape[-1])
        start = len(self.rows)
        self._join(group)
        self._accept(list(range(start, len(self.rows))), sample(logits, group.requests))

    def _join(self, group: _Prefill) -> None:
        """Append a prefilled group's rows to the batch (pad the shorter of the two caches on the left)."""
        if not self.rows:
            self.cache, self.mask = group.cache, group.mask
        else:
            length = max(self.mask.shape[1], group.mask.shape[1])
            old_mask = self._pad_left(self.cache, self.mask, length - self.mask.shape[1])
            new_mask = self._pad_left(group.cache, group.mask, length - group.mask.shape[1])
            for old, new in zip(self.cache.layers, group.cache.layers):
                old.keys = torch.cat([old.keys, new.keys])
                old.values = torch.cat([old.values, new.values])
            self.mask = torch.cat([old_mask, new_mask])
        self.rows = self.rows + group.requests
        self.last = torch.cat([self.last, self.last.new_zeros(len(group.requests))])

    @staticmethod
    def _pad_left(cache: Any, mask: Tensor, pad: int) -> Tensor:
        """Pad ``cache``'s keys and values (in place) and ``mask`` ``(B, L)`` by ``pad`` positions on the left;
        returns the padded mask ``(B, L + pad)``."""
        if pad:
            for layer in cache.layers:
                layer.keys = F.pad(layer.keys, (0, 0, pad, 0))
                layer.values = F.pad(layer.values, (0, 0, pad, 0))
        return F.pad(mask, (pad, 0))

    # ---- rows -----------------------------------------------------------------------------------------------------

    def _accept(self, indices: list[int], results: Sequence[Sampled | Exception]) -> None:
        """Rows ``indices`` sampled ``results``: record each token as its row's last and advance the row; a row
        whose sampling or advance fails ends alone."""
        self.last[indices] = torch.tensor([r.token if isinstance(r, Sampled) else 0 for r in results],
                                          device=self.device)
        for i, result in zip(indices, results):
            request = self.rows[i]
            if request.finish is not None or request.cancelled:
                continue
            try:
                if isinstance(result, Exception):
                    raise result
                self._advance(request, result)
            except Exception as exc:  # noqa: BLE001 - this row's failure, reported to it alone
                request.fail(exc)

    @staticmethod
    def _advance(request: GenerationRequest, sampled: Sampled) -> None:
        """Record ``sampled`` on ``request``, emit its text, and finish the row on a stop token, a stop string or
        its length."""
        token = sampled.token
        request.generated.append(token)
        if request.history is not None:
            request.history.add(token)
        if token in request.params.stop_token_ids:
            request.finish = "stop"
            return
        piece = request.text.push(token) if request.text is not None else ""
        request.emit("token", Delta(token, piece, sampled.logprob, sampled.top))
        if request.text is not None and request.text.stopped:
            request.finish = "stop"
        elif len(request.generated) >= request.params.max_tokens:
            request.finish = "length"

    def _end(self, request: GenerationRequest) -> None:
        """Tell a request it ended: its held-back text, then ``done`` (or its ``error``). Once."""
        if request.finish is None:
            request.finish = "cancelled"
        if request.finish == "told":
            return
        finish, request.finish = request.finish, "told"
        if finish == "error":
            request.emit("error", request.error)
            return
        try:
            tail = request.text.flush() if request.text is not None and finish != "cancelled" else ""
        except Exception as exc:  # noqa: BLE001 - this row's failure alone
            request.emit("error", f"{type(exc).__name__}: {exc}")
            return
        if tail:
            request.emit("token", Delta(None, tail))
        request.emit("done", finish)

    def _drop_finished(self) -> None:
        """Take finished and cancelled rows out of the batch (their slots free) and tell them."""
        keep = [i for i, r in enumerate(self.rows) if r.finish is None and not r.cancelled]
        if len(keep) == len(self.rows):
            return
        for request in self.rows:
            if request.finish is not None or request.cancelled:
                self._end(request)
        self._select(keep)

    def _select(self, keep: list[int]) -> None:
        """Keep only rows ``keep``; drop the left columns that are padding in every remaining row."""
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._reset_batch()
            return
        index = torch.tensor(keep, device=self.device)
        self.mask, self.last = self.mask[index], self.last[index]
        trim = int((self.mask.cumsum(1) == 0).sum(1).min())
        self.mask = self.mask[:, trim:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, trim:], layer.values[index, :, trim:]

    def _reset_batch(self) -> None:
        self.rows, self.cache = [], None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.last = torch.zeros(0, dtype=torch.long)

    def _in_flight(self) -> list[GenerationRequest]:
        return self.rows + (self.prefilling.requests if self.prefilling else []) + list(self.waiting)

    def _fail(self, requests: list[GenerationRequest], message: str) -> None:
        """``requests`` failed in a forward (or the server stops): tell them, and drop the state they were in."""
        failed = {id(r) for r in requests}
        for request in requests:
            if request.finish != "told":
                request.finish = "told"
                request.emit("error", message)
        if any(id(r) in failed for r in self.rows):  # a failed decode leaves the batch's cache half-written
            for request in self.rows:
                if id(request) not in failed:
                    request.fail(SingLoRAError(message))
                    self._end(request)
            self._reset_batch()
        if self.prefilling is not None and any(id(r) in failed for r in self.prefilling.requests):
            self.prefilling = None
        self.waiting = collections.deque(r for r in self.waiting if id(r) not in failed)
