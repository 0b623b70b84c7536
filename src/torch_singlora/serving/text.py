"""Text in and out of the engine: chat prompts (the ``llm`` package's chat-template helpers), and incremental
detokenization with stop strings (``TextStream``, run by the engine's worker thread for each row)."""

from __future__ import annotations

from typing import Any, Sequence

# A window of undecodable tokens longer than this is emitted as is (U+FFFD): no UTF-8 character spans more than 4
# bytes, so a longer run cannot complete, and the window (hence the cost per token) stays bounded.
MAX_PENDING_TOKENS = 8


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
    """Turns generated token ids into text pieces as they come, and applies ``stop`` strings.

    ``push(token)`` returns the text that became final (possibly ``""``). Decoding is incremental, as vLLM and TGI
    do: each token decodes a window of a few tokens (from ``prefix`` to the end) and returns what it adds beyond the
    window's first part, so a token costs O(window), not O(text). Text is held back while it ends in an incomplete
    character (a byte-level token split mid-character decodes to U+FFFD) or could still be the start of a stop
    string. When a stop string appears, the text ends just before it and ``stopped`` becomes True. ``flush()``
    returns what was held back once generation ends.

    ``decoded_tokens`` counts the token ids passed to the tokenizer (the cost; tests check it is O(n)).
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = (), *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # the window starts here; ids[prefix:read] were already turned into text
        self.read = 0
        self.held = ""  # text decoded but not returned yet (it could be the start of a stop string)
        self.stopped = False
        self.decoded_tokens = 0
        self._holdback = max((len(s) - 1 for s in self.stops), default=0)

    def _decode(self, ids: list[int]) -> str:
        self.decoded_tokens += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _new_text(self) -> str:
        """The text the tokens since ``read`` add ("" while they end in an incomplete character)."""
        before = self._decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        after = self._decode(self.ids[self.prefix:])
        if after.endswith("\ufffd") and len(self.ids) - self.read <= MAX_PENDING_TOKENS:
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        new = self._new_text()
        if not new:
            return ""
        text = self.held + new
        # A stop string cannot begin in text already returned: the last len(stop) - 1 characters are always held
        # back, so a match is found as soon as it is complete, before any of it is returned.
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.held = True, ""
            return text[:cut]
        keep = max(0, len(text) - self._holdback)
        self.held = text[keep:]
        return text[:keep]

    def flush(self) -> str:
        """The text held back, at the end of generation (an incomplete last character as U+FFFD)."""
        if self.stopped:
            return ""
        rest = self._decode(self.ids[self.prefix:])
        before = self._decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        self.prefix = self.read = len(self.ids)
        text, self.held = self.held + rest[len(before):], ""
        return text
