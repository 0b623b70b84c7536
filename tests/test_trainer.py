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
    model.register_forward_pre_hook(lambda module, args: seen.append(model.get_step()))
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
    assert counter.count == model.get_step() == trainer.state.global_step == 4
    final_A = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("singlora.default.A")}
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # adapter-only checkpoint

    resumed = _model()
    seen = _record_steps(resumed)
    trainer = SingLoRATrainer(model=resumed, args=_args(tmp_path / "again"), train_dataset=_data())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert seen == [2, 2, 3, 3] and resumed.get_step() == 4
    for key, value in resumed.state_dict().items():
        if key in final_A:
            torch.testing.assert_close(value, final_A[key], atol=1e-5, rtol=1e-4)


def test_callback_with_plain_trainer_saves_adapter_copies_and_resumes(tmp_path) -> None:
    model = _model()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_data(),
                                   callbacks=[SingLoRACallback(model)])
    trainer.train()
    assert model.get_step() == 4
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
    assert model.get_step() == 4  # the recomputed forwards do not move the ramp
    for key, value in model.state_dict().items():
        if key in before:
            assert not torch.equal(value, before[key]), key


def test_trainer_needs_a_singlora_model(tmp_path) -> None:
    with pytest.raises(SingLoRAError, match="SingLoRAModel"):
        SingLoRATrainer(model=torch.nn.Linear(2, 2), args=_args(tmp_path))
