"""``transformers.Trainer`` integration: the ramp follows optimizer steps, resumes with the checkpoint, and
checkpoints can hold only the adapter.

    model = get_singlora_model(hf_model, SingLoRAConfig(r=8))   # T = 1% of the Trainer's max_steps
    trainer = SingLoRATrainer(model=model, args=TrainingArguments(..., remove_unused_columns=False), ...)
    trainer.train()                      # checkpoint-N/ holds adapter_config.json + adapter_model.safetensors
    trainer.train(resume_from_checkpoint=True)   # adapter weights and ramp step restored

With a plain ``Trainer`` add ``SingLoRACallback(model)`` to ``callbacks``: the ramp is the same, checkpoints keep
the Trainer's full state dict (step buffers included) plus an adapter-only copy in ``checkpoint-N/singlora_adapter``.

The ramp step of each active adapter is ``offset + state.global_step``. ``global_step`` counts optimizer steps
(micro-batches of gradient accumulation do not count; ``on_step_end`` runs once per optimizer step), and the
Trainer restores it on resume, so the ramp resumes exactly. ``offset`` is the adapter's own step when training
starts minus ``global_step`` (a previously trained adapter keeps its ramp; a restored one lines up again).
Setting the step (rather than adding to it) makes the callback safe together with ``bind_optimizer``.
"""

from __future__ import annotations

import os
from pathlib import Path

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


class SingLoRACallback(TrainerCallback):
    """Drives the SingLoRA ramp from ``state.global_step`` and saves adapter-only copies at each checkpoint.

    Args:
        model: The ``SingLoRAModel`` being trained.
        save_adapter: Write ``checkpoint-N/singlora_adapter/`` (adapter files) on every Trainer save.
    """

    def __init__(self, model: SingLoRAModel, *, save_adapter: bool = True) -> None:
        self.model = _check_model(model)
        self.save_adapter = save_adapter
        self.offsets: dict[str, int] = {}

    def _sync(self, global_step: int) -> None:
        for name in self.model.active_adapters:
            offset = self.offsets.setdefault(name, 0)
            self.model.set_step(offset + global_step, name)

    def on_train_begin(self, args, state, control, **kwargs):
        for name in self.model.active_adapters:  # a fractional ramp (the default) resolves against the run's length
            if self.model.get_ramp_up_steps(name) is None:
                self.model.set_total_steps(state.max_steps, name)
        self.offsets = {
            name: max(self.model.get_step(name) - state.global_step, 0) for name in self.model.active_adapters
        }
        self._sync(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._sync(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self.save_adapter and state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / ADAPTER_SUBDIR
            for name, directory in adapter_dirs(self.model, checkpoint).items():
                self.model.save_adapter(directory, name)


class SingLoRATrainer(Trainer):
    """A ``Trainer`` whose checkpoints and ``save_model`` hold only the active adapters (``adapter_config.json`` +
    ``adapter_model.safetensors``, ramp step included) and that resumes from them. Adds ``SingLoRACallback``."""

    def __init__(self, model: SingLoRAModel = None, *args, callbacks=None, **kwargs) -> None:
        _check_model(model)
        callbacks = list(callbacks or []) + [SingLoRACallback(model, save_adapter=False)]
        super().__init__(model, *args, callbacks=callbacks, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        for name, directory in adapter_dirs(self.model, output_dir).items():
            self.model.save_adapter(directory, name)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        for name, directory in adapter_dirs(self.model, resume_from_checkpoint).items():
            if not (directory / CONFIG_FILE).is_file():
                raise AdapterFileError(f"{directory}: no SingLoRA adapter checkpoint for adapter {name!r}")
            self.model.load_adapter_in_place(directory, name)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
