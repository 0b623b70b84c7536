"""Real architectures: all-MiniLM-L6-v2 (the offline pretrained BERT) and tiny random Llama (GQA) / GPT-2 configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_close, minilm_path, param_formula
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from torch_singlora import SingLoRAConfig, SingLoRAModel, get_singlora_model


def train_steps(model: SingLoRAModel, batch: dict, steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.bind_optimizer(optimizer)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_minilm_all_linear_param_count_training_save_load_merge(tmp_path: Path) -> None:
    path = minilm_path()
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    expected_params = param_formula(base.bert, 8)  # every Linear of the encoder + pooler; the classifier trains fully
    classifier = sum(p.numel() for p in base.classifier.parameters())
    model = get_singlora_model(
        base, SingLoRAConfig(r=8, alpha=8, target_modules="all-linear", modules_to_save=["classifier"], ramp_up_steps=2)
    )
    assert len(list(model.singlora_layers())) == 6 * 6 + 1
    assert model.get_nb_trainable_parameters()[0] == expected_params + classifier
    assert expected_params == 6 * (4 * 384 + 2 * 1536) * 8 + 384 * 8
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["the match ended in a draw", "shares fell sharply today", "the new phone has a fast chip"] * 2
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True), labels=torch.tensor([0, 1, 2] * 2))
    losses = train_steps(model, batch, steps=12, lr=5e-3)
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    model.save_adapter(tmp_path)
    fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    loaded = SingLoRAModel.from_pretrained(fresh, tmp_path).eval()
    assert loaded.get_ramp_step() == 12
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, logits)
        merged = loaded.merge_and_unload()
        assert_close(merged(**inputs).logits, logits, dtype=torch.float32)


def test_tiny_llama_gqa_rectangular_projections(tmp_path: Path) -> None:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_singlora_model(base, SingLoRAConfig(r=4, target_modules=targets, ramp_up_steps=0))
    k_proj = model.model.model.layers[0].self_attn.k_proj
    assert (k_proj.d_out, k_proj.d_in) == (16, 32) and k_proj.singlora["default"].A.shape == (32, 4)
    assert model.get_nb_trainable_parameters()[0] == param_formula(base.model.layers, 4)
    ids = torch.randint(0, 64, (4, 16))
    losses = train_steps(model, {"input_ids": ids, "labels": ids}, steps=15, lr=1e-2)
    assert losses[-1] < losses[0] - 0.1
    model.save_adapter(tmp_path)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        assert_close(merged(input_ids=ids).logits, expected)
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():  # the plain model, loaded strictly, computes what the adapted one did
        assert_close(fresh.eval()(input_ids=ids).logits, expected)


def test_tiny_gpt2_conv1d_targets(tmp_path: Path) -> None:
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    base = GPT2LMHeadModel(config)
    model = get_singlora_model(base, SingLoRAConfig(r=4, target_modules=None, ramp_up_steps=0))  # default: c_attn
    c_attn = model.model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn.base_layer, Conv1D) and (c_attn.d_out, c_attn.d_in) == (96, 32)
    ids = torch.randint(0, 64, (4, 12))
    losses = train_steps(model, {"input_ids": ids, "labels": ids}, steps=15, lr=1e-2)
    assert losses[-1] < losses[0] - 0.1
    model.eval()
    model.save_adapter(tmp_path)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        assert type(merged.transformer.h[0].attn.c_attn) is Conv1D
        assert_close(merged(input_ids=ids).logits, expected)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_hf_gradient_checkpointing_counts_optimizer_steps(use_reentrant: bool) -> None:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    base = LlamaForCausalLM(config)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    base.enable_input_require_grads()
    model = get_singlora_model(base, SingLoRAConfig(r=4, target_modules=["q_proj", "v_proj"], ramp_up_steps=10))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.bind_optimizer(optimizer)
    ids = torch.randint(0, 64, (2, 8))
    for _ in range(3):
        for _ in range(2):  # accumulation
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model.get_ramp_step() == 3
    A = model.model.model.layers[0].self_attn.q_proj.singlora["default"].A
    assert A.grad is None  # zero_grad cleared it; now check one more backward gives a gradient
    model(input_ids=ids, labels=ids).loss.backward()
    assert A.grad is not None and A.grad.abs().sum() > 0
