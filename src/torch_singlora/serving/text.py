"""Text in and out of the engine: chat prompts (the ``llm`` package's chat-template helpers), and streamed
detokenization with stop strings."""

from __future__ import annotations

from typing import Any, Sequence


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, opening the assistant's turn
    (``llm.generate.prompt_ids``), after refusing message texts that hold a special token's text (it would be read as
    that token: a forged end of turn or role); ``SingLoRAError`` naming the message otherwise."""
    from ..llm.data import Conversation
    from ..llm.generate import prompt_ids
    from ..llm.tokenization import check_contents, special_tokens

    check_contents(Conversation(list(messages), (), "messages"), special_tokens(tokenizer))
    return prompt_ids(tokenizer, messages)


class TextStream:
    """Turns generated token ids into text pieces for streaming, and applies ``stop`` strings.

    ``push(token)`` returns the text that became final (possibly ``""``): text is held back while it ends in an
    incomplete character (a byte-level token split mid-character decodes to U+FFFD) or could still be the start of
    a stop string. When a stop string appears, the text ends just before it and ``stopped`` becomes True.
    ``flush()`` returns what was held back once generation ends (an incomplete last character as U+FFFD).
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already returned
        self.stopped = False
        self._holdback = max((len(s) - 1 for s in self.stops), default=0)

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self._text()
        cut = min((i for i in (text.find(s, max(0, self.emitted - self._holdback)) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(text[:cut])
        if text.endswith("\ufffd"):
            return ""
        return self._take(text[: len(text) - self._holdback])

    def flush(self) -> str:
        """The text held back, at the end of generation."""
        if self.stopped:
            return ""
        return self._take(self._text())

    def _take(self, text: str) -> str:
        piece = text[self.emitted:] if len(text) > self.emitted else ""
        self.emitted = max(self.emitted, len(text))
        return piece
