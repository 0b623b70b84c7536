"""The server's Prometheus metrics (``GET /metrics``, text format via ``prometheus_client``; one registry per
server). ``model`` is a served name (the base model's or an adapter's), never a name a client made up.

=====================================  ==============================================================================
``singlora_requests_total``            requests by ``model`` and ``outcome`` (ok, error, cancelled, refused)
``singlora_prompt_tokens_total``       prompt tokens by ``model`` (classification: the tokens classified)
``singlora_generation_tokens_total``   generated tokens by ``model``
``singlora_requests_in_flight``        requests running or waiting, by ``model``
``singlora_queue_length``              requests waiting for a batch slot
``singlora_running_rows``              rows in the running batch
``singlora_batch_rows``                histogram of the rows of each forward, by ``kind`` (decode, prefill, classify)
``singlora_forward_tokens_total``      tokens run by the forwards, by ``kind``
``singlora_adapters``                  adapters resident in the bank
=====================================  ==============================================================================
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The counters the server updates, and the gauges read at each scrape: from ``engine`` (its queue and rows),
    ``adapters()`` (resident adapters) and ``in_flight()`` (``{model: requests running or waiting}``)."""

    def __init__(self, engine: Any, adapters: Callable[[], int], in_flight: Callable[[], dict[str, int]]) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("singlora_requests", "Requests by model and outcome", ["model", "outcome"],
                                registry=registry)
        self.prompt_tokens = Counter("singlora_prompt_tokens", "Prompt tokens by model", ["model"], registry=registry)
        self.generation_tokens = Counter("singlora_generation_tokens", "Generated tokens by model", ["model"],
                                         registry=registry)
        self.batch_rows = Histogram("singlora_batch_rows", "Rows of each forward", ["kind"], registry=registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.forward_tokens = Counter("singlora_forward_tokens", "Tokens run by the forwards", ["kind"],
                                      registry=registry)
        Gauge("singlora_queue_length", "Requests waiting for a batch slot", registry=registry).set_function(
            lambda: engine.pending.qsize() + len(getattr(engine, "waiting", ())))
        Gauge("singlora_running_rows", "Rows in the running batch", registry=registry).set_function(
            lambda: len(getattr(engine, "rows", ())))
        Gauge("singlora_adapters", "Adapters resident in the bank", registry=registry).set_function(adapters)
        registry.register(_InFlight(in_flight))

    def forward(self, kind: str, rows: int, tokens: int) -> None:
        """The engine ran one forward (called on its thread)."""
        self.batch_rows.labels(kind).observe(rows)
        self.forward_tokens.labels(kind).inc(tokens)

    def request_done(self, model: str, outcome: str, prompt_tokens: int, generated_tokens: int) -> None:
        self.requests.labels(model, outcome).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(generated_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _InFlight:
    """``singlora_requests_in_flight{model}``, read at each scrape."""

    def __init__(self, in_flight: Callable[[], dict[str, int]]) -> None:
        self.in_flight = in_flight

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("singlora_requests_in_flight", "Requests running or waiting, by model",
                                   labels=["model"])
        for model, count in self.in_flight().items():
            family.add_metric([model], count)
        yield family
