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


def _trained_labels(args: argparse.Namespace) -> int | None:
    """The number of classes recorded by ``singlora train`` beside the first adapter given (None if unknown)."""
    from pathlib import Path

    from ..runs import read_run_info

    folders = [Path(d) for _, d in args.adapter] + [Path(e.path) for d in args.adapter_dir if Path(d).is_dir()
                                                    for e in os.scandir(d) if e.is_dir()]
    for folder in folders:
        if (folder / "run_info.json").is_file():
            labels = read_run_info(folder).get("labels")
            if isinstance(labels, list):
                return len(labels)
    return None


def check_port(host: str, port: int) -> None:
    """Refuse (before anything loads) an address the server could not listen on, e.g. a port another server holds:
    probed with the options uvicorn binds with (``SO_REUSEADDR``)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, OverflowError) as exc:
        raise SingLoRAError(f"--host {host!r} --port {port}: {getattr(exc, 'strerror', None) or exc}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise SingLoRAError(f"cannot listen on {host}:{port}: {exc.strerror} (another server on --port {port}?); "
                                "nothing was loaded") from None


def serve(args: argparse.Namespace) -> None:
    """Load the model and adapters, then serve until interrupted."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError:
        raise SingLoRAError('singlora serve needs FastAPI, uvicorn and prometheus_client: '
                            'pip install "torch-singlora[serve]"') from None
    check_port(args.host, args.port)  # a busy port fails here, not after loading and printing "serving on"
    import torch

    from ..cli_options import dataclass_from_args
    from .app import create_app
    from .asgi import header_timeout_protocol
    from .service import Limits, Service

    if args.threads:
        torch.set_num_threads(args.threads)
    limits = dataclass_from_args(Limits, args)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    num_labels = args.num_labels or (_trained_labels(args) if args.task == "classify" else None)
    service = Service.from_folder(args.model, task=args.task, name=args.served_model_name, dtype=dtype,
                                  num_labels=num_labels, limits=limits, max_rank=args.max_rank,
                                  capacity=args.capacity)
    for name, directory in args.adapter:
        service.add_adapter(name, directory)
    for directory in args.adapter_dir:
        service.add_adapter_dir(directory)  # a broken folder is logged and skipped
    api_key = args.api_key or os.environ.get("SINGLORA_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)
    names = ", ".join(service.keys) or "none"
    print(f"serving {service.name} ({service.task}) with adapters: {names} on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    uvicorn.run(create_app(service, api_key=api_key), host=args.host, port=args.port, log_level=args.log_level,
                http=header_timeout_protocol(limits.header_timeout_s))


def add_parser(subparsers: Any) -> None:
    """Register ``singlora serve`` (``cli.EXTERNAL_SUBCOMMANDS``)."""
    from ..cli_options import add_dataclass_arguments
    from .service import Limits

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
    parser.add_argument("--num-labels", type=int, default=None, help="classify: number of classes of the head "
                        "(default: from the adapters' run_info.json, written by singlora train)")
    parser.add_argument("--max-rank", type=int, default=None, help="refuse adapters above this rank; with it the "
                        "adapter storage keeps its shapes (no recompile) (default: any rank, storage grows)")
    parser.add_argument("--capacity", type=int, default=16, help="adapters of --max-rank each layer has room for at "
                        "start (more of lower ranks; grown when full) (default: 16)")
    add_dataclass_arguments(parser, Limits)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")
    parser.set_defaults(func=serve)
