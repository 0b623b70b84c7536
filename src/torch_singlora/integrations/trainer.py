"""``transformers.Trainer`` integration: the ramp follows optimizer steps, resumes with the checkpoint, and
checkpoints can hold only the adapter.

    model = get_singlora_model(hf_model, SingLoRAConfig(r=8))   # T = 1% of the Trainer's max_steps
    trainer = SingLoRATrainer(model=model, args=TrainingArguments(..., remove_unused_columns=False), ...)
    trainer.train()                      # checkpoint-N/ holds adapter_config.json + adapter_model.safetensors
    trainer.train(resume_from_checkpoint=True)   # adapter weights and ramp step restored

With a plain ``Trainer`` (or TRL's ``SFTTrainer``) add ``SingLoRACallback(model)`` to ``callbacks``: the ramp is the
same, checkpoints keep the Trainer's full state dict (step buffers included) plus an adapter-only copy in
``checkpoint-N/singlora_adapter``. Any other ``Trainer`` subclass gets adapter-only checkpoints with
``singlora_trainer_class(SFTTrainer)`` (``SingLoRATrainer`` is ``singlora_trainer_class(Trainer)``).

Tied weights (input and output embeddings of SmolLM2, Llama-3.2, Qwen2.5, Gemma): the Trainer saves a model that is
not a ``PreTrainedModel`` with ``safetensors.torch.save_file(model.state_dict())``, which refuses two names for one
tensor ("Some tensors share memory"). The callback therefore makes the model's ``state_dict()`` list each tied
tensor once, under its first name (as ``save_pretrained`` does), and lets ``load_state_dict`` fill the other names
from it (``state_dict_without_tied_copies``), so checkpoints save and resume keeps the weights tied.

The ramp step of each active adapter is ``offset + state.global_step``. ``global_step`` counts optimizer steps
(micro-batches of gradient accumulation do not count; ``on_step_end`` runs once per optimizer step), and the
Trainer restores it on resume, so the ramp resumes exactly. ``offset`` is the adapter's own step when training
starts minus ``global_step`` (a previously trained adapter keeps its ramp; a restored one lines up again).
Setting the step (rather than adding to it) makes the callback safe together with ``bind_optimizer``. Training starts
a run (``set_training_run``): each step's forwards use the ``u`` of that step, ``global_step + 1`` (``layers.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..adapter_file import CONFIG_FILE
from ..errors import AdapterFileError, SingLoRAError
from ..model import SingLoRAModel

ADAPTER_SUBDIR = "singlora_adapter"


def _check_model(model: object) -> SingLoRAModel:
    if not isinstance(model, SingLoRAModel):
        raise SingLoRAError(f"model must be a SingLoRAModel (get_singlora_model(...)), got {type(model).__name__}")
    return model


def adapter_dirs(model: SingLoRAModel, directory: str | os.PathLike) -> dict[str, Path]:
    """Where each active adapter goes in a checkpoint: the first at ``directory``, others in ``directory/<name>``."""
    directory = Path(directory)
    return {name: directory if i == 0 else directory / name for i, name in enumerate(model.active_adapters)}


def tied_parameter_names(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor (e.g. ``lm_head.weight`` and ``embed_tokens.weight``), each
    in ``named_parameters`` order."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _drop_tied_copies(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for names in tied_parameter_names(module):
        for name in names[1:]:
            state_dict.pop(prefix + name, None)


def _fill_tied_copies(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for names in tied_parameter_names(module):
        present = [prefix + n for n in names if prefix + n in state_dict]
        if present:
            for name in names:
                state_dict.setdefault(prefix + name, state_dict[present[0]])


def state_dict_without_tied_copies(model: nn.Module) -> None:
    """From now on ``model.state_dict()`` holds each tied tensor once (under its first name), so ``safetensors``
    can save it, and ``model.load_state_dict`` accepts such a dict (the tied names are filled from the kept one,
    so ``strict=True`` still works and the weights stay tied). Idempotent."""
    if getattr(model, "_singlora_tied_hooks", False):
        return
    model.register_state_dict_post_hook(_drop_tied_copies)
    model.register_load_state_dict_pre_hook(_fill_tied_copies)
    model._singlora_tied_hooks = True


class SingLoRACallback(TrainerCallback):
    """Drives the SingLoRA ramp from ``state.global_step`` and saves adapter-only copies at each checkpoint.

    Also makes the model's state dict savable when it has tied weights (``state_dict_without_tied_copies``).

    Args:
        model: The ``SingLoRAModel`` being trained.
        save_adapter: Write ``checkpoint-N/singlora_adapter/`` (adapter files) on every Trainer save.
    """

    def __init__(self, model: SingLoRAModel, *, save_adapter: bool = True) -> None:
        self.model = _check_model(model)
        self.save_adapter = save_adapter
        self.offsets: dict[str, int] = {}
        state_dict_without_tied_copies(model)

    def _sync(self, global_step: int) -> None:
        for name in self.model.active_adapters:
            offset = self.offsets.setdefault(name, 0)
            self.model.set_ramp_step(offset + global_step, name)

    def on_train_begin(self, args, state, control, **kwargs):
        for name in self.model.active_adapters:  # a fractional ramp (the default) resolves against the run's length
            if self.model.get_ramp_up_steps(name) is None:
                self.model.set_total_steps(state.max_steps, name)
        self.offsets = {
            name: max(self.model.get_ramp_step(name) - state.global_step, 0) for name in self.model.active_adapters
        }
        self._sync(state.global_step)
        self.model.set_training_run(True)  # training-mode forwards compute step global_step + 1

    def on_step_end(self, args, state, control, **kwargs):
        self._sync(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self.save_adapter and state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / ADAPTER_SUBDIR
            for name, directory in adapter_dirs(self.model, checkpoint).items():
                self.model.save_adapter(directory, name)


class SingLoRATrainerMixin:
    """Put before a ``Trainer`` class (``singlora_trainer_class``): checkpoints and ``save_model`` hold only the
    active adapters (``adapter_config.json`` + ``adapter_model.safetensors``, ramp step included), resuming loads
    them, and ``SingLoRACallback`` drives the ramp."""

    def __init__(self, model: SingLoRAModel = None, *args: Any, callbacks: Any = None, **kwargs: Any) -> None:
        _check_model(model)
        callbacks = list(callbacks or []) + [SingLoRACallback(model, save_adapter=False)]
        super().__init__(model, *args, callbacks=callbacks, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        for name, directory in adapter_dirs(self.model, output_dir).items():
            self.model.save_adapter(directory, name)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        for name, directory in adapter_dirs(self.model, resume_from_checkpoint).items():
            if not (directory / CONFIG_FILE).is_file():
                raise AdapterFileError(f"{directory}: no SingLoRA adapter checkpoint for adapter {name!r}")
            self.model.load_adapter_in_place(directory, name)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


class SingLoRAReferenceMixin:
    """For TRL's ``DPOTrainer`` (a trainer with ``compute_ref_log_probs``): the reference log-probabilities are the
    model's own with its adapters disabled, or with its frozen ``"ref"`` adapter active when it has one
    (``train.methods.reference``, TRL's rule for PEFT models). With ``precompute_ref_log_probs=True`` and no
    ``ref_model``, DPO then holds one model in memory (without precomputing, TRL loads the base model again)."""

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> Any:
        from ..train.methods import reference

        with reference(model):
            return super().compute_ref_log_probs(model, inputs)


def singlora_trainer_class(trainer_class: type) -> type:
    """``trainer_class`` (``Trainer`` or a subclass such as TRL's ``SFTTrainer`` / ``DPOTrainer``) with
    adapter-only checkpoints (``SingLoRATrainerMixin``); for ``DPOTrainer``, also the reference of
    ``SingLoRAReferenceMixin``."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise SingLoRAError(f"trainer_class must be transformers.Trainer or a subclass, got {trainer_class!r}")
    mixins = (SingLoRATrainerMixin,) + ((SingLoRAReferenceMixin,) if hasattr(trainer_class, "compute_ref_log_probs")
                                        else ())
    return type(f"SingLoRA{trainer_class.__name__}", (*mixins, trainer_class),
                {"__doc__": f"{trainer_class.__name__} with SingLoRA adapter-only checkpoints."})


class SingLoRATrainer(SingLoRATrainerMixin, Trainer):
    """A ``Trainer`` whose checkpoints and ``save_model`` hold only the active adapters (``adapter_config.json`` +
    ``adapter_model.safetensors``, ramp step included) and that resumes from them. Adds ``SingLoRACallback``."""
