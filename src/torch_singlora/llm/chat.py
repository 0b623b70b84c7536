"""``singlora chat``: an interactive conversation with a model in the terminal.

Each line you type is a user message; the answer streams in as it is generated; the history (with an optional
system message) is kept between turns, so the model sees the whole conversation. Commands: ``/reset`` forgets the
history, ``/exit`` (or ``/quit``, or end of input: Ctrl-D) leaves. Ctrl-C while an answer streams stops that
answer (what was printed stays in the history); Ctrl-C at the prompt leaves.

Works on a pipe too (no prompt echo needed): ``printf 'Hi\\n/exit\\n' | singlora chat MODEL``.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from .data import Message
from .generate import ChatModel, GenerationOptions, stream

PROMPT = ">>> "
HELP = "/reset forgets the conversation, /exit (or Ctrl-D) leaves"


def chat_loop(chat: ChatModel, options: GenerationOptions, *, system: str | None = None,
              read: Callable[[str], str] = input, out: TextIO | None = None) -> list[Message]:
    """Run the REPL until ``/exit`` or end of input; returns the final history. ``read`` is called with the prompt
    text and returns a line (``input`` by default: line editing when ``readline`` is available)."""
    out = out or sys.stdout
    start: list[Message] = [{"role": "system", "content": system}] if system else []
    history = list(start)
    out.write(f"chatting with {chat.source}; {HELP}\n")
    out.flush()
    while True:
        try:
            line = read(PROMPT)
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(start)
            out.write("(conversation reset)\n")
            out.flush()
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]!r}: {HELP}\n")
            out.flush()
            continue
        history.append({"role": "user", "content": line})
        pieces: list[str] = []
        try:
            for piece in stream(chat.model, chat.tokenizer, history, options):
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": "".join(pieces)})
    return history


def run_chat(chat: ChatModel, options: GenerationOptions, *, system: str | None = None) -> list[Message]:
    """``chat_loop`` on the terminal (with line editing when stdin is a terminal)."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # pragma: no cover - not on every platform
            pass
    return chat_loop(chat, options, system=system)
