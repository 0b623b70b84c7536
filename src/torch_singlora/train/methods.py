"""How the model trains, one class per kind behind one small interface (``Method``):

- ``SingLoRA``: this library (``W0 + s * u(t) * A A^T``); the ramp step follows the real optimizer's steps.
- ``Peft``: ``lora`` / ``dora`` / ``loraplus`` through PEFT's ``LoraConfig`` (``use_dora=True`` for DoRA; LoRA+ is
  LoRA with PEFT's ``create_loraplus_optimizer``, B learning at ``loraplus_lr_ratio`` times the learning rate).
- ``Full``: every parameter trains; the "adapter" folder is a whole transformers model.

Adapter methods get the same resolved list of module names (``resolve_target_names``), so comparisons adapt exactly
the same layers. The task's heads (e.g. ``classifier``) train fully and are saved with the adapter.

    method = METHODS[name].wrap(base_model, settings, heads)   # the model to train
    optimizer = method.make_optimizer(lr, weight_decay); method.bind_ramp(optimizer)
    method.save(folder, unwrapped_model, tokenizer)            # after training
    METHODS[name].load(folder, load_base)                      # back: for evaluate / merge
    METHODS[name].merged(model)                                # a plain transformers model
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Union

import torch
from torch import nn

from ..config import SingLoRAConfig
from ..errors import SingLoRAError
from ..model import SingLoRAModel
from ..names import resolve

METHOD_NAMES = ("singlora", "lora", "dora", "loraplus", "full")

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


def resolve_target_names(model: nn.Module, targets: Targets, modules_to_save: list[str]) -> list[str]:
    """Full module names that ``targets`` selects in ``model`` (errors name a pattern that matches nothing)."""
    config = SingLoRAConfig(target_modules=targets, modules_to_save=modules_to_save or None, ramp_up_steps=0)
    return resolve(model, config).modules


@dataclass
class MethodSettings:
    """What to train. ``ramp_up_steps``: SingLoRA's T (int steps, or a fraction of ``total_steps``)."""

    method: str = "singlora"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: Targets = None
    ramp_up_steps: Union[int, float] = 0.01
    total_steps: int = 1
    loraplus_lr_ratio: float = 16.0
    init: str = "normal"  # SingLoRA's init of A (SingLoRAConfig.init)


class Method:
    """A model being trained by one method. ``model``: the module to call and to hand to ``accelerate``;
    ``target_names``: the adapted modules (empty for ``full``); ``heads``: modules trained fully and saved."""

    weights_file: ClassVar[str] = "adapter_model.safetensors"

    def __init__(self, model: nn.Module, settings: MethodSettings, target_names: list[str], heads: list[str],
                 head_params: int) -> None:
        self.model = model
        self.settings = settings
        self.target_names = target_names
        self.heads = heads
        self.head_params = head_params

    @classmethod
    def wrap(cls, model: nn.Module, settings: MethodSettings, heads: list[str]) -> "Method":
        """Make ``model`` (a transformers model, changed in place) trainable by this method."""
        head_params = sum(p.numel() for h in heads for p in model.get_submodule(h).parameters())
        wrapped, names = cls._wrap(model, settings, heads)
        return cls(wrapped, settings, names, heads, head_params)

    @staticmethod
    def _wrap(model: nn.Module, settings: MethodSettings, heads: list[str]) -> tuple[nn.Module, list[str]]:
        """``(the model to train, the adapted module names)``."""
        raise NotImplementedError

    def named_trainable(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """``{name: parameter}`` of the trainable parameters (of ``model``, default ``self.model``)."""
        return {n: p for n, p in (model or self.model).named_parameters() if p.requires_grad}

    def make_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters."""
        return torch.optim.AdamW(list(self.named_trainable().values()), lr=lr, weight_decay=weight_decay)

    def adapter_params(self) -> int | None:
        """Trainable parameters besides the heads' (None when everything trains)."""
        return sum(p.numel() for p in self.named_trainable().values()) - self.head_params

    # The ramp u(t): SingLoRA only; the others have none.
    def bind_ramp(self, optimizer: torch.optim.Optimizer) -> None:
        """Advance u(t) after every step of ``optimizer`` (the real, inner optimizer)."""

    def ramp_step(self) -> int:
        return 0

    def set_ramp_step(self, step: int) -> None:
        pass

    def u(self) -> float | None:
        return None

    def ramp_up_steps(self) -> int | None:
        return None

    def disabled(self) -> ContextManager[None]:
        """Inside: the base model alone (the step-0 "base" score; full fine-tuning has nothing to disable)."""
        return contextlib.nullcontext()

    def save(self, directory: Path, model: nn.Module, tokenizer: Any, dtype: str = "float32") -> Path:
        """Write the trained weights of ``model`` (the unwrapped ``self.model``) into ``directory``; returns the
        weights file. ``dtype`` (``--save-dtype``): SingLoRA only (TrainConfig.validate)."""
        model.save_pretrained(directory)
        return directory / self.weights_file

    @staticmethod
    def load(directory: str | Path, load_base: Callable[[str | None], nn.Module]) -> nn.Module:
        """The trained model saved in ``directory``; ``load_base(path)`` loads a base model (None: the recorded
        one) with the task's model class."""
        raise NotImplementedError

    @staticmethod
    def merged(model: nn.Module) -> nn.Module:
        """``model`` (from ``load``) as a plain transformers model with the update folded in."""
        raise NotImplementedError


class SingLoRA(Method):
    @staticmethod
    def _wrap(model: nn.Module, settings: MethodSettings, heads: list[str]) -> tuple[nn.Module, list[str]]:
        names = resolve_target_names(model, settings.targets, heads)
        config = SingLoRAConfig(  # the saved config lists the resolved names (what PEFT's methods get too)
            r=settings.r, alpha=settings.alpha, dropout=settings.dropout, target_modules=names,
            modules_to_save=heads or None, ramp_up_steps=settings.ramp_up_steps, total_steps=settings.total_steps,
            init=settings.init,
        )
        wrapped = SingLoRAModel(model, None)
        wrapped.add_adapter("default", config, modules=names)  # resolved above: planned from the names, not again
        wrapped.set_adapter("default")
        return wrapped, names

    def bind_ramp(self, optimizer: torch.optim.Optimizer) -> None:
        self.model.bind_optimizer(optimizer)

    def ramp_step(self) -> int:
        return self.model.get_ramp_step()

    def set_ramp_step(self, step: int) -> None:
        self.model.set_ramp_step(step)

    def u(self) -> float:
        return self.model.get_ramp_value()

    def ramp_up_steps(self) -> int:
        return self.model.get_ramp_up_steps()

    def disabled(self) -> ContextManager[None]:
        return self.model.disable_adapters()

    def save(self, directory: Path, model: nn.Module, tokenizer: Any, dtype: str = "float32") -> Path:
        model.save_adapter(directory, dtype=dtype)
        return directory / self.weights_file

    @staticmethod
    def load(directory: str | Path, load_base: Callable[[str | None], nn.Module]) -> nn.Module:
        return SingLoRAModel.from_pretrained(load_base(None), directory)

    @staticmethod
    def merged(model: nn.Module) -> nn.Module:
        return model.merge_and_unload(safe=True)


class Peft(Method):
    @staticmethod
    def _wrap(model: nn.Module, settings: MethodSettings, heads: list[str]) -> tuple[nn.Module, list[str]]:
        from peft import LoraConfig, get_peft_model

        from ..peft_folder import peft_without_deprecations

        names = resolve_target_names(model, settings.targets, heads)
        config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                            target_modules=names, use_dora=settings.method == "dora", modules_to_save=heads or None)
        with peft_without_deprecations():
            return get_peft_model(model, config), names

    def make_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        if self.settings.method != "loraplus":
            return super().make_optimizer(lr, weight_decay)
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(self.model, torch.optim.AdamW, lr=lr,
                                         loraplus_lr_ratio=self.settings.loraplus_lr_ratio, weight_decay=weight_decay)

    def disabled(self) -> ContextManager[None]:
        return self.model.disable_adapter()

    @staticmethod
    def load(directory: str | Path, load_base: Callable[[str | None], nn.Module]) -> nn.Module:
        from ..peft_folder import load_peft_adapter

        return load_peft_adapter(lambda: load_base(None), directory)  # checked, then loaded

    @staticmethod
    def merged(model: nn.Module) -> nn.Module:
        return model.merge_and_unload(safe_merge=True)


class Full(Method):
    weights_file = "model.safetensors"

    def save(self, directory: Path, model: nn.Module, tokenizer: Any, dtype: str = "float32") -> Path:
        """A whole transformers model folder: the weights and the tokenizer."""
        tokenizer.save_pretrained(directory)
        return super().save(directory, model, tokenizer, dtype)

    @staticmethod
    def _wrap(model: nn.Module, settings: MethodSettings, heads: list[str]) -> tuple[nn.Module, list[str]]:
        return model.requires_grad_(True), []

    def adapter_params(self) -> None:
        return None

    @staticmethod
    def load(directory: str | Path, load_base: Callable[[str | None], nn.Module]) -> nn.Module:
        _require_safetensors(directory, "model.safetensors", "model.safetensors.index.json")  # never a pickle
        return load_base(str(directory))

    @staticmethod
    def merged(model: nn.Module) -> nn.Module:
        return model


def _require_safetensors(directory: str | Path, *names: str) -> None:
    """Refuse a trained folder whose weights are not safetensors: loaders would fall back to unpickling a
    ``.bin``, and singlora never opens a pickle."""
    if not any((Path(directory) / name).is_file() for name in names):
        raise SingLoRAError(f"{directory}: no {' or '.join(names)}; singlora loads weights only from safetensors "
                            "files, never pickled .bin files")


METHODS: dict[str, type[Method]] = {"singlora": SingLoRA, "lora": Peft, "dora": Peft, "loraplus": Peft, "full": Full}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise SingLoRAError(f"--method={name!r} must be one of {METHOD_NAMES}")
    return METHODS[name]
