"""Streamed detokenization (``serving/text.TextStream``): incremental, O(n) in the tokens generated (a counting
tokenizer proves it), equal to decoding the whole text at once, with stop strings across token boundaries and
characters split across byte-level tokens."""

from __future__ import annotations

import pytest

from torch_singlora.serving.text import TextStream


class CountingTokenizer:
    """Token ``i`` is the character ``chr(0x41 + i % 26)``; counts the token ids it is asked to decode."""

    def __init__(self) -> None:
        self.decoded = 0

    def decode(self, ids, **_: object) -> str:
        self.decoded += len(ids)
        return "".join(chr(0x41 + i % 26) for i in ids)


@pytest.mark.parametrize("stops", [[], ["QQQQ", "never-there"]])
def test_cost_per_token_is_constant(stops: list[str]) -> None:
    """Decoding n tokens costs O(n) token decodes (the old stream re-decoded the whole text per token: n^2 / 2)."""
    per_token = {}
    for n in (256, 2048):
        tokenizer = CountingTokenizer()
        stream = TextStream(tokenizer, stops)
        ids = [i % 16 for i in range(n)]  # never spells a stop string
        text = "".join(stream.push(t) for t in ids) + stream.flush()
        assert text == tokenizer.decode(ids[:]) and not stream.stopped
        per_token[n] = (tokenizer.decoded - n) / n  # minus the reference decode above
    assert per_token[2048] <= 4 and per_token[2048] <= per_token[256] * 1.05, per_token


def test_equals_decoding_the_whole_text(smollm2_tokenizer) -> None:
    tokenizer = smollm2_tokenizer
    text = "naïve café ☕ — 東京タワー, ünïcödé 👩‍👩‍👧‍👦 and   spaces\n\tdone. " * 3
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) + stream.flush() == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # a character split over tokens waits for its last byte
    special = tokenizer.convert_tokens_to_ids("<|im_end|>")
    kept = TextStream(tokenizer, skip_special_tokens=False)
    assert "".join(kept.push(t) for t in [*ids[:3], special]) + kept.flush() == tokenizer.decode([*ids[:3], special])


@pytest.mark.parametrize("stop", ["lo w", "café ☕", "d, hel", "Hello world, hello", "o"])
def test_stop_strings_across_token_boundaries(smollm2_tokenizer, stop: str) -> None:
    tokenizer = smollm2_tokenizer
    text = "Hello world, hello café ☕ again"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stops=["never", stop])
    out = "".join(stream.push(t) for t in ids) + stream.flush()
    assert out == text[: text.index(stop)] and stream.stopped
    assert stream.push(ids[0]) == "" and stream.flush() == ""  # nothing after the stop
