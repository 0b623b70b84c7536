"""Small models with three adapters for the mixed-batch and bank tests (``test_mixed``, ``test_bank``): every
layer kind, a tiny Llama, and each example run alone through the ordinary path (the reference)."""

from __future__ import annotations

import torch
from torch import nn

from torch_singlora import SingLoRAConfig, get_singlora_model

NAMES = ["a", "b", "__base__", "c", "a", "b"]  # repeated names, the base model, and every adapter


def run_alone(model, name: str, *args, generate: bool = False, **kwargs):
    """One example through the ordinary (non-mixed) path: its adapter active, or adapters disabled."""
    call = model.generate if generate else model
    if name == "__base__":
        with model.disable_adapters():
            return call(*args, **kwargs)
    model.set_adapter(name)
    return call(*args, **kwargs)


def add_three_adapters(model: nn.Module, targets: list[str], saved: list[str] | None = None):
    """Adapters ``a`` (r=2), ``b`` (r=5, alpha 3, half-way up its ramp, another target set), ``c`` (r=3, no copy
    of the saved modules), with large random A so that each changes the output visibly."""
    def config(r: int, alpha: float, target: list[str], save: list[str] | None, ramp: int = 0) -> SingLoRAConfig:
        return SingLoRAConfig(r=r, alpha=alpha, target_modules=target, modules_to_save=save, init="gaussian",
                              init_std=0.4, ramp_up_steps=ramp)

    wrapped = get_singlora_model(model, config(2, 2.0, targets, saved), "a")
    wrapped.add_adapter("b", config(5, 3.0, targets[::2], saved, ramp=10))
    wrapped.set_ramp_step(5, "b")
    wrapped.add_adapter("c", config(3, 1.0, targets[1:], None))
    for _, wrapper in wrapped.trainable_copies():
        for replica in wrapper.copies.values():
            with torch.no_grad():
                for p in replica.parameters():
                    p.add_(torch.randn_like(p))
    return wrapped.eval()


class EveryKind(nn.Module):
    """Embedding -> Conv1d (reflect padding) -> Conv2d (stride, dilation) -> Linear (tall, wide) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.conv1 = nn.Conv1d(8, 6, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(1, 4, (2, 3), stride=(1, 2), dilation=(2, 1), padding=1)
        self.up = nn.Linear(4, 12)
        self.down = nn.Linear(12, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.emb(ids).transpose(1, 2))  # (B, 6, T)
        h = self.conv2(h.unsqueeze(1))  # (B, 4, H', W')
        h = self.down(torch.relu(self.up(h.flatten(2).transpose(1, 2))))  # (B, P, 5)
        return self.head(h)


def tiny_llama(vocab: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "embed_tokens"]


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    return ids, (ids != 0).long()
