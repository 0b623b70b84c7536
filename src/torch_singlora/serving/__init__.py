"""Multi-tenant serving: one base model, many SingLoRA adapters, an OpenAI-compatible HTTP server.

- ``engine.py``: the batching engines (continuous batching for generation, dynamic batching for classification)
  over a ``torch_singlora.bank.AdapterBank``; one worker thread runs every forward.
- ``service.py``: what is served (model, tokenizer, adapters by public name, limits); run-time loads and unloads
  that never disturb requests in flight.
- ``protocol.py`` / ``text.py``: the OpenAI request and response shapes; chat prompts and streamed detokenization.
- ``app.py``: the FastAPI routes (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, ``/classify``,
  admin routes behind the API key); ``cli.py``: ``singlora serve``.

Needs the ``serve`` extra (FastAPI, uvicorn) and transformers; nothing here is imported by ``import torch_singlora``.
"""
