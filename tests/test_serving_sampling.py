"""The server's sampling (``serving/sampling.py``): every branch against the distribution computed here in float64
from its definition (vLLM's order: logit bias, min_tokens, penalties, then temperature, min_p, top_k, top_p), and
draws that follow it; greedy, extreme temperatures and top_p, logprobs, and bounds."""

from __future__ import annotations

import math

import pytest
import torch

from torch_singlora.errors import SingLoRAError
from torch_singlora.serving.sampling import (BOUNDS, History, SamplingError, SamplingParams, distribution, process,
                                              sample, sample_row)

V = 12
LOGITS = torch.tensor([2.0, 1.5, 1.4, 0.3, -0.2, 3.1, -1.0, 0.9, 2.9, -2.5, 0.0, 1.1])
PROMPT = [0, 3, 3]
OUTPUT = [5, 5, 7]  # generated so far


def reference(params: SamplingParams, history: bool = True) -> list[float]:
    """The distribution of the next token, written from the definitions, one token at a time, in float64."""
    x = [float(v) for v in LOGITS]
    for token, bias in params.logit_bias.items():
        x[token] += bias
    if len(OUTPUT) < params.min_tokens:
        for token in params.stop_token_ids:
            x[token] = -math.inf
    if history:
        seen = set(PROMPT) | set(OUTPUT)
        for t in range(V):
            if t in seen:
                x[t] = x[t] / params.repetition_penalty if x[t] > 0 else x[t] * params.repetition_penalty
            count = OUTPUT.count(t)
            x[t] -= params.frequency_penalty * count + params.presence_penalty * (count > 0)
    top = max(x)
    p = [math.exp((v - top) / params.temperature) for v in x]
    p = [v / sum(p) for v in p]
    if params.min_p:
        p = [v if v >= params.min_p * max(p) else 0.0 for v in p]
        p = [v / sum(p) for v in p]
    if params.top_k > 0:
        kth = sorted(p, reverse=True)[params.top_k - 1]
        p = [v if v >= kth else 0.0 for v in p]
        p = [v / sum(p) for v in p]
    if params.top_p < 1:
        kept, mass = set(), 0.0
        for t in sorted(range(V), key=lambda t: -p[t]):
            if mass >= params.top_p and kept:
                break
            kept.add(t)
            mass += p[t]
        p = [p[t] if t in kept else 0.0 for t in range(V)]
        p = [v / sum(p) for v in p]
    return p


def history() -> History:
    h = History(PROMPT, V)
    for token in OUTPUT:
        h.add(token)
    return h


CASES = {
    "temperature": SamplingParams(temperature=0.7),
    "hot": SamplingParams(temperature=1.9),
    "top_k": SamplingParams(temperature=1.0, top_k=3),
    "top_p": SamplingParams(temperature=1.0, top_p=0.6),
    "min_p": SamplingParams(temperature=0.8, min_p=0.3),
    "all_filters": SamplingParams(temperature=1.3, min_p=0.05, top_k=6, top_p=0.8),
    "penalties": SamplingParams(temperature=1.0, repetition_penalty=1.7, frequency_penalty=0.4,
                                presence_penalty=-0.3),
    "bias_and_min_tokens": SamplingParams(temperature=1.0, logit_bias={9: 6.0, 5: -3.0}, min_tokens=5,
                                          stop_token_ids=frozenset({8, 0})),
}


@pytest.mark.parametrize("name", list(CASES))
def test_distribution_matches_the_definition(name: str) -> None:
    params = CASES[name]
    got = distribution(process(LOGITS, params, len(OUTPUT), history()), params).double()
    assert torch.allclose(got, torch.tensor(reference(params), dtype=torch.float64), atol=1e-6), name


def test_draws_follow_the_distribution() -> None:
    """Draws through ``sample_row`` (the server's path: a per-row generator) match the reference: every token's
    frequency within 4 standard errors, and no token of probability 0 ever drawn."""
    draws = 3000
    for name in ["all_filters", "penalties", "top_p"]:
        params = CASES[name]
        expected = reference(params)
        generator = torch.Generator().manual_seed(1)
        counts = [0] * V
        for _ in range(draws):
            counts[sample_row(LOGITS, params, len(OUTPUT), history(), generator).token] += 1
        for token, p in enumerate(expected):
            if p == 0:
                assert counts[token] == 0, (name, token)
            else:
                assert abs(counts[token] / draws - p) <= 4 * math.sqrt(p * (1 - p) / draws) + 1e-9, (name, token)


def test_greedy_extremes_and_top_k_one_agree() -> None:
    """temperature 0, top_k=1, a temperature of 1e-40 and a top_p of 1e-46 all give the argmax (nothing overflows
    or underflows into an error)."""
    argmax = int(LOGITS.argmax())
    generator = torch.Generator().manual_seed(0)
    for params in [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(temperature=1e-40),
                   SamplingParams(top_p=1e-46), SamplingParams(temperature=2.0, top_p=1e-46)]:
        assert {sample_row(LOGITS, params, 0, None, generator).token for _ in range(20)} == {argmax}, params
    with pytest.raises(SamplingError, match="no token can be sampled"):
        distribution(torch.full((V,), -math.inf), SamplingParams())


def test_logprobs_are_the_raw_model_distribution() -> None:
    params = SamplingParams(temperature=0.5, top_k=2, logprobs=3, repetition_penalty=1.5)
    out = sample_row(LOGITS, params, len(OUTPUT), history(), torch.Generator().manual_seed(0))
    raw = torch.log_softmax(LOGITS.double(), -1)
    assert out.logprob == pytest.approx(float(raw[out.token]), abs=1e-5)
    order = raw.argsort(descending=True)[:3].tolist()
    assert [t for t, _ in out.top] == order
    assert [lp for _, lp in out.top] == pytest.approx(raw[order].tolist(), abs=1e-5)
    assert sample_row(LOGITS, SamplingParams(logprobs=0), 0, None, None).top == []


def test_batch_sampling_keeps_a_failing_row_to_itself() -> None:
    """``sample`` gives each row its own result; one row that cannot sample gets its exception, the others tokens."""
    class Row:
        def __init__(self, params: SamplingParams) -> None:
            self.params, self.generated, self.history = params, [], None
            self.generator = torch.Generator().manual_seed(0)

    logits = torch.stack([LOGITS, torch.full((V,), -math.inf), LOGITS])
    out = sample(logits, [Row(SamplingParams(temperature=0)), Row(SamplingParams()), Row(SamplingParams(top_k=1))])
    assert out[0].token == out[2].token == int(LOGITS.argmax()) and isinstance(out[1], SamplingError)


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", 2.5), ("temperature", math.nan), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("min_p", 1.1), ("repetition_penalty", 0.0), ("presence_penalty", 2.1), ("seed", 2**64),
    ("logprobs", 21), ("logit_bias", {1: 101.0}), ("max_tokens", 0)])
def test_parameters_out_of_bounds_are_refused(field: str, value: object) -> None:
    with pytest.raises(SingLoRAError, match=field):
        SamplingParams(**{field: value})
    assert field in BOUNDS
    with pytest.raises(SingLoRAError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)
