"""How one row's logits become its next token, and the log-probabilities reported with it.

The steps, in vLLM's order (each only when its parameter asks for it):

1. ``logit_bias`` is added; before ``min_tokens`` tokens, the stop tokens are masked (``-inf``);
2. penalties: ``repetition_penalty`` on every token of the prompt and the output (a positive logit is divided by
   it, a negative one multiplied, as in transformers and vLLM), then ``frequency_penalty * count`` and
   ``presence_penalty * (count > 0)`` subtracted for the output's tokens (OpenAI's formula);
3. ``temperature == 0``: greedy, the argmax of the processed logits. Otherwise ``softmax(logits / temperature)``
   (computed after subtracting the largest logit, so no temperature in the bounds overflows), then ``min_p``
   (drop tokens below ``min_p`` times the top probability), ``top_k`` (keep the ``k`` most likely), ``top_p`` (keep
   the smallest set of most likely tokens whose mass reaches ``top_p``; the most likely token always stays),
   renormalising after each, and one draw from the row's own generator (seeded by ``seed``).

Logprobs (``logprobs = k``) are those of the model's raw distribution, ``log_softmax`` of the logits before any of
the steps (vLLM's default ``raw_logprobs``): the chosen token's, and the ``k`` most likely tokens'.

``BOUNDS`` holds every parameter's documented range: the protocol layer (``protocol.py``) builds its request fields
from it (a 400 naming the field) and ``SamplingParams`` checks it again for direct users of the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import SingLoRAError

INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class Bound:
    """A closed or half-open numeric range: ``ge``/``gt`` below, ``le`` above (None: unbounded)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le))

    def pydantic(self) -> dict[str, float]:
        """Keyword arguments for ``pydantic.Field``."""
        return {k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le)) if v is not None}

    def __str__(self) -> str:
        low = f"[{self.ge}" if self.ge is not None else (f"({self.gt}" if self.gt is not None else "(-inf")
        return f"{low}, {self.le if self.le is not None else 'inf'}{']' if self.le is not None else ')'}"


BOUNDS: dict[str, Bound] = {
    "max_tokens": Bound(ge=1),
    "min_tokens": Bound(ge=0),
    "temperature": Bound(ge=0, le=2),
    "top_p": Bound(gt=0, le=1),
    "top_k": Bound(ge=-1, le=2**31 - 1),  # -1 or 0: off
    "min_p": Bound(ge=0, le=1),
    "repetition_penalty": Bound(gt=0, le=2),
    "presence_penalty": Bound(ge=-2, le=2),
    "frequency_penalty": Bound(ge=-2, le=2),
    "seed": Bound(ge=INT64[0], le=2**64 - 1),  # torch.Generator's range; a request's seed is an int64 (protocol)
    "logprobs": Bound(ge=0, le=20),
    "logit_bias": Bound(ge=-100, le=100),  # each value
}


class SamplingError(SingLoRAError):
    """A row whose logits leave nothing to sample (every token masked, or not finite)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples (module docstring). ``stop_token_ids`` end the row (not part of its text);
    ``logprobs``: None for none, ``k`` for the chosen token's and the top ``k`` tokens' logprobs."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    top_k: int = 0
    min_p: float = 0.0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            bound = BOUNDS.get(item.name)
            values = value.values() if isinstance(value, dict) else [value]
            if bound is not None and not all(v is None or bound.holds(v) for v in values):
                raise SingLoRAError(f"{item.name}={value!r} must be in {bound}")
        if self.min_tokens > self.max_tokens:
            raise SingLoRAError(f"min_tokens={self.min_tokens} must be at most max_tokens={self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain(self) -> bool:
        """Greedy with nothing that changes the logits or asks for logprobs: one batched argmax does it."""
        return self.greedy and not (self.logit_bias or self.min_tokens or self.penalized or self.logprobs is not None)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


class History:
    """The tokens one row has seen, for the penalties: a mask of its prompt's and output's tokens ``(V,)`` and the
    counts of its output's tokens ``(V,)``."""

    def __init__(self, prompt: Sequence[int], vocab: int) -> None:
        self.seen = torch.zeros(vocab, dtype=torch.bool)
        self.seen[torch.tensor(list(prompt), dtype=torch.long)] = True
        self.counts = torch.zeros(vocab)

    def add(self, token: int) -> None:
        self.seen[token] = True
        self.counts[token] += 1


@dataclass
class Sampled:
    """One row's sampled token, with its raw logprob and the top ``k`` ``(token, logprob)`` when asked."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def process(logits: Tensor, params: SamplingParams, generated: int, history: History | None) -> Tensor:
    """Steps 1-2 of the module docstring on one row's logits ``(V,)`` (float32, a new tensor)."""
    logits = logits.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)
    if generated < params.min_tokens and params.stop_token_ids:
        logits[torch.tensor(sorted(params.stop_token_ids), dtype=torch.long)] = -math.inf
    if history is not None and params.repetition_penalty != 1:
        seen = history.seen.to(logits.device)
        penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if history is not None and (params.frequency_penalty or params.presence_penalty):
        counts = history.counts.to(logits.device)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    return logits


def distribution(logits: Tensor, params: SamplingParams) -> Tensor:
    """Step 3 (random sampling): the probabilities ``(V,)`` the token is drawn from."""
    top = logits.max()
    if not torch.isfinite(top):
        raise SamplingError("no token can be sampled: every logit is -inf or not finite")
    probs = torch.softmax((logits - top) / params.temperature, -1)
    if params.min_p > 0:
        probs = torch.where(probs < params.min_p * probs.max(), torch.zeros_like(probs), probs)
        probs = probs / probs.sum()
    if 0 < params.top_k < probs.shape[-1]:
        kept = probs.topk(params.top_k)
        probs = torch.zeros_like(probs).scatter_(0, kept.indices, kept.values)
        probs = probs / probs.sum()
    if params.top_p < 1:
        ordered, order = probs.sort(descending=True)
        keep = ordered.cumsum(0) - ordered < params.top_p  # the mass before each token is short of top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], ordered[keep])
        probs = probs / probs.sum()
    return probs


def sample_row(logits: Tensor, params: SamplingParams, generated: int, history: History | None,
               generator: torch.Generator | None) -> Sampled:
    """One row's next token from its raw logits ``(V,)`` (float32), following the module docstring."""
    processed = process(logits, params, generated, history) if not params.plain else logits
    if params.greedy:
        token = int(processed.argmax())
    else:
        token = int(torch.multinomial(distribution(processed, params).cpu(), 1, generator=generator)[0])
    if params.logprobs is None:
        return Sampled(token)
    logprobs = torch.log_softmax(logits, -1)
    top = logprobs.topk(params.logprobs) if params.logprobs else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return Sampled(token, float(logprobs[token]), pairs)


def sample(logits: Tensor, rows: Sequence[Any]) -> list[Sampled | Exception]:
    """The next token of every row: ``logits`` ``(B, V)``, ``rows[b]`` with ``params``, ``generated``, ``history``
    and ``generator``. Plain greedy rows share one argmax; a row that fails gets its exception, the others their
    tokens (one row's failure is its own)."""
    argmax = logits.argmax(-1).tolist()
    out: list[Sampled | Exception] = []
    for b, row in enumerate(rows):
        if row.params.plain:
            out.append(Sampled(argmax[b]))
            continue
        try:
            out.append(sample_row(logits[b], row.params, len(row.generated), row.history, row.generator))
        except Exception as exc:  # noqa: BLE001 - this row's error, reported on this row alone
            out.append(exc)
    return out
