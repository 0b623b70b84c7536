"""Multi-tenant serving: one base model, many SingLoRA adapters, an OpenAI-compatible HTTP server.

Laid out as vLLM's OpenAI server is (router / serving / protocol):

- ``app.py``: the FastAPI routes (HTTP only: authentication, status codes, error mapping); ``asgi.py``: body limits
  and header / body read timeouts; ``cli.py``: ``singlora serve``.
- ``serving.py``: the OpenAI serving layer: a validated request becomes a generation session and a JSON answer or
  a server-sent-event stream; ``protocol.py``: request fields and their bounds; ``responses.py``: response shapes.
- ``service.py``: what is served (model, tokenizer, adapters by public name, limits, metrics) and the request
  lifecycle; ``session.py``: one request's generation, from acquiring its adapter to releasing it.
- ``engine.py`` (continuous batching with chunked prefill), ``classify.py``, ``worker.py``: the batching engines over
  a ``torch_singlora.bank.AdapterBank``; one worker thread runs every forward. ``sampling.py``: how a row's logits
  become its next token; ``text.py``: chat prompts and incremental detokenization; ``metrics.py``: Prometheus.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus_client) and transformers; nothing here is imported by
``import torch_singlora``.
"""
