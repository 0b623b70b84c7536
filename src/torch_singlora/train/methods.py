"""The model to train, per method, behind one small interface (``Trainable``).

- ``singlora``: this library (``W0 + s * u(t) * A A^T``); the ramp step follows the real optimizer's steps.
- ``lora`` / ``dora`` / ``loraplus``: PEFT's ``LoraConfig`` (``use_dora=True`` for DoRA; LoRA+ is LoRA with PEFT's
  ``create_loraplus_optimizer``, B learning at ``loraplus_lr_ratio`` times the learning rate).
- ``full``: every parameter trains.

Adapter methods get the same resolved list of module names (``resolve_target_names``), so comparisons adapt exactly
the same layers. The task head (``classifier`` / ``score``) trains fully and is saved with the adapter.

Each saved output folder also holds ``run_info.json`` (task, method, base model, labels, max length), which
``evaluate`` / ``merge`` read to rebuild the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from ..config import SingLoRAConfig
from ..errors import SingLoRAError
from ..model import SingLoRAModel, get_singlora_model
from ..targets import resolve_targets

METHODS = ("singlora", "lora", "dora", "loraplus", "full")
PEFT_METHODS = ("lora", "dora", "loraplus")
HEAD_NAMES = ("classifier", "score")
RUN_INFO = "run_info.json"

Targets = Union[list[str], str, None]


def parse_targets(text: str | None) -> Targets:
    """``--target-modules``: ``None``/``""`` = default per architecture; ``all-linear``; ``re:<regex>``;
    else a comma-separated list of module names or suffixes."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    if text == "all-linear":
        return text
    if text.startswith("re:"):
        return text[3:]
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_ramp(text: str | int | float) -> int | float:
    """``--ramp-up``: an int number of optimizer steps, or a fraction of the total steps (a number with a dot)."""
    if isinstance(text, (int, float)):
        return text
    try:
        return float(text) if "." in text or "e" in text.lower() else int(text)
    except ValueError:
        raise SingLoRAError(f"--ramp-up={text!r} must be an int (steps) or a fraction like 0.01") from None


def head_names(model: nn.Module) -> list[str]:
    """Names of the task head modules of a sequence-classification model (trained fully, saved with the adapter)."""
    children = dict(model.named_children())
    return [name for name in HEAD_NAMES if name in children]


def resolve_target_names(model: nn.Module, targets: Targets, modules_to_save: list[str]) -> list[str]:
    """Full module names that ``targets`` selects in ``model`` (errors name a pattern that matches nothing)."""
    config = SingLoRAConfig(target_modules=targets, modules_to_save=modules_to_save or None, ramp_up_steps=0)
    return resolve_targets(model, config)


@dataclass
class MethodConfig:
    """What to train. ``ramp_up``: SingLoRA's T (int steps, or a fraction of ``total_steps``)."""

    method: str = "singlora"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: Targets = None
    ramp_up: Union[int, float] = 0.01
    total_steps: int = 1
    loraplus_lr_ratio: float = 16.0
    init: str = "normal"  # SingLoRA's init of A (SingLoRAConfig.init)


class Trainable:
    """A model being trained by one method: forward, optimizer, ramp, save.

    Attributes:
        model: The module to call and to hand to ``accelerate`` (``SingLoRAModel``, ``PeftModel`` or the base model).
        method: One of ``METHODS``.
        target_names: Adapted module names (empty for ``full``).
    """

    def __init__(self, model: nn.Module, method: str, target_names: list[str], lr_ratio: float) -> None:
        self.model = model
        self.method = method
        self.target_names = target_names
        self.lr_ratio = lr_ratio

    def named_trainable(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """``{name: parameter}`` of the trainable parameters (of ``model``, default ``self.model``)."""
        return {n: p for n, p in (model or self.model).named_parameters() if p.requires_grad}

    def make_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (LoRA+: PEFT's optimizer with B at ``lr * lr_ratio``)."""
        if self.method == "loraplus":
            from peft.optimizers import create_loraplus_optimizer

            return create_loraplus_optimizer(
                self.model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=self.lr_ratio, weight_decay=weight_decay
            )
        return torch.optim.AdamW(list(self.named_trainable().values()), lr=lr, weight_decay=weight_decay)

    def bind_ramp(self, optimizer: torch.optim.Optimizer) -> None:
        """SingLoRA: advance u(t) after every step of ``optimizer`` (the real, inner optimizer)."""
        if isinstance(self.model, SingLoRAModel):
            self.model.bind_optimizer(optimizer)

    def ramp_step(self) -> int:
        return self.model.get_step() if isinstance(self.model, SingLoRAModel) else 0

    def set_ramp_step(self, step: int) -> None:
        if isinstance(self.model, SingLoRAModel):
            self.model.set_step(step)

    def u(self) -> float | None:
        """SingLoRA's current ramp value u(t) (None for other methods)."""
        if not isinstance(self.model, SingLoRAModel):
            return None
        from ..functional import ramp

        for _, layer in self.model.singlora_layers():
            adapter = next(iter(layer.singlora.values()))
            return float(ramp(adapter.step, adapter.ramp_steps, torch.float64))
        return None

    def save(self, directory: Path, model: nn.Module | None = None) -> Path:
        """Write the adapter (or the full model) into ``directory``; returns the weights file."""
        model = model or self.model
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(model, SingLoRAModel):
            model.save_adapter(directory)
            return directory / "adapter_model.safetensors"
        model.save_pretrained(directory)
        name = "model.safetensors" if self.method == "full" else "adapter_model.safetensors"
        return directory / name


def build(model: nn.Module, config: MethodConfig, modules_to_save: list[str]) -> Trainable:
    """Wrap ``model`` (a transformers model) for ``config.method``."""
    if config.method not in METHODS:
        raise SingLoRAError(f"--method={config.method!r} must be one of {METHODS}")
    if config.method == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return Trainable(model, "full", [], config.loraplus_lr_ratio)
    names = resolve_target_names(model, config.targets, modules_to_save)
    if config.method == "singlora":
        singlora_config = SingLoRAConfig(
            r=config.r, alpha=config.alpha, dropout=config.dropout, target_modules=names,
            modules_to_save=modules_to_save or None, ramp_up_steps=config.ramp_up, total_steps=config.total_steps,
            init=config.init,
        )
        return Trainable(get_singlora_model(model, singlora_config), "singlora", names, config.loraplus_lr_ratio)
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=names,
        use_dora=config.method == "dora", modules_to_save=modules_to_save or None,
    )
    return Trainable(get_peft_model(model, lora_config), config.method, names, config.loraplus_lr_ratio)


def load_base(path: str, task: str, labels: list[str] | None, dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers model from a local folder, with a fresh head for ``labels`` when classifying."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if not (Path(path) / "config.json").is_file():
        raise SingLoRAError(f"--model {path!r}: not a transformers model folder (no config.json)")
    if task == "classification":
        assert labels is not None
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)}, dtype=dtype,
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def write_run_info(directory: Path, info: dict[str, Any]) -> None:
    from ..atomic import atomic_write_text

    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    atomic_write_text(directory / RUN_INFO, text)


def read_run_info(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / RUN_INFO
    if not Path(directory).is_dir():
        raise SingLoRAError(f"adapter folder {str(directory)!r} does not exist")
    if not path.is_file():
        raise SingLoRAError(f"{path}: no such file (is {directory} an output of `singlora train`?)")
    return json.loads(path.read_text())


def load_trained(directory: str | Path, base_model: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from a ``singlora train`` output folder (adapter + ``run_info.json``).

    Returns ``(model, run_info)``; ``model`` is a ``SingLoRAModel``, a ``PeftModel`` or a plain transformers model.
    """
    info = read_run_info(directory)
    method = info["method"]
    if method == "full":
        return load_base(str(directory), info["task"], info.get("labels")), info
    base = load_base(base_model or info["base_model"], info["task"], info.get("labels"))
    if method == "singlora":
        return SingLoRAModel.from_pretrained(base, directory), info
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(directory)), info
