"""How the model trains, one class per kind behind one small interface (``Method``):

- ``SingLoRA``: this library (``W0 + s * u(t) * A A^T``); the ramp step follows the real optimizer's steps.
- ``Peft``: ``lora`` / ``dora`` / ``loraplus`` through PEFT's ``LoraConfig`` (``use_dora=True`` for DoRA; LoRA+ is
  LoRA with PEFT's ``create_loraplus_optimizer``, B learning at ``loraplus_lr_ratio`` times the learning rate).
- ``Full``: every parameter trains; the "adapter" folder is a whole transformers model.

Adapter methods get the same resolved list of module names (``resolve_target_names``), so comparisons adapt exactly
the same layers. The task's heads (e.g. ``classifier``) train fully and are saved with the adapter.

    method = METHODS[name].wrap(base_model, settings, heads)   # the model to train (settings.init_adapter: from a
                                                               # trained adapter, kept a second time, frozen, as "ref")
    optimizer = method.make_optimizer(lr, weight_decay); method.bind_ramp(optimizer)
    method.save(folder, unwrapped_model, tokenizer)            # after training
    METHODS[name].load(folder, load_base)                      # back: for evaluate / merge
    METHODS[name].merged(model)                                # a plain transformers model
    with reference(model): ...                                 # the model the run started from (DPO's reference)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Iterator, Union

import torch
from torch import nn

from ..config import SingLoRAConfig
from ..errors import SingLoRAError
from ..model import SingLoRAModel
from ..names import resolve
from ..peft_folder import load_peft_adapter, peft_without_deprecations

METHOD_NAMES = ("singlora", "lora", "dora", "loraplus", "full")
REFERENCE_ADAPTER = "ref"  # the frozen copy of --init-adapter (TRL's name for it: DPOTrainer's "ref" adapter)

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
    init_adapter: str | None = None  # start from this trained adapter folder (its own r, alpha, targets, ramp)


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

    @staticmethod
    def saved_settings(directory: str | Path) -> dict[str, Any]:
        """The ``MethodSettings`` fields the adapter folder ``directory`` fixes (``check_init_adapter``)."""
        return {}

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
        """Inside: the base model alone (full fine-tuning has nothing to disable)."""
        return contextlib.nullcontext()

    def reference(self) -> ContextManager[None]:
        """Inside: the model the run started from (the step-0 "base" score; DPO's reference): ``reference``."""
        return reference(self.model)

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
        if settings.init_adapter:
            wrapped = SingLoRAModel.from_pretrained(model, settings.init_adapter, is_trainable=True)
            add_reference_adapter(wrapped, settings.init_adapter)
            return wrapped, sorted(wrapped.adapter_modules("default"))
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

    @staticmethod
    def saved_settings(directory: str | Path) -> dict[str, Any]:
        from ..adapter_file import read_adapter_config

        config, _ = read_adapter_config(directory)
        targets = config.target_modules
        return {"r": config.r, "alpha": config.alpha, "dropout": config.dropout, "init": config.init,
                "ramp_up_steps": config.ramp_up_steps, "targets": sorted(targets) if isinstance(targets, list)
                else targets}

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

        if settings.init_adapter:
            wrapped = load_peft_adapter(model, settings.init_adapter, what=f"--init-adapter {settings.init_adapter!r}",
                                        is_trainable=True)
            add_reference_adapter(wrapped, settings.init_adapter)
            names = wrapped.peft_config["default"].target_modules
            return wrapped, sorted(names) if not isinstance(names, str) else [names]
        names = resolve_target_names(model, settings.targets, heads)
        config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                            target_modules=names, use_dora=settings.method == "dora", modules_to_save=heads or None)
        with peft_without_deprecations():
            return get_peft_model(model, config), names

    @staticmethod
    def saved_settings(directory: str | Path) -> dict[str, Any]:
        from ..untrusted import read_json

        config = read_json(Path(directory) / "adapter_config.json", what="PEFT adapter config")
        if not isinstance(config, dict):
            return {}  # PEFT's loader then refuses the file
        targets = config.get("target_modules")
        return {"r": config.get("r"), "alpha": config.get("lora_alpha"), "dropout": config.get("lora_dropout"),
                "targets": sorted(targets) if isinstance(targets, list) else targets}

    def make_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        if self.settings.method != "loraplus":
            return super().make_optimizer(lr, weight_decay)
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(self.model, torch.optim.AdamW, lr=lr,
                                         loraplus_lr_ratio=self.settings.loraplus_lr_ratio, weight_decay=weight_decay)

    def disabled(self) -> ContextManager[None]:
        return self.model.disable_adapter()

    def save(self, directory: Path, model: nn.Module, tokenizer: Any, dtype: str = "float32") -> Path:
        model.save_pretrained(directory, selected_adapters=["default"])  # not the frozen reference copy
        return directory / self.weights_file

    @staticmethod
    def load(directory: str | Path, load_base: Callable[[str | None], nn.Module]) -> nn.Module:
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

    def reference(self) -> ContextManager[None]:
        """At step 0 the model is the base model; afterwards there is no copy of it (``Task.needs_reference``)."""
        return contextlib.nullcontext()

    @staticmethod
    def load(directory: str | Path, load_base: Callable[[str | None], nn.Module]) -> nn.Module:
        _require_safetensors(directory, "model.safetensors", "model.safetensors.index.json")  # never a pickle
        return load_base(str(directory))

    @staticmethod
    def merged(model: nn.Module) -> nn.Module:
        return model


# MethodSettings fields an adapter folder fixes (``Method.saved_settings``) -> their flags
INIT_ADAPTER_FIXES = {"r": "--r", "alpha": "--alpha", "targets": "--target-modules", "dropout": "--adapter-dropout",
                      "init": "--init", "ramp_up_steps": "--ramp-up-steps"}


def check_init_adapter(method: type["Method"], settings: MethodSettings, model: nn.Module, heads: list[str]) -> None:
    """``--init-adapter``: the adapter folder's own r, alpha, targets, dropout (SingLoRA: init, ramp) are used; a flag
    given a value other than its default must agree with the folder's (so a run's command line can be reused)."""
    saved, defaults = method.saved_settings(settings.init_adapter), MethodSettings()
    for name, flag in INIT_ADAPTER_FIXES.items():
        value = getattr(settings, name)
        if name not in saved or value == getattr(defaults, name):
            continue
        if name == "targets":
            value = sorted(resolve_target_names(model, value, heads))
        if value != saved[name]:
            raise SingLoRAError(f"--init-adapter {settings.init_adapter}: {flag} {value} differs from the adapter's "
                                f"{saved[name]}; leave it out (the adapter's own is used)")


def add_reference_adapter(model: nn.Module, directory: str | Path) -> None:
    """Load the adapter in ``directory`` into ``model`` (a ``SingLoRAModel`` or ``PeftModel`` whose active adapter is
    ``"default"``) a second time, frozen, as ``REFERENCE_ADAPTER``; ``"default"`` stays the active one."""
    inner = getattr(model, "module", model)
    if isinstance(inner, SingLoRAModel):
        inner.load_adapter(directory, REFERENCE_ADAPTER, is_trainable=False)
    else:
        inner.load_adapter(str(directory), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    inner.set_adapter("default")


@contextlib.contextmanager
def reference(model: nn.Module) -> Iterator[None]:
    """Inside: the model a run started from, as TRL's ``DPOTrainer`` takes it for a PEFT model: the adapter
    ``"ref"`` active when the model holds one (the frozen copy of ``--init-adapter``), else the adapters disabled
    (the base model). ``model``: a ``SingLoRAModel`` or a ``PeftModel``, possibly wrapped by ``accelerate`` (DDP).

    Re-entrant: a nested use (DPO's loss inside the step-0 evaluation, already under it) keeps the outer one. The
    active adapters come back on the way out (with their ``requires_grad`` flags, which switching adapters sets)."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if getattr(inner, "_in_reference", False):
        yield
        return
    with _reference_context(inner):
        inner._in_reference = True
        try:
            yield
        finally:
            inner._in_reference = False


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` (possibly under DDP) is a ``SingLoRAModel`` or a PEFT model (``reference`` applies)."""
    inner = getattr(model, "module", model)
    return isinstance(inner, SingLoRAModel) or (hasattr(inner, "peft_config") and hasattr(inner, "disable_adapter"))


def _reference_context(model: nn.Module) -> ContextManager[None]:
    if isinstance(model, SingLoRAModel):
        if REFERENCE_ADAPTER not in model.configs:
            return model.disable_adapters()
        active = list(model.active_adapters)
        return _switched(lambda: model.set_adapter(REFERENCE_ADAPTER), lambda: model.set_adapter(active))
    if has_adapters(model):  # PEFT
        if REFERENCE_ADAPTER not in model.peft_config:
            return model.disable_adapter()
        active = model.active_adapter
        return _switched(lambda: model.set_adapter(REFERENCE_ADAPTER, inference_mode=True),
                         lambda: model.set_adapter(active))
    raise SingLoRAError(f"{type(model).__name__} has no adapters: no reference model to compare with (train with "
                        "an adapter method, not --method full)")


@contextlib.contextmanager
def _switched(enter: Callable[[], Any], leave: Callable[[], Any]) -> Iterator[None]:
    enter()
    try:
        yield
    finally:
        leave()


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
