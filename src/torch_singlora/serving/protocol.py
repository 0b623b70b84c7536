"""The OpenAI API's request and response shapes that the server speaks (the subset vLLM's server speaks too).

Requests are pydantic models: unknown fields are ignored (as OpenAI does), wrong types and values give a 400 with
OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``. Options this server does not implement
(``logprobs``, ``echo``, ``best_of``, tools, ...) are refused with a 400 naming them, never silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


# Options of the OpenAI API this server refuses when given anything but their default.
UNSUPPORTED: tuple[tuple[str, Any], ...] = (
    ("logprobs", None), ("echo", False), ("best_of", None), ("suffix", None), ("tools", None), ("tool_choice", None),
    ("logit_bias", None), ("top_logprobs", None), ("response_format", None), ("presence_penalty", 0),
    ("frequency_penalty", 0), ("functions", None),
)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    user: str | None = None

    def unsupported(self) -> list[str]:
        """The names of options given that this server does not implement."""
        extra = self.model_extra or {}
        return [name for name, default in UNSUPPORTED if extra.get(name, default) not in (default, None)]

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, a list of token ids or a list of lists."""

    prompt: Union[str, list[str], list[int], list[list[int]]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict[str, Any]]]

    def text(self) -> str:
        """The message's text; content parts must all be ``{"type": "text", "text": ...}``."""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part of type {part.get('type')!r}: only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class ClassificationRequest(BaseModel):
    """``POST /classify`` (vLLM's and SGLang's classification API): ``input`` is a string or a list of strings."""

    model_config = ConfigDict(extra="allow")

    model: str
    input: Union[str, list[str]]


class LoadAdapterRequest(BaseModel):
    """``POST /v1/load_lora_adapter`` (vLLM's runtime adapter API). ``lora_path`` is the *name* of a folder inside
    one of the server's ``--adapter-dir`` folders, never a path; ``replace`` swaps an adapter already served."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str | None = None
    replace: bool = False


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
