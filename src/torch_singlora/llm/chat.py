"""``singlora chat``: an interactive conversation with a model in the terminal.

Each line you type is a user message; the answer streams in as it is generated; the history (with an optional
system message) is kept between turns, so the model sees the whole conversation. A message of several lines (a
question, a blank line, an article): end each line but the last with ``\\``, or paste it between two lines holding
only ``\"\"\"``. Commands: ``/reset`` forgets the history, ``/exit`` (or ``/quit``, or end of input: Ctrl-D) leaves.
Ctrl-C while an answer streams stops that answer (what was printed stays in the history); Ctrl-C at the prompt
leaves.

Works on a pipe too (no prompt echo needed): ``printf 'Hi\\n/exit\\n' | singlora chat MODEL``.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from .data import Message
from .generate import ChatModel, GenerationOptions, stream

PROMPT = ">>> "
MORE = "... "  # the prompt of a message's next line
BLOCK = '"""'  # a line holding only this starts, and ends, a pasted block of lines
HELP = ('several lines: end a line with \\ to go on, or paste them between two """ lines; '
        "/reset forgets the conversation, /exit (or Ctrl-D) leaves")


def read_message(read: Callable[[str], str]) -> str:
    """One message from ``read`` (which raises ``EOFError`` at the end of input): a line; lines joined while each
    ends with a backslash (removed); or the lines between two ``BLOCK`` lines, as pasted."""
    line = read(PROMPT)
    if line.strip() == BLOCK:
        lines = []
        while (line := read(MORE)).strip() != BLOCK:
            lines.append(line)
        return "\n".join(lines)
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read(MORE))
    return "\n".join(lines)


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
            line = read_message(read)
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
