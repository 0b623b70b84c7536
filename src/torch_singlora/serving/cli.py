"""``singlora serve``: an OpenAI-compatible server for a base model and many SingLoRA adapters.

    singlora serve --model ./SmolLM2-135M-Instruct --adapter alice=runs/alice/adapter --adapter-dir ./adapters
    # then any OpenAI client: base_url="http://127.0.0.1:8000/v1", model="alice" (or the base model's name)

Needs the ``serve`` extra (FastAPI + uvicorn). Binds 127.0.0.1 unless ``--host`` says otherwise; the API key comes
from ``--api-key`` or the ``SINGLORA_API_KEY`` environment variable (which ``ps`` does not show).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..errors import SingLoRAError


def _adapter_pair(text: str) -> tuple[str, str]:
    name, sep, directory = text.partition("=")
    if not sep or not name or not directory:
        raise argparse.ArgumentTypeError(f"--adapter {text!r}: expected NAME=DIR")
    return name, directory


def serve(args: argparse.Namespace) -> None:
    """Load the model and adapters, then serve until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise SingLoRAError('singlora serve needs FastAPI and uvicorn: pip install "torch-singlora[serve]"') from None
    import torch

    from .app import create_app
    from .service import Limits, Service

    if args.threads:
        torch.set_num_threads(args.threads)
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                    max_batch_size=args.max_batch_size, batch_window_ms=args.batch_window_ms,
                    max_body_bytes=args.max_body_bytes, max_queue=args.max_queue, max_choices=args.max_choices)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    service = Service.from_folder(args.model, task=args.task, name=args.served_model_name, dtype=dtype,
                                  num_labels=args.num_labels, limits=limits, max_rank=args.max_rank,
                                  capacity=args.capacity)
    for name, directory in args.adapter:
        service.add_adapter(name, directory)
    for directory in args.adapter_dir:
        service.add_adapter_dir(directory)
    api_key = args.api_key or os.environ.get("SINGLORA_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)
    names = ", ".join(service.keys) or "none"
    print(f"serving {service.name} ({service.task}) with adapters: {names} on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    uvicorn.run(create_app(service, api_key=api_key), host=args.host, port=args.port, log_level=args.log_level)


def add_parser(subparsers: Any) -> None:
    """Register ``singlora serve`` (``cli.EXTERNAL_SUBCOMMANDS``)."""
    from .service import Limits

    defaults = Limits()
    parser = subparsers.add_parser(
        "serve", help="OpenAI-compatible server: one base model, many SingLoRA adapters, mixed batches",
        description="Serve a local transformers model and SingLoRA adapters with the OpenAI API (/v1/models, "
        "/v1/completions, /v1/chat/completions; /classify for classification models). The request's 'model' picks "
        "the adapter; requests for different adapters share each forward (continuous batching).")
    parser.add_argument("--model", required=True, help="local transformers model folder (model + tokenizer)")
    parser.add_argument("--task", choices=("generate", "classify"), default="generate",
                        help="generate (causal LM) or classify (sequence classification) (default: generate)")
    parser.add_argument("--adapter", action="append", type=_adapter_pair, default=[], metavar="NAME=DIR",
                        help="serve the adapter in DIR as model NAME (repeatable)")
    parser.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                        help="serve every adapter sub-folder of DIR under its folder name; run-time loads "
                        "(POST /v1/load_lora_adapter) may only come from these folders (repeatable)")
    parser.add_argument("--served-model-name", default=None, help="the base model's id (default: its folder name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set "
                        "SINGLORA_API_KEY); the admin endpoints are on only with a key")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="base model dtype (adapters stay float32) (default: float32)")
    parser.add_argument("--num-labels", type=int, default=None, help="classify: number of classes of the head")
    parser.add_argument("--max-rank", type=int, default=None, help="preallocate adapter banks at this rank and "
                        "refuse adapters above it (default: grow as needed)")
    parser.add_argument("--capacity", type=int, default=16, help="adapter slots per layer allocated at start "
                        "(grown when full) (default: 16)")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                        help=f"rows in one forward (default: {defaults.max_batch_size})")
    parser.add_argument("--batch-window-ms", type=float, default=defaults.batch_window_ms,
                        help=f"an idle server waits this long to batch requests (default: {defaults.batch_window_ms})")
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens,
                        help=f"tokens of one prompt (default: {defaults.max_prompt_tokens})")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens,
                        help=f"the most tokens one request may generate (default: {defaults.max_tokens})")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help=f"request body size (default: {defaults.max_body_bytes})")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help=f"requests waiting for a slot before 429s (default: {defaults.max_queue})")
    parser.add_argument("--max-choices", type=int, default=defaults.max_choices,
                        help=f"prompts x n of one request, texts of one classify request "
                        f"(default: {defaults.max_choices})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")
    parser.set_defaults(func=serve)
