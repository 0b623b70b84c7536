"""Tied embeddings (issue 11): merging an adapter on a tied ``lm_head`` must not change ``embed_tokens``; the merged
model computes what the adapted one did, and survives save_pretrained / from_pretrained."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import dense_update
from transformers import LlamaConfig, LlamaForCausalLM

from torch_singlora import SingLoRAConfig, get_singlora_model

CONFIG = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True)
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _tied_llama(targets: list[str]):
    torch.manual_seed(0)
    base = LlamaForCausalLM(copy.deepcopy(CONFIG)).double()  # a merge changes the model's config
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = get_singlora_model(base, SingLoRAConfig(r=4, alpha=4, target_modules=targets, ramp_up_steps=0))
    with torch.no_grad():  # a large update, far from negligible
        for _, layer in model.singlora_layers():
            layer.singlora["default"].A.mul_(4.0)
    return base, model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_merging_a_tied_lm_head_leaves_the_embeddings_and_the_outputs_alone(tmp_path) -> None:
    base, model = _tied_llama(["lm_head"])
    W0 = base.model.embed_tokens.weight.detach().clone()
    A = base.lm_head.singlora["default"].A.detach()
    with torch.no_grad():  # the float64 reference: final hidden states through W0 + dW, dW written out here
        hidden = base.model(input_ids=IDS).last_hidden_state
    reference = hidden @ (W0 + dense_update(A, 64, 16, 1.0)).T
    adapted = _logits(model)
    torch.testing.assert_close(adapted, reference)
    with pytest.warns(UserWarning, match=r"'lm_head' \(tied to model.embed_tokens.weight; 1,024 parameters copied\)"):
        model.merge()
    assert torch.equal(base.model.embed_tokens.weight, W0)  # today's bug: the embeddings moved with lm_head
    assert base.lm_head.base_layer.weight is not base.model.embed_tokens.weight
    assert base.config.tie_word_embeddings is False
    torch.testing.assert_close(_logits(model), reference)
    model.unmerge()  # tied again, to the untouched weight, and the flag back
    assert base.lm_head.base_layer.weight is base.model.embed_tokens.weight and base.config.tie_word_embeddings
    torch.testing.assert_close(_logits(model), reference)
    with model.disable_adapters():
        torch.testing.assert_close(_logits(model), hidden @ W0.T)
    with pytest.warns(UserWarning, match="tied"):
        merged = model.merge_and_unload()
    torch.testing.assert_close(_logits(merged), reference)
    merged.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float64)
    assert again.lm_head.weight is not again.model.embed_tokens.weight
    torch.testing.assert_close(_logits(again), reference)


def test_both_tied_modules_adapted_each_keeps_its_own_update() -> None:
    base, model = _tied_llama(["embed_tokens", "lm_head"])
    W0 = base.model.embed_tokens.base_layer.weight.detach().clone()
    deltas = {name: dense_update(layer.singlora["default"].A.detach(), 64, 16, 1.0)
              for name, layer in model.singlora_layers()}
    adapted = _logits(model)
    with pytest.warns(UserWarning, match="tied"):
        model.merge()
    torch.testing.assert_close(base.model.embed_tokens.base_layer.weight, W0 + deltas["model.embed_tokens"])
    torch.testing.assert_close(base.lm_head.base_layer.weight, W0 + deltas["lm_head"])
    torch.testing.assert_close(_logits(model), adapted)
    model.unmerge()
    assert base.lm_head.base_layer.weight is base.model.embed_tokens.base_layer.weight
    torch.testing.assert_close(_logits(model), adapted)
