"""The batching engines: one worker thread runs every forward, requests for any adapters share each batch.

``GenerationEngine`` (causal LMs) batches continuously, as vLLM does at the iteration level: a request joins the
running batch at the next decoding step (when the engine is idle it first waits ``batch_window_s`` for others to
arrive), and leaves it as soon as it finishes or is cancelled, so its slot goes to the next waiting request. New
requests are prefilled together (left-padded), then their key/value cache rows are padded on the left to the running
batch's length and appended to it; each step decodes one token for every row. Each row uses its own adapter
through the ``AdapterBank`` (``bank.use(names)``), its own sampling parameters and random generator.

``ClassificationEngine`` (sequence classification) batches requests arriving within the window into one forward.

Changes to the bank (``run_in_worker``) run on the worker thread between two steps, so a forward never sees a bank
half-changed. Events go back through each request's ``emit`` callback, called on the worker thread.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SingLoRAError


@dataclass
class SamplingParams:
    """How one request samples. ``temperature == 0``: greedy. ``seed``: a reproducible stream for this request."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()


@dataclass
class GenerationRequest:
    """One generation: ``adapter`` (a bank name or ``"__base__"``), ``prompt`` token ids, and ``emit(kind,
    value)`` called on the worker thread with ``("token", id)`` per token, then ``("done", finish_reason)``
    (``"stop"``, ``"length"``, ``"cancelled"``) or ``("error", message)``. Set ``cancelled`` from any thread
    to stop it: its row leaves the batch at the next step."""

    adapter: str
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[str, Any], None]
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    finish: str | None = None


@dataclass
class ClassificationRequest:
    """Sequences to classify with one adapter; ``emit("done", probabilities (N, labels))`` or ``("error", msg)``."""

    adapter: str
    sequences: list[list[int]]
    emit: Callable[[str, Any], None]
    cancelled: bool = False


class Overloaded(SingLoRAError):
    """The engine's queue is full."""


UseAdapters = Callable[[list[str]], ContextManager[Any]]  # names, one per row -> a context for one forward


class _Worker:
    """A thread that takes requests from a queue and runs ``_step`` until stopped; bank changes in between.

    ``model`` runs every forward inside ``use_adapters(names)`` (one adapter name per row): ``AdapterBank.use``,
    or any other mixed-adapter mechanism (the serving benchmark passes PEFT's).
    """

    def __init__(self, model: nn.Module, use_adapters: UseAdapters, *, max_batch_size: int, batch_window_s: float,
                 max_queue: int) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise SingLoRAError(f"max_batch_size={max_batch_size!r} must be an int >= 1")
        self.model = model
        self.use_adapters = use_adapters
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.max_queue = max_queue
        self.pending: queue.Queue = queue.Queue()
        self.admin: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0  # forwards run (for tests and stats)
        self.most_rows = 0  # the most rows one forward has run

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are (inputs go there)."""
        return next(self.model.parameters()).device

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker; requests still running or waiting get an error event (nobody waits forever)."""
        self._stop.set()
        self.pending.put(None)
        if self._thread is not None:
            self._thread.join()
        self._fail("the server is stopping")
        while True:
            try:
                item = self.pending.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item.emit("error", "the server is stopping")

    def submit(self, request: Any) -> None:
        """Queue a request; ``Overloaded`` if ``max_queue`` requests already wait."""
        if self.pending.qsize() >= self.max_queue:
            raise Overloaded(f"the server is busy: {self.max_queue} requests are waiting; retry later")
        self.pending.put(request)

    def run_in_worker(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn()`` on the worker thread between two forwards; its result or exception in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.admin.put((fn, future))
        self.pending.put(None)  # wake an idle worker
        return future

    def _run_admin(self) -> None:
        while True:
            try:
                fn, future = self.admin.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # the caller gets it
                future.set_exception(exc)

    def _take(self, room: int, wait: bool) -> list[Any]:
        """Up to ``room`` waiting requests; ``wait``: block for the first one, then gather for the window."""
        taken: list[Any] = []
        deadline = None
        while len(taken) < room and not self._stop.is_set():
            try:
                if wait and not taken:
                    item = self.pending.get(timeout=0.1)
                elif deadline is not None:
                    item = self.pending.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    item = self.pending.get_nowait()
            except queue.Empty:
                if wait and not taken:
                    self._run_admin()
                    continue
                break
            if item is None:  # a wake-up
                self._run_admin()
                continue
            if item.cancelled:
                item.emit("done", "cancelled")
                continue
            taken.append(item)
            if wait and deadline is None:
                deadline = time.monotonic() + self.batch_window_s
        return taken

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._run_admin()
            try:
                self._step()
            except Exception as exc:  # a bug or an OOM: fail the requests in flight, keep serving
                self._fail(f"internal error: {type(exc).__name__}: {exc}")

    def _step(self) -> None:
        raise NotImplementedError

    def _fail(self, message: str) -> None:
        raise NotImplementedError


def _cache_argument(model: nn.Module) -> str:
    """The keyword a transformers causal LM takes its key/value cache by (``cache`` from transformers 5.2x,
    ``past_key_values`` before)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class GenerationEngine(_Worker):
    """Continuous batching of ``GenerationRequest``s over a causal LM with an ``AdapterBank`` (module docstring).

    Attributes (batch state, worker thread only): ``rows`` (the running requests), ``cache`` (their key/value
    cache, rows left-padded to one length), ``mask`` ``(B, S)`` (1 = a real token), ``last`` ``(B,)``.
    """

    def __init__(self, model: nn.Module, use_adapters: UseAdapters, *, max_batch_size: int = 16,
                 batch_window_s: float = 0.01, max_queue: int = 1024) -> None:
        super().__init__(model, use_adapters, max_batch_size=max_batch_size, batch_window_s=batch_window_s,
                         max_queue=max_queue)
        from transformers import DynamicCache

        self._new_cache = lambda: DynamicCache(config=self.model.config)
        self._cache_kw = _cache_argument(self.model)
        self.rows: list[GenerationRequest] = []
        self.joining: list[GenerationRequest] = []  # requests being prefilled (failed too if the forward fails)
        self.cache: Any = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.last = torch.zeros(0, dtype=torch.long)

    def _forward(self, names: list[str], ids: Tensor, mask: Tensor, positions: Tensor, cache: Any) -> Tensor:
        """Logits of the last position, ``(B, vocab)``, float32."""
        with self.use_adapters(names):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{self._cache_kw: cache})
        self.steps += 1
        return out.logits[:, -1].float()

    def _prefill(self, requests: list[GenerationRequest]) -> Tensor:
        """Run the new prompts (left-padded) and append their rows to the batch; their last-position logits."""
        width = max(len(r.prompt) for r in requests)
        ids = torch.zeros(len(requests), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, request in enumerate(requests):
            ids[i, width - len(request.prompt):] = torch.tensor(request.prompt)
            mask[i, width - len(request.prompt):] = 1
            if request.params.seed is not None:
                request.generator = torch.Generator().manual_seed(request.params.seed)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = self._new_cache()
        logits = self._forward([r.adapter for r in requests], ids, mask, positions, cache)
        if not self.rows:
            self.cache, self.mask = cache, mask
        else:  # pad the shorter of the two on the left, then stack the rows
            length = max(self.mask.shape[1], width)
            old_mask = self._pad_left(self.cache, self.mask, length - self.mask.shape[1])
            new_mask = self._pad_left(cache, mask, length - width)
            for old, new in zip(self.cache.layers, cache.layers):
                old.keys = torch.cat([old.keys, new.keys])
                old.values = torch.cat([old.values, new.values])
            self.mask = torch.cat([old_mask, new_mask])
        self.rows = self.rows + requests
        self.most_rows = max(self.most_rows, len(self.rows))
        self.last = torch.cat([self.last, self.last.new_zeros(len(requests))])
        return logits

    @staticmethod
    def _pad_left(cache: Any, mask: Tensor, pad: int) -> Tensor:
        """Pad ``cache``'s keys and values (in place) and ``mask`` ``(B, L)`` by ``pad`` positions on the left;
        returns the padded mask ``(B, L + pad)``."""
        if pad:
            for layer in cache.layers:
                layer.keys = F.pad(layer.keys, (0, 0, pad, 0))
                layer.values = F.pad(layer.values, (0, 0, pad, 0))
        return F.pad(mask, (pad, 0))

    def _decode(self) -> Tensor:
        """One token for every running row; their logits."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)
        positions = self.mask.sum(1, keepdim=True) - 1
        return self._forward([r.adapter for r in self.rows], self.last[:, None], self.mask, positions, self.cache)

    def _sample(self, logits: Tensor, requests: list[GenerationRequest]) -> Tensor:
        """One token per row: greedy at temperature 0, else nucleus sampling with the row's generator."""
        tokens = logits.argmax(-1)
        for i, request in enumerate(requests):
            params = request.params
            if params.temperature == 0:
                continue
            probs = torch.softmax(logits[i] / params.temperature, -1)
            if params.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p  # the smallest set reaching top_p
                probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
            tokens[i] = torch.multinomial(probs.cpu(), 1, generator=request.generator)[0]
        return tokens

    def _advance(self, rows: list[int], tokens: Tensor) -> None:
        """Rows ``rows`` got ``tokens``: record them as the rows' last tokens and emit them (or finish the row)."""
        self.last[rows] = tokens.to(self.device)
        for i, token in zip(rows, tokens.tolist()):
            request = self.rows[i]
            if request.cancelled:
                continue
            request.generated.append(token)
            if token in request.params.stop_token_ids:
                request.finish = "stop"
                continue
            request.emit("token", token)
            if len(request.generated) >= request.params.max_tokens:
                request.finish = "length"

    def _drop_finished(self) -> None:
        """Tell finished and cancelled rows they are done and take them out of the batch (their slots free)."""
        keep = []
        for i, request in enumerate(self.rows):
            if request.cancelled and request.finish is None:
                request.finish = "cancelled"
            if request.finish is None:
                keep.append(i)
            else:
                request.emit("done", request.finish)
        if len(keep) < len(self.rows):
            self._select(keep)

    def _select(self, keep: list[int]) -> None:
        """Keep only rows ``keep``; drop the left columns that are padding in every remaining row."""
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask, self.last = None, self.mask[:0, :0], self.last[:0]
            return
        index = torch.tensor(keep, device=self.device)
        self.mask, self.last = self.mask[index], self.last[index]
        trim = int((self.mask.cumsum(1) == 0).sum(1).min())
        self.mask = self.mask[:, trim:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, trim:], layer.values[index, :, trim:]

    def _step(self) -> None:
        new = self._take(self.max_batch_size - len(self.rows), wait=not self.rows)
        if new:  # the new rows' prompts; the running rows wait for this one forward
            self.joining = new
            start = len(self.rows)
            logits = self._prefill(new)
            self.joining = []
            self._advance(list(range(start, start + len(new))), self._sample(logits, new))
        elif self.rows:
            logits = self._decode()
            self._advance(list(range(len(self.rows))), self._sample(logits, self.rows))
        self._drop_finished()

    def _fail(self, message: str) -> None:
        rows = self.rows + [r for r in self.joining if all(r is not row for row in self.rows)]
        for request in rows:
            request.emit("error", message)
        self.rows, self.joining, self.cache = [], [], None
        self.mask, self.last = self.mask[:0, :0], self.last[:0]


class ClassificationEngine(_Worker):
    """Dynamic batching of ``ClassificationRequest``s over a sequence classifier with an ``AdapterBank``: the
    requests that arrive within the window (up to ``max_batch_size`` requests) share one right-padded forward."""

    def __init__(self, model: nn.Module, use_adapters: UseAdapters, *, pad_token_id: int = 0,
                 max_batch_size: int = 16, batch_window_s: float = 0.01, max_queue: int = 1024) -> None:
        super().__init__(model, use_adapters, max_batch_size=max_batch_size, batch_window_s=batch_window_s,
                         max_queue=max_queue)
        self.pad_token_id = pad_token_id
        self.batch: list[ClassificationRequest] = []

    def _step(self) -> None:
        self.batch = self._take(self.max_batch_size, wait=True)
        if not self.batch:
            return
        sequences = [seq for request in self.batch for seq in request.sequences]
        names = [request.adapter for request in self.batch for _ in request.sequences]
        width = max(map(len, sequences))
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(sequences):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        self.most_rows = max(self.most_rows, len(sequences))
        with self.use_adapters(names):
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        self.steps += 1
        probabilities = torch.softmax(logits.float(), -1).cpu()
        start = 0
        for request in self.batch:
            request.emit("done", probabilities[start : start + len(request.sequences)])
            start += len(request.sequences)
        self.batch = []

    def _fail(self, message: str) -> None:
        for request in self.batch:
            request.emit("error", message)
        self.batch = []
