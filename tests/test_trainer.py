"""transformers.Trainer: the ramp counts optimizer steps under gradient accumulation, resumes with the checkpoint,
checkpoints can be adapter-only, and HF gradient checkpointing trains the adapters."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from torch_singlora import SingLoRAConfig, SingLoRAError, get_singlora_model

transformers = pytest.importorskip("transformers")
from torch_singlora.integrations.trainer import ADAPTER_SUBDIR, SingLoRACallback, SingLoRATrainer  # noqa: E402


def _model(ramp_up_steps: int = 4):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    base = transformers.BertForSequenceClassification(config)
    config = SingLoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"],
                            ramp_up_steps=ramp_up_steps)
    return get_singlora_model(base, config)


def _data(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (n, 6), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": ids[i, 0] % 2}
            for i in range(n)]


def _args(tmp_path, **overrides):
    fields = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
                  learning_rate=5e-2, save_steps=2, report_to=[], use_cpu=True, remove_unused_columns=False,
                  logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    fields.update(overrides)
    return transformers.TrainingArguments(**fields)


def _record_steps(model) -> list[int]:
    """The ramp step seen by every forward (micro-batch) of the model."""
    seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(model.get_ramp_step()))
    return seen


class _CountOptimizerSteps(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.count = 0

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        inner.register_step_post_hook(lambda *_: setattr(self, "count", self.count + 1))


def test_trainer_ramp_counts_optimizer_steps_and_resumes(tmp_path) -> None:
    model = _model()
    seen = _record_steps(model)
    counter = _CountOptimizerSteps()
    trainer = SingLoRATrainer(model=model, args=_args(tmp_path), train_dataset=_data(), callbacks=[counter])
    trainer.train()
    # 4 optimizer steps of 2 micro-batches: forwards run at ramp steps 0,0,1,1,2,2,3,3
    assert seen == [0, 0, 1, 1, 2, 2, 3, 3]
    assert counter.count == model.get_ramp_step() == trainer.state.global_step == 4
    final_A = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("singlora.default.A")}
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # adapter-only checkpoint

    resumed = _model()
    seen = _record_steps(resumed)
    trainer = SingLoRATrainer(model=resumed, args=_args(tmp_path / "again"), train_dataset=_data())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert seen == [2, 2, 3, 3] and resumed.get_ramp_step() == 4
    for key, value in resumed.state_dict().items():
        if key in final_A:
            torch.testing.assert_close(value, final_A[key], atol=1e-5, rtol=1e-4)


def test_callback_with_plain_trainer_saves_adapter_copies_and_resumes(tmp_path) -> None:
    model = _model()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_data(),
                                   callbacks=[SingLoRACallback(model)])
    trainer.train()
    assert model.get_ramp_step() == 4
    assert (tmp_path / "checkpoint-2" / ADAPTER_SUBDIR / "adapter_config.json").is_file()
    resumed = _model()
    seen = _record_steps(resumed)
    trainer = transformers.Trainer(model=resumed, args=_args(tmp_path / "again"), train_dataset=_data(),
                                   callbacks=[SingLoRACallback(resumed)])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))  # the Trainer's state dict holds the step
    assert seen == [2, 2, 3, 3]


def test_gradient_checkpointing_trains_adapters_and_counts_optimizer_steps(tmp_path) -> None:
    model = _model(ramp_up_steps=0)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("singlora.default.A")}
    calls: list[int] = []
    model.model.bert.encoder.layer[0].attention.self.query.register_forward_hook(lambda *_: calls.append(1))
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    flag = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    trainer = SingLoRATrainer(model=model, args=_args(tmp_path, save_strategy="no", **{flag: True}),
                              train_dataset=_data())
    trainer.train()
    assert len(calls) == 16  # 8 micro-batches, each layer forward run again in backward: checkpointing is on
    assert model.get_ramp_step() == 4  # the recomputed forwards do not move the ramp
    for key, value in model.state_dict().items():
        if key in before:
            assert not torch.equal(value, before[key]), key


def test_trainer_needs_a_singlora_model(tmp_path) -> None:
    with pytest.raises(SingLoRAError, match="SingLoRAModel"):
        SingLoRATrainer(model=torch.nn.Linear(2, 2), args=_args(tmp_path))


# ---- tied embeddings (SmolLM2, Llama-3.2, Qwen2.5, Gemma): checkpoints used to fail with "Some tensors share memory"

def _tied_llama(vocab_size: int = 64, **config):
    torch.manual_seed(0)
    settings = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **config}))
    assert base.lm_head.weight is base.model.embed_tokens.weight
    return get_singlora_model(base, SingLoRAConfig(r=2, target_modules=["q_proj", "v_proj"], ramp_up_steps=2))


def _lm_data(n: int = 16) -> list[dict]:
    ids = torch.randint(1, 64, (n, 6), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]


def _adapter_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("singlora.default.A")}


def test_plain_trainer_saves_and_resumes_a_tied_model(tmp_path) -> None:
    from safetensors import safe_open

    model = _tied_llama()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, learning_rate=1e-2), train_dataset=_lm_data(),
                                   callbacks=[SingLoRACallback(model)])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))  # after training too
    with safe_open(str(tmp_path / "checkpoint-2" / "model.safetensors"), "pt") as saved:
        keys = set(saved.keys())
    assert "model.model.embed_tokens.weight" in keys and "model.lm_head.weight" not in keys  # the tied copy once
    state = model.state_dict()
    assert "model.lm_head.weight" not in state
    model.load_state_dict(state)  # strict: the tied name is filled from the kept one
    final = _adapter_weights(model)

    resumed = _tied_llama()
    trainer = transformers.Trainer(model=resumed, args=_args(tmp_path / "again", learning_rate=1e-2),
                                   train_dataset=_lm_data(), callbacks=[SingLoRACallback(resumed)])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.get_ramp_step() == 4
    assert resumed.model.lm_head.weight is resumed.model.model.embed_tokens.weight  # still tied after loading
    for key, value in _adapter_weights(resumed).items():
        torch.testing.assert_close(value, final[key], atol=1e-5, rtol=1e-4)


def _sft_config(tmp_path, **overrides):
    trl = pytest.importorskip("trl")

    # the recipe's flags (docs/interop.md): transformers >= 5 calls gradient checkpointing activation_checkpointing
    checkpointing = "activation_checkpointing" if hasattr(trl.SFTConfig, "activation_checkpointing") \
        else "gradient_checkpointing"
    fields = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, save_steps=2, report_to=[],
                  use_cpu=True, bf16=False, disable_tqdm=True, learning_rate=1e-2, logging_strategy="no", seed=0,
                  dataloader_num_workers=0, **{checkpointing: False})
    fields.update(overrides)
    return trl.SFTConfig(**fields)


def _chat_rows(n: int = 8) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Spell {i}."}],
             "completion": [{"role": "assistant", "content": f"{i} is {'one two three four'.split()[i % 4]}"}]}
            for i in range(n)]


def test_sft_trainer_adapter_only_checkpoints_resume_on_a_tied_model(tmp_path, smollm2_tokenizer) -> None:
    import datasets

    from torch_singlora.integrations.trainer import singlora_trainer_class

    trl = pytest.importorskip("trl")

    SFTTrainer = singlora_trainer_class(trl.SFTTrainer)
    vocab = dict(vocab_size=len(smollm2_tokenizer), pad_token_id=smollm2_tokenizer.pad_token_id)
    data = datasets.Dataset.from_list(_chat_rows())
    model = _tied_llama(**vocab)
    SFTTrainer(model=model, args=_sft_config(tmp_path), train_dataset=data, processing_class=smollm2_tokenizer).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    final = _adapter_weights(model)
    assert model.get_ramp_step() == 4

    resumed = _tied_llama(**vocab)
    seen = _record_steps(resumed)
    SFTTrainer(model=resumed, args=_sft_config(tmp_path / "again"), train_dataset=data,
               processing_class=smollm2_tokenizer).train(resume_from_checkpoint=str(checkpoint))
    assert seen == [2, 3] and resumed.get_ramp_step() == 4
    for key, value in _adapter_weights(resumed).items():
        torch.testing.assert_close(value, final[key], atol=1e-5, rtol=1e-4)

    plain = _tied_llama(**vocab)  # stock SFTTrainer + callback: full checkpoints of a tied model save too
    trl.SFTTrainer(model=plain, args=_sft_config(tmp_path / "plain", max_steps=2), train_dataset=data,
                   processing_class=smollm2_tokenizer, callbacks=[SingLoRACallback(plain)]).train()
    assert (tmp_path / "plain" / "checkpoint-2" / "model.safetensors").is_file()


def test_sft_trainer_takes_our_assistant_only_labels(tmp_path, smollm2_tokenizer) -> None:
    """SmolLM2's template has no {% generation %} blocks, so TRL refuses assistant_only_loss on it; our tokenized
    dataset carries the assistant-only labels, and SFTTrainer trains on exactly those."""
    from torch_singlora.llm.data import to_conversation
    from torch_singlora.llm.tokenization import SFTCollator, tokenize_conversations

    trl = pytest.importorskip("trl")

    rows = [{"messages": r["prompt"] + r["completion"] + [{"role": "user", "content": "Again?"},
                                                          {"role": "assistant", "content": "Yes."}]}
            for r in _chat_rows(4)]
    dataset = tokenize_conversations(smollm2_tokenizer, [to_conversation(r, "messages", "r") for r in rows],
                                     max_length=128)
    model = _tied_llama(vocab_size=len(smollm2_tokenizer))
    trainer = trl.SFTTrainer(model=model, args=_sft_config(tmp_path, save_strategy="no", max_steps=1),
                             train_dataset=dataset.to_hf_dataset(), processing_class=smollm2_tokenizer,
                             callbacks=[SingLoRACallback(model)])
    batch = next(iter(trainer.get_train_dataloader()))
    ours = SFTCollator(smollm2_tokenizer.pad_token_id)([dataset[i] for i in range(2)])
    assert torch.equal(batch["labels"], ours["labels"]) and torch.equal(batch["input_ids"], ours["input_ids"])
    trainer.train()
