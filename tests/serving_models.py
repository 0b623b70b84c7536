"""The tiny model the live server tests serve (``test_serving_server``, ``test_serving_traffic``,
``test_playground``): a random Llama with SmolLM2's tokenizer (its vocabulary and chat template), fast enough for
many requests at once."""

from __future__ import annotations

import torch


def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=1,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()
