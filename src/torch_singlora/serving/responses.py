"""The OpenAI API's response shapes (as vLLM's server writes them): errors, usage, completion and chat choices,
stream chunks and logprobs. Pure functions of plain values; ``serving.py`` fills them."""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Sequence

LOGPROB_FLOOR = -9999.0  # JSON has no -inf: vLLM reports an impossible token's logprob as this
ECHO_LIMIT = 64  # characters of a client's value an error message may quote


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def shorten(value: Any, limit: int = ECHO_LIMIT) -> str:
    """A client's value as an error message may quote it: at most ``limit`` characters (a 200 kB model name is
    not sent back)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# A token's logprobs as the engine gives them: (token id, logprob, top [(token id, logprob)]).
TokenLogprob = tuple[int, float, list[tuple[int, float]]]


def _floor(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def completion_logprobs(entries: Sequence[TokenLogprob], token_text: Callable[[int], str],
                        offset: int = 0) -> dict[str, Any]:
    """The completions API's ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs`` (the top tokens and the
    chosen one, ``{text: logprob}``) and ``text_offset`` (each token's start in the choice's text, from
    ``offset``)."""
    tokens, offsets = [], []
    for token, _, _ in entries:
        offsets.append(offset)
        tokens.append(token_text(token))
        offset += len(tokens[-1])
    tops = [{token_text(t): _floor(lp) for t, lp in [*top, (token, logprob)]} for token, logprob, top in entries]
    return {"tokens": tokens, "token_logprobs": [_floor(lp) for _, lp, _ in entries], "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: Callable[[int], str]) -> dict[str, Any]:
    """The chat API's ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``."""
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": _floor(logprob), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(token, logprob), "top_logprobs": [item(t, lp) for t, lp in top]}
                        for token, logprob, top in entries]}


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict[str, Any], finish_reason: str | None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
