"""``ClassificationEngine``: dynamic batching of sequence classification requests over an ``AdapterBank``: the
requests that arrive within the batch window (up to ``max_batch_size`` requests) share one right-padded forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .worker import Observer, UseAdapters, Worker


@dataclass
class ClassificationRequest:
    """Sequences to classify with one adapter; ``emit("done", probabilities (N, labels))`` or ``("error", msg)``."""

    adapter: str
    sequences: list[list[int]]
    emit: Callable[[str, Any], None]
    cancelled: bool = False


class ClassificationEngine(Worker):
    """Dynamic batching of ``ClassificationRequest``s (module docstring)."""

    def __init__(self, model: nn.Module, use_adapters: UseAdapters, *, pad_token_id: int = 0,
                 max_batch_size: int = 16, batch_window_s: float = 0.01, max_queue: int = 1024,
                 observer: Observer | None = None) -> None:
        super().__init__(model, use_adapters, max_batch_size=max_batch_size, batch_window_s=batch_window_s,
                         max_queue=max_queue, observer=observer)
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
        with self.use_adapters(names):
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        self._observe("classify", len(sequences), int(mask.sum()))
        probabilities = torch.softmax(logits.float(), -1).cpu()
        start = 0
        for request in self.batch:
            request.emit("done", probabilities[start : start + len(request.sequences)])
            start += len(request.sequences)
        self.batch = []

    def _in_flight(self) -> list[Any]:
        return self.batch

    def _fail(self, requests: list[Any], message: str) -> None:
        for request in requests:
            request.emit("error", message)
        self.batch = []
