"""``singlora generate`` and ``singlora chat`` (registered by ``torch_singlora.cli`` through ``add_parser``).

    singlora generate MODEL "Write a haiku about rain." "And one about snow." [--output answers.jsonl]
    singlora generate MODEL --prompts-file prompts.jsonl --output answers.jsonl --batch-size 16
    singlora chat MODEL [--system "You are terse."]

MODEL is an adapter folder written by ``singlora train`` (``<output-dir>/adapter``: its base model is the one
recorded at training), a transformers model folder (a base model, or a ``singlora merge`` output), or a base model
with ``--adapter`` (a SingLoRA adapter, or a PEFT LoRA folder such as a ``singlora export`` output).
Greedy by default (deterministic); ``--do-sample`` with ``--temperature`` / ``--top-p`` / ``--top-k`` / ``--seed``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from ..atomic import atomic_write_text, check_output_file
from ..errors import SingLoRAError


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="adapter folder from `singlora train`, or a transformers model folder (base or "
                        "merged)")
    parser.add_argument("--adapter", default=None, help="a SingLoRA adapter or PEFT LoRA folder to apply to MODEL")
    parser.add_argument("--chat-template", default=None, help="Jinja chat template file (default: the tokenizer's)")
    parser.add_argument("--system", default=None, help="system message put before every conversation")


def _add_generation_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    from .generate import GenerationOptions

    defaults = GenerationOptions(max_new_tokens=max_new_tokens)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help=f"most new tokens per answer (default: {defaults.max_new_tokens})")
    parser.add_argument("--do-sample", action="store_true", help="sample (default: greedy, deterministic)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="sampling temperature")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling: keep this mass")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="sample among the k likeliest (0 = all)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="sampling seed")


def _options(args: argparse.Namespace) -> Any:
    """``GenerationOptions`` from the parsed flags (those the subcommand has)."""
    from .generate import GenerationOptions

    names = {f.name for f in dataclasses.fields(GenerationOptions)}
    options = GenerationOptions(**{k: v for k, v in vars(args).items() if k in names})
    options.validate()
    return options


def _with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


def cmd_generate(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Answer the prompts; writes JSON lines ``{"prompt": messages, "completion": text[, "reference": text]}``."""
    from ..cli import no_loading_bars
    from .data import read_prompts
    from .generate import chat_model_inputs, generate, load_chat_model

    if bool(args.prompts) == bool(args.prompts_file):
        raise SingLoRAError("give prompts as arguments or --prompts-file FILE (one of the two)")
    if args.output:
        inputs = {**chat_model_inputs(args.model, args.adapter, args.chat_template), "--prompts-file": args.prompts_file}
        check_output_file(args.output, flag="--output", overwrite=args.overwrite, inputs=inputs)
    options = _options(args)
    prompts = read_prompts(args.prompts_file) if args.prompts_file else [
        ([{"role": "user", "content": text}], None) for text in args.prompts]
    prompts = [(_with_system(messages, args.system), reference) for messages, reference in prompts]
    with no_loading_bars():
        chat = load_chat_model(args.model, args.adapter, chat_template=args.chat_template)
    answers = generate(chat.model, chat.tokenizer, [messages for messages, _ in prompts], options)
    records = []
    for (messages, reference), answer in zip(prompts, answers):
        record: dict[str, Any] = {"prompt": messages, "completion": answer}
        if reference is not None:
            record["reference"] = reference
        records.append(record)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if args.output:
        atomic_write_text(args.output, text)
        print(f"{len(records)} answers written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return records


def cmd_chat(args: argparse.Namespace) -> None:
    from ..cli import no_loading_bars
    from .chat import run_chat
    from .generate import load_chat_model

    with no_loading_bars():
        chat = load_chat_model(args.model, args.adapter, chat_template=args.chat_template)
    run_chat(chat, _options(args), system=args.system)


def add_parser(subparsers: Any) -> None:
    generate = subparsers.add_parser(
        "generate", help="answer prompts with a chat model (an adapter, a merged model, or base + --adapter)",
        description="Answer prompts with a chat model, batched (left padding), greedy by default. Prints JSON lines "
        '{"prompt": [messages], "completion": "..."} (with "reference" when the prompts file has answers).')
    _add_model_arguments(generate)
    generate.add_argument("prompts", nargs="*", help="prompts (one user message each)")
    generate.add_argument("--prompts-file", default=None, help=".txt (a prompt per line), or .jsonl / .json / .csv / "
                          ".parquet / dataset folder with 'prompt' or 'messages' (or whole training examples)")
    generate.add_argument("--output", default=None, help="write the JSON lines here (default: standard output)")
    generate.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    generate.add_argument("--batch-size", type=int, default=8, help="prompts per forward")
    _add_generation_arguments(generate, max_new_tokens=256)
    generate.set_defaults(func=cmd_generate)

    chat = subparsers.add_parser(
        "chat", help="talk with a chat model in the terminal (streaming, multi-turn, /reset, /exit)",
        description="An interactive chat: answers stream as they are generated; the conversation is kept between "
        'turns. A message of several lines: end each line but the last with \\, or paste it between two lines '
        'holding only """. /reset forgets the conversation, /exit (or Ctrl-D) leaves.')
    _add_model_arguments(chat)
    _add_generation_arguments(chat, max_new_tokens=512)
    chat.set_defaults(func=cmd_chat)
