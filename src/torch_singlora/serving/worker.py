"""The engines' common part: one worker thread that takes requests from a queue and runs every forward; changes to
the adapter bank (``run_in_worker``) run on it between two steps, so a forward never sees a bank half-changed.
Events go back through each request's ``emit(kind, value)`` callback, called on the worker thread."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from ..errors import SingLoRAError

UseAdapters = Callable[[list[str]], ContextManager[Any]]  # names, one per row -> a context for one forward
Observer = Callable[[str, int, int], None]  # (forward kind, rows, tokens) after each forward


class Overloaded(SingLoRAError):
    """The engine's queue is full."""


class Worker:
    """A thread that takes requests from a queue and runs ``_step`` until stopped; bank changes in between.

    ``model`` runs every forward inside ``use_adapters(names)`` (one adapter name per row): ``AdapterBank.use``,
    or any other mixed-adapter mechanism (the serving benchmark passes PEFT's). ``observer(kind, rows, tokens)``,
    if given, is called after each forward (the server's metrics).
    """

    def __init__(self, model: nn.Module, use_adapters: UseAdapters, *, max_batch_size: int, batch_window_s: float,
                 max_queue: int, observer: Observer | None = None) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise SingLoRAError(f"max_batch_size={max_batch_size!r} must be an int >= 1")
        self.model = model
        self.use_adapters = use_adapters
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.max_queue = max_queue
        self.observer = observer
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

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker; requests still running or waiting get an error event (nobody waits forever)."""
        self._stop.set()
        self.pending.put(None)
        if self._thread is not None:
            self._thread.join()
        self._fail(self._in_flight(), "the server is stopping")
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
        """Up to ``room`` waiting requests; ``wait``: block for the first one, then gather for the window.
        Requests cancelled while they waited are answered ``done: cancelled`` here."""
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
            except Exception as exc:  # a bug or an OOM outside any one forward: fail what is in flight
                self._fail(self._in_flight(), f"internal error: {type(exc).__name__}: {exc}")

    def _observe(self, kind: str, rows: int, tokens: int) -> None:
        self.steps += 1
        self.most_rows = max(self.most_rows, rows)
        if self.observer is not None:
            self.observer(kind, rows, tokens)

    def _step(self) -> None:
        raise NotImplementedError

    def _in_flight(self) -> list[Any]:
        """The requests the worker holds (running or being prepared)."""
        raise NotImplementedError

    def _fail(self, requests: list[Any], message: str) -> None:
        """Answer ``requests`` with an error event and forget them."""
        raise NotImplementedError
