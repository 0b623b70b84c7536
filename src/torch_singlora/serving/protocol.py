"""The OpenAI API's request shapes that the server speaks (vLLM's ``protocol.py`` for the same endpoints), with every
field validated here, before anything runs: a wrong type, a value out of its bounds, an unknown field or an option
this server does not implement gets a 400 naming the field, in OpenAI's error body (``responses.error_body``).

Bounds (``sampling.BOUNDS``; OpenAI's where OpenAI documents them, vLLM's otherwise):

==========================  ==========================================================================================
``max_tokens``              >= 1 (and within the server's ``--max-tokens`` and the model's context, checked by
                            ``serving.py``); ``max_completion_tokens`` (chat) is its newer name
``temperature``             [0, 2]; 0 is greedy
``top_p`` / ``min_p``       (0, 1] / [0, 1]
``top_k``                   -1 or 0 (off), or >= 1 (the k most likely tokens)
``repetition_penalty``      (0, 2]; ``presence_penalty`` / ``frequency_penalty`` [-2, 2]
``seed``                    a 64-bit signed integer; choice ``j`` of ``n`` uses ``seed + j``
``n``                       >= 1 (prompts x n within the server's ``--max-choices``)
``min_tokens``              [0, max_tokens] (checked by ``serving.py``); ``ignore_eos``: do not stop at the model's
                            end-of-sequence tokens
``stop``                    a string or up to 16 strings of 1 to 256 characters
``stop_token_ids``          up to 64 token ids (in the vocabulary)
``logit_bias``              up to 300 ``{token id: bias}``, bias in [-100, 100]
``logprobs``                completions: 0 to 20 (the top tokens reported); chat: ``logprobs=true`` and
                            ``top_logprobs`` 0 to 20
``model`` / ``user``        at most 256 characters
==========================  ==========================================================================================

OpenAI options this server does not implement (``echo``, ``best_of``, ``suffix``, tools, ``response_format``, ...)
are accepted only at their default value and refused otherwise; any other unknown field is refused too (OpenAI's
own behaviour), so nothing a client sends is silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .sampling import BOUNDS, INT64, SamplingParams

MAX_NAME = 256
MAX_STOPS, MAX_STOP_CHARS = 16, 256
MAX_STOP_TOKENS = 64
MAX_LOGIT_BIAS = 300

TokenId = Annotated[int, Field(ge=0)]

# OpenAI options not implemented here, with the values that mean "off" (accepted); any other value gets a 400.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "echo": (False, None), "best_of": (None, 1), "suffix": (None,), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}), "store": (None, False),
}


def bounded(name: str, default: Any) -> Any:
    """A request field with ``sampling.BOUNDS[name]``'s range."""
    return Field(default, **BOUNDS[name].pydantic())


class Strict(BaseModel):
    """Unknown fields and non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False


class _Generate(Strict):
    """The fields completions and chat share."""

    model: str = Field(max_length=MAX_NAME)
    max_tokens: int | None = bounded("max_tokens", None)
    temperature: float = bounded("temperature", 1.0)
    top_p: float = bounded("top_p", 1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])  # choice j seeds seed + j: within the generator's range
    user: str | None = Field(None, max_length=MAX_NAME)
    presence_penalty: float = bounded("presence_penalty", 0.0)
    frequency_penalty: float = bounded("frequency_penalty", 0.0)
    logit_bias: Annotated[dict[str, Annotated[float, Field(**BOUNDS["logit_bias"].pydantic())]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    # vLLM's extra sampling parameters
    top_k: int = bounded("top_k", 0)
    min_p: float = bounded("min_p", 0.0)
    min_tokens: int = bounded("min_tokens", 0)
    repetition_penalty: float = bounded("repetition_penalty", 1.0)
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKENS)] | None = None
    skip_special_tokens: bool = True
    # refused unless "off" (UNSUPPORTED)
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    store: bool | None = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _refuse(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in UNSUPPORTED[info.field_name]:
            raise ValueError("not supported by this server")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS or not all(1 <= len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"give at most {MAX_STOPS} stop strings of 1 to {MAX_STOP_CHARS} characters")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value and not all(key.isdigit() for key in value):
            raise ValueError("keys must be token ids (digits)")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def top_logprobs_count(self) -> int | None:
        """None: no logprobs; k: the chosen token's and the top k."""
        raise NotImplementedError

    def sampling(self, max_tokens: int, stop_token_ids: frozenset[int]) -> SamplingParams:
        """The engine's parameters (``max_tokens`` decided by the server; ``stop_token_ids`` = the request's and,
        unless ``ignore_eos``, the model's end-of-sequence tokens)."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
            stop_token_ids=stop_token_ids, top_k=max(self.top_k, 0), min_p=self.min_p, min_tokens=self.min_tokens,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            logprobs=self.top_logprobs_count())


class CompletionRequest(_Generate):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, a list of token ids or a list of lists."""

    prompt: Union[str, list[str], list[TokenId], list[list[TokenId]]]
    logprobs: int | None = bounded("logprobs", None)

    def top_logprobs_count(self) -> int | None:
        return self.logprobs


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict[str, Any]]]

    def text(self) -> str:
        """The message's text; content parts must all be ``{"type": "text", "text": ...}``."""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                raise ValueError(f"content part of type {str(part.get('type'))[:32]!r}: only text parts "
                                 "({'type': 'text', 'text': ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(_Generate):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = bounded("max_tokens", None)
    logprobs: bool = False
    top_logprobs: int | None = bounded("logprobs", None)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs=true")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ClassificationRequest(Strict):
    """``POST /classify`` (vLLM's and SGLang's classification API): ``input`` is a string or a list of strings."""

    model: str = Field(max_length=MAX_NAME)
    input: Union[str, list[str]]
    user: str | None = Field(None, max_length=MAX_NAME)


class TokenizeRequest(Strict):
    """``POST /tokenize`` (vLLM's): a ``prompt`` (with the tokenizer's special tokens unless
    ``add_special_tokens=false``) or chat ``messages`` (the ids the chat endpoint would run)."""

    model: str | None = Field(None, max_length=MAX_NAME)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give either prompt or messages")
        return self


class DetokenizeRequest(Strict):
    """``POST /detokenize`` (vLLM's)."""

    model: str | None = Field(None, max_length=MAX_NAME)
    tokens: list[TokenId]


class LoadAdapterRequest(Strict):
    """``POST /v1/load_lora_adapter`` (vLLM's run-time adapter API). ``lora_path`` is the *name* of a folder inside
    one of the server's ``--adapter-dir`` folders, never a path; ``replace`` swaps an adapter already served."""

    lora_name: str = Field(max_length=MAX_NAME)
    lora_path: str | None = Field(None, max_length=MAX_NAME)
    replace: bool = False


class UnloadAdapterRequest(Strict):
    lora_name: str = Field(max_length=MAX_NAME)
