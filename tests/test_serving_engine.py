"""The generation engine on its own (``serving/engine.py``), over a tiny Llama: chunked prefill under the per-step
token budget (running rows keep decoding while a long prompt is prefilled, and every answer equals transformers'
own greedy generation), row isolation (a row whose detokenizing, adapter or prefill forward fails ends alone), and
cancellation within one step."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from torch_singlora.errors import SingLoRAError
from torch_singlora.serving.engine import GenerationEngine, GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3)
    return LlamaForCausalLM(config).eval()


def reference(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy generation the plain way: the whole sequence through the model for every token, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


class Collector:
    """A request's events, and a flag once it ended."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.end: tuple[str, object] | None = None
        self.ended = threading.Event()

    def __call__(self, kind: str, value: object) -> None:
        if kind == "token":
            if value.token is not None:
                self.tokens.append(value.token)
        else:
            self.end = (kind, value)
            self.ended.set()


def request(prompt: list[int], max_tokens: int, adapter: str = "__base__", text=None):
    collector = Collector()
    return GenerationRequest(adapter, prompt, SamplingParams(max_tokens=max_tokens, temperature=0), collector,
                             text), collector


@contextlib.contextmanager
def running(engine):
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


def no_adapters(names):
    return contextlib.nullcontext()


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_chunked_prefill_keeps_running_rows_decoding(model) -> None:
    forwards: list[tuple[str, int, int]] = []
    engine = GenerationEngine(model, no_adapters, max_batch_size=4, max_step_tokens=16, batch_window_s=0.0,
                              observer=lambda kind, rows, tokens: forwards.append((kind, rows, tokens)))
    short = [request([5, 6, 7, 8, 9], 40), request([11, 12, 13], 40)]
    long_prompt = [int(t) for t in torch.randint(3, 90, (100,), generator=torch.Generator().manual_seed(2))]
    long = request(long_prompt, 6)
    with running(engine):
        for job, _ in short:
            engine.submit(job)
        wait_until(lambda: len(short[0][1].tokens) >= 3 and len(short[1][1].tokens) >= 3)
        start = len(forwards)
        engine.submit(long[0])
        for _, collector in [*short, long]:
            assert collector.ended.wait(60)
    assert all(c.end == ("done", "length") for _, c in [*short, long])
    assert short[0][1].tokens == reference(model, [5, 6, 7, 8, 9], 40)
    assert short[1][1].tokens == reference(model, [11, 12, 13], 40)
    assert long[1].tokens == reference(model, long_prompt, 6)
    assert max(tokens for _, _, tokens in forwards) <= 16  # no step ran more than the budget
    during = forwards[start:]
    chunks = [i for i, (kind, _, _) in enumerate(during) if kind == "prefill"]
    assert len(chunks) >= 100 // 14  # the long prompt in chunks of at most 16 - 2 tokens ...
    for i in chunks:  # ... each step after a decode of the running rows: they never waited for the whole prompt
        assert during[i - 1][0] == "decode" and during[i - 1][1] == 2


class FailingText:
    """A detokenizer that fails on the ``fail_at``-th token."""

    stopped = False

    def __init__(self, fail_at: int) -> None:
        self.seen, self.fail_at = 0, fail_at

    def push(self, token: int) -> str:
        self.seen += 1
        if self.seen == self.fail_at:
            raise UnicodeError("cannot decode this row")
        return ""

    def flush(self) -> str:
        return ""


def test_a_row_that_fails_ends_alone(model) -> None:
    """One row's detokenizer fails, one row's adapter stops being served, one request's prefill forward fails: each
    of those requests gets its own error; every other row finishes with its solo answer."""
    served = {"__base__", "kept", "gone", "bomb"}

    @contextlib.contextmanager
    def use(names):
        if "bomb" in names:
            raise RuntimeError("this forward failed")
        assert set(names) <= served, names  # a row whose adapter left never runs
        yield

    engine = GenerationEngine(model, use, max_batch_size=8, max_step_tokens=64, batch_window_s=0.05,
                              adapter_ok=lambda name: name in served)
    healthy = [request([3, 4, 5], 30), request([7, 8], 30, adapter="kept")]
    broken_text = request([9, 10, 11], 30, text=FailingText(4))
    retired = request([12, 13], 30, adapter="gone")
    with running(engine):
        for job, _ in [*healthy, broken_text, retired]:
            engine.submit(job)
        wait_until(lambda: len(retired[1].tokens) >= 5)
        # between two forwards, as the service unloads (Service._unload): a step checks its adapters, then runs them
        engine.run_in_worker(lambda: served.discard("gone")).result(timeout=60)
        bomb = request([14, 15], 5, adapter="bomb")
        engine.submit(bomb[0])
        for _, collector in [*healthy, broken_text, retired, bomb]:
            assert collector.ended.wait(60)
    assert broken_text[1].end == ("error", "UnicodeError: cannot decode this row")
    assert retired[1].end[0] == "error" and "'gone' is no longer served" in retired[1].end[1]
    assert bomb[1].end == ("error", "internal error: RuntimeError: this forward failed")
    for (job, collector), prompt in zip(healthy, [[3, 4, 5], [7, 8]]):
        assert collector.end == ("done", "length") and collector.tokens == reference(model, prompt, 30)
    assert not engine.rows and engine.prefilling is None and not engine.waiting


def test_a_cancelled_row_leaves_within_one_step(model) -> None:
    engine = GenerationEngine(model, no_adapters, max_batch_size=4, batch_window_s=0.0)
    keep, cancel = request([3, 4], 60), request([5, 6], 60)
    with running(engine):
        engine.submit(keep[0])
        engine.submit(cancel[0])
        wait_until(lambda: len(cancel[1].tokens) >= 3)
        steps, generated = engine.steps, len(cancel[0].generated)
        cancel[0].cancelled = True
        assert cancel[1].ended.wait(30)
        assert engine.steps - steps <= 2 and len(cancel[0].generated) - generated <= 1
        assert cancel[1].end == ("done", "cancelled")
        assert keep[1].ended.wait(60)
    assert keep[1].tokens == reference(model, [3, 4], 60)
    with pytest.raises(SingLoRAError, match="max_step_tokens"):
        GenerationEngine(model, no_adapters, max_batch_size=8, max_step_tokens=4)
