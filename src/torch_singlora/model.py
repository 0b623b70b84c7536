"""Model surgery: ``SingLoRAModel`` wraps any ``nn.Module`` (transformers models included), injects SingLoRA
layers into the targeted modules, and manages named adapters, the ramp (t, T and u of each adapter), merging and
unloading. Saving and loading adapters: ``adapter_io.py`` (the transaction), ``adapter_file.py`` (the format).
Long module: the surgery, the named adapters, the ramp and merging are one class's methods (issue 20 put the ramp
controls back in it); a split would split the class.

    model = get_singlora_model(base, SingLoRAConfig(r=8, target_modules="all-linear"))
    model.bind_optimizer(optimizer, total_steps=1000)  # t = ramp_step advances on each optimizer step
    ...train...
    model.save_adapter("out/")           # adapter_config.json + adapter_model.safetensors
    plain = model.merge_and_unload()     # the original module classes, adapters folded in
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, ContextManager, Iterator, Union

import torch
from torch import nn

from . import adapter_io
from .config import SingLoRAConfig
from .copies import TrainableCopy
from .errors import SingLoRAError
from .experts import SingLoRAExpertParameter, adapt_parameter, release_parameter
from .functional import ramp_value
from .layers import SingLoRAAdapter, SingLoRALayer, set_submodule
from .mixed import NamedSelection, check_adapter_names, check_mixed_call
from .names import as_names, check_adapter_name
from .plan import plan_adapter
from .tied import retie_config, untie_before_merge

AdapterNames = Union[str, list[str]]


class SingLoRAModel(nn.Module):
    """A model with SingLoRA adapters. Calls and unknown attributes go to the wrapped ``model``.

    Attributes:
        model: The wrapped model, modified in place (targeted modules replaced by ``SingLoRALayer``).
        configs: ``{adapter name: SingLoRAConfig}``.
        active_adapters: Names of the adapters that run in forward and train.
    """

    def __init__(self, model: nn.Module, config: SingLoRAConfig | None, adapter_name: str = "default") -> None:
        """Wrap ``model``; with a ``config``, add adapter ``adapter_name`` and make it active."""
        super().__init__()
        if not isinstance(model, nn.Module):
            raise SingLoRAError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.configs: dict[str, SingLoRAConfig] = {}
        self.active_adapters: list[str] = []
        self._untied_config = False  # config.tie_word_embeddings set False by a merge (torch_singlora.tied)
        self._selection = NamedSelection()  # held by every adapted module (attached in add_adapter)
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward; ``adapter_names``: one adapter per example (``use_adapter_names``)."""
        with self.use_adapter_names(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``; ``adapter_names`` as in ``forward`` (beams and sequences of one
        example use its adapter)."""
        with self.use_adapter_names(adapter_names):
            return self.model.generate(*args, **kwargs)

    def use_adapter_names(self, adapter_names: list[str] | None) -> ContextManager[None]:
        """A context where example ``b`` uses adapter ``adapter_names[b]`` (``mixed.py``; None: the active ones)."""
        if adapter_names is None:
            return contextlib.nullcontext()
        names = check_adapter_names(adapter_names, self.configs)
        check_mixed_call([m for _, m in self.singlora_layers()] + [m for _, m in self.trainable_copies()], self)
        return self._selection.selecting(names)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ---- the adapted modules --------------------------------------------------------------------------------

    def singlora_layers(self) -> Iterator[tuple[str, SingLoRALayer]]:
        """``(module name in the wrapped model, layer)`` for every adapted module."""
        for name, module in self.model.named_modules():
            if isinstance(module, SingLoRALayer):
                yield name, module

    def trainable_copies(self) -> Iterator[tuple[str, TrainableCopy]]:
        """``(module name, wrapper)`` for every ``modules_to_save`` module."""
        for name, module in self.model.named_modules():
            if isinstance(module, TrainableCopy):
                yield name, module

    def adapter_modules(self, adapter_name: str) -> dict[str, nn.Module]:
        """``{module name: module}`` holding adapter ``adapter_name``: its ``SingLoRAAdapter``s and saved copies."""
        self.require_adapters([adapter_name])
        found: dict[str, nn.Module] = {}
        for name, layer in self.singlora_layers():
            if adapter_name in layer.singlora:
                found[name] = layer.singlora[adapter_name]
        for name, wrapper in self.trainable_copies():
            if adapter_name in wrapper.copies:
                found[name] = wrapper.copies[adapter_name]
        return found

    # ---- named adapters ---------------------------------------------------------------------------------------

    def require_adapters(self, names: list[str]) -> None:
        """``SingLoRAError`` unless every one of ``names`` is an adapter of this model."""
        for name in names:
            if not isinstance(name, str) or name not in self.configs:
                raise SingLoRAError(f"adapter {name!r} does not exist; adapters are {sorted(self.configs)}")

    def default_adapter(self) -> str:
        """The first active adapter, else the first added one; ``SingLoRAError`` if there is none."""
        names = self.active_adapters or list(self.configs)
        if not names:
            raise SingLoRAError("this model has no adapter; add_adapter() or load_adapter() first")
        return names[0]

    def add_adapter(self, adapter_name: str, config: SingLoRAConfig, *, modules: list[str] | None = None) -> None:
        """Inject a new adapter (not yet active: see ``set_adapter``). Validates everything before any change.

        ``modules``: adapt exactly these module names (``plan_adapter``; loading a file: its keys name them).
        """
        if not isinstance(config, SingLoRAConfig):
            raise SingLoRAError(f"config must be a SingLoRAConfig, got {type(config).__name__}")
        check_adapter_name(adapter_name)
        if adapter_name in self.configs:
            raise SingLoRAError(f"adapter {adapter_name!r} already exists; delete_adapter() it first")
        plan = plan_adapter(self.model, config, modules)
        # Validated: from here on nothing raises on user input.
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        for name, module_plan in plan.modules.items():
            if module_plan.kind == "experts":  # a 3-D expert parameter (experts.py)
                module = adapt_parameter(self.model, name)
            else:
                module = self.model.get_submodule(name)
            layer = module if isinstance(module, SingLoRALayer) else SingLoRALayer(module)
            layer.add_adapter(
                adapter_name, module_plan.r, scale=module_plan.scale, ramp_up_steps=plan.ramp_up_steps,
                dropout=config.dropout, init=config.init, init_std=config.init_std,
            )
            if layer is not module:
                set_submodule(self.model, name, layer)
        for name in plan.saved_modules:
            module = self.model.get_submodule(name)
            wrapper = module if isinstance(module, TrainableCopy) else TrainableCopy(module)
            wrapper.add_adapter(adapter_name)
            if wrapper is not module:
                set_submodule(self.model, name, wrapper)
        self.configs[adapter_name] = config
        self.set_adapter(self.active_adapters)

    def set_adapter(self, adapter_names: AdapterNames) -> None:
        """Make ``adapter_names`` the active (running, trainable) adapters; all other adapters are frozen."""
        names = as_names(adapter_names, "adapter_names")
        self.require_adapters(names)
        self.active_adapters = names
        for _, layer in self.singlora_layers():
            layer.active_adapters = [n for n in names if n in layer.singlora]
            layer.selection = self._selection  # attached to every layer the model made (add_adapter calls us)
            for adapter_name, adapter in layer.singlora.items():
                adapter.A.requires_grad_(adapter_name in names)
        for _, wrapper in self.trainable_copies():
            wrapper.active_adapters = [n for n in names if n in wrapper.copies]
            wrapper.selection = self._selection
            for adapter_name, replica in wrapper.copies.items():
                replica.requires_grad_(adapter_name in names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; modules left without adapters get their original module back."""
        self.require_adapters([adapter_name])
        for name, layer in list(self.singlora_layers()):
            if adapter_name in layer.singlora:
                layer.delete_adapter(adapter_name)
                if not len(layer.singlora):
                    self._put_back(name, layer)
        for name, wrapper in list(self.trainable_copies()):
            if adapter_name in wrapper.copies:
                wrapper.delete_adapter(adapter_name)
                if not len(wrapper.copies):
                    set_submodule(self.model, name, wrapper.original_module)
        del self.configs[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]
        self.set_adapter(self.active_adapters)
        self._retie_config()

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the base model alone inside the block (merged adapters are unmerged, then merged back)."""
        merged = {name: list(layer.merged_adapters) for name, layer in self.singlora_layers()}
        modules = [m for _, m in self.singlora_layers()] + [m for _, m in self.trainable_copies()]
        self.unmerge()
        try:
            for module in modules:
                module.disabled = True
            yield
        finally:
            for module in modules:
                module.disabled = False
            self._merge_layers([(name, layer, merged.get(name, [])) for name, layer in self.singlora_layers()])

    # ---- the ramp: u = min(t / T, 1), t = ramp_step (optimizer steps taken), T = ramp_up_steps ------------------

    def _adapters(self, adapter_names: list[str]) -> list[SingLoRAAdapter]:
        return [layer.singlora[n] for _, layer in self.singlora_layers() for n in adapter_names if n in layer.singlora]

    def _one_adapter(self, adapter_name: str | None) -> SingLoRAAdapter:
        """The first ``SingLoRAAdapter`` of ``adapter_name`` (default: ``default_adapter()``): all share its ramp."""
        name = self.default_adapter() if adapter_name is None else adapter_name
        self.require_adapters([name])
        return self._adapters([name])[0]

    def advance_ramp(self, n: int = 1) -> None:
        """Advance ``t`` (``ramp_step``) of the active adapters by ``n`` optimizer steps (no host sync).

        ``bind_optimizer`` calls it after every ``optimizer.step()``; call it yourself only without one.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise SingLoRAError(f"n={n!r} must be an int >= 0")
        if n:
            self._require_known_ramp(self.active_adapters)
        buffers = [adapter.ramp_step for adapter in self._adapters(self.active_adapters)]
        if buffers:
            torch._foreach_add_(buffers, n)

    def _require_known_ramp(self, adapter_names: list[str]) -> None:
        """``SingLoRAError`` if an adapter's ``T`` is still a fraction of an unknown total (``t`` cannot move then)."""
        for name in adapter_names:
            if self.get_ramp_up_steps(name) is None:
                raise SingLoRAError(f"adapter {name!r}: ramp_up_steps={self.configs[name].ramp_up_steps} is a fraction "
                                    "of the run's total optimizer steps, which are not known: pass bind_optimizer("
                                    "optimizer, total_steps=N), call set_total_steps(N), or set SingLoRAConfig("
                                    "total_steps=N) or an int ramp_up_steps")

    def set_total_steps(self, total_steps: int, adapter_name: str | None = None) -> None:
        """Record the run's length in optimizer steps for an adapter (default: every active one): its config's
        ``total_steps``, which resolves a fractional ``ramp_up_steps`` into ``T`` (saved with the adapter)."""
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or not 1 <= total_steps < 2**63:
            raise SingLoRAError(f"total_steps={total_steps!r} must be an int >= 1")
        names = self.active_adapters if adapter_name is None else [adapter_name]
        self.require_adapters(names)
        for name in names:
            self.configs[name] = dataclasses.replace(self.configs[name], total_steps=total_steps)
            for adapter in self._adapters([name]):
                adapter.ramp_up_steps = self.configs[name].resolve_ramp_up_steps()

    def get_ramp_step(self, adapter_name: str | None = None) -> int:
        """``t``: optimizer steps taken by an adapter (default: ``default_adapter()``)."""
        return int(self._one_adapter(adapter_name).ramp_step)

    def set_ramp_step(self, ramp_step: int, adapter_name: str | None = None) -> None:
        """Set ``t`` of an adapter (default: every active one), e.g. when resuming."""
        if not isinstance(ramp_step, int) or isinstance(ramp_step, bool) or not 0 <= ramp_step < 2**63:
            raise SingLoRAError(f"ramp_step={ramp_step!r} must be an int >= 0")
        names = self.active_adapters if adapter_name is None else [adapter_name]
        self.require_adapters(names)
        if ramp_step:
            self._require_known_ramp(names)
        for adapter in self._adapters(names):
            adapter.ramp_step.fill_(ramp_step)

    def get_ramp_up_steps(self, adapter_name: str | None = None) -> int | None:
        """``T``: the ramp length of an adapter in optimizer steps (default: ``default_adapter()``; 0 = no ramp;
        ``None`` while it is a fraction of a run whose ``total_steps`` is unknown)."""
        return self._one_adapter(adapter_name).ramp_up_steps

    def get_ramp_value(self, adapter_name: str | None = None) -> float:
        """``u = min(t / T, 1)`` of an adapter (default: ``default_adapter()``), computed in float64."""
        adapter = self._one_adapter(adapter_name)
        return float(ramp_value(adapter.ramp_step, adapter.ramp_up_steps, torch.float64))

    def set_training_run(self, active: bool = True) -> None:
        """Start (or end) a run of the active adapters: training-mode forwards compute step t + 1 (``in_run``)."""
        for adapter in self._adapters(self.active_adapters):
            adapter.in_run = active

    def bind_optimizer(self, optimizer: torch.optim.Optimizer, total_steps: int | None = None) -> Any:
        """Advance the ramp after every ``optimizer.step()``, in a run (``set_training_run``); returns the hook handle.

        ``total_steps``: the run's length in optimizer steps (``set_total_steps``), needed when an active adapter's
        ``ramp_up_steps`` is a fraction (the default) and its config has no ``total_steps``; checked here, before
        the first step. Under gradient accumulation only real optimizer steps count; a step skipped by a
        ``GradScaler`` (inf/NaN gradients) never calls ``optimizer.step`` and does not count.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise SingLoRAError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if total_steps is not None:
            self.set_total_steps(total_steps)
        self._require_known_ramp(self.active_adapters)
        # accelerate's AcceleratedOptimizer wraps the torch optimizer (and calls it only on real steps)
        inner = getattr(optimizer, "optimizer", optimizer)
        self.set_training_run()
        return inner.register_step_post_hook(lambda *_: self.advance_ramp())

    # ---- parameters ---------------------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self, print_fn: Callable[[str], Any] = print) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print_fn(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # ---- merging and unloading ----------------------------------------------------------------------------------

    def merge(self, adapter_names: AdapterNames | None = None, safe: bool = False) -> None:
        """Fold adapters (default: active) into the base weights in float32. Idempotent.

        ``safe=True``: a non-finite result anywhere raises ``SingLoRAError`` and nothing stays merged by this call.
        """
        names = self.active_adapters if adapter_names is None else as_names(adapter_names, "adapter_names")
        self.require_adapters(names)
        layers = list(self.singlora_layers())
        if safe:  # check every layer before changing any
            for module_name, layer in layers:
                try:
                    layer.check_merge([n for n in names if n in layer.singlora])
                except SingLoRAError as exc:
                    raise SingLoRAError(f"module {module_name!r}: {exc}") from None
        self._merge_layers([(name, layer, [n for n in names if n in layer.singlora]) for name, layer in layers])

    def _merge_layers(self, todo: list[tuple[str, SingLoRALayer, list[str]]]) -> None:
        """Merge each ``(module name, layer, adapter names)``; tied weights get a copy first (``tied``)."""
        changing = [(name, layer) for name, layer, names in todo if layer._to_merge(names)]
        self._untied_config |= untie_before_merge(self.model, changing)
        for _, layer, names in todo:
            layer.merge(names)

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weights (tied weights are tied again). Idempotent."""
        for _, layer in self.singlora_layers():
            layer.unmerge()
        self._retie_config()

    def _retie_config(self) -> None:
        if self._untied_config:
            self._untied_config = retie_config(self.model, [layer for _, layer in self.singlora_layers()])

    def unload(self) -> nn.Module:
        """Remove every adapter without merging (merged ones are unmerged first) and return the original model: the
        original module objects, ``modules_to_save`` included (their trained copies are dropped; PEFT 0.21's
        ``unload()`` keeps the trained copies instead). To keep what was trained, ``merge_and_unload()``."""
        self.unmerge()
        return self._restore_originals(trained_copies=False)

    def merge_and_unload(self, safe: bool = False) -> nn.Module:
        """Merge the active adapters and return the wrapped model with its original module classes; each
        ``modules_to_save`` module is the active adapter's trained copy."""
        self.merge(safe=safe)
        return self._restore_originals(trained_copies=True)

    def _put_back(self, name: str, layer: SingLoRALayer) -> None:
        """Put the original module back in place of an adapter-less layer (an expert parameter's layer is removed
        from its ``SingLoRAExperts``, which gives way to the original experts module once empty)."""
        if isinstance(layer, SingLoRAExpertParameter):
            release_parameter(self.model, name)
        else:
            set_submodule(self.model, name, layer.base_layer)

    def _restore_originals(self, trained_copies: bool) -> nn.Module:
        for name, layer in list(self.singlora_layers()):
            self._put_back(name, layer)
        for name, wrapper in list(self.trainable_copies()):
            set_submodule(self.model, name, wrapper.active_module() if trained_copies else wrapper.original_module)
        self.configs.clear()
        self.active_adapters = []
        return self.model

    # ---- files: the transaction in adapter_io.py, the format in adapter_file.py ----------------------------------

    adapter_state_dict = adapter_io.adapter_state_dict
    save_adapter = adapter_io.save_adapter
    save_pretrained = adapter_io.save_adapter
    load_adapter = adapter_io.load_adapter
    load_adapter_in_place = adapter_io.load_adapter_in_place

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False) -> "SingLoRAModel":
        """Wrap ``model`` with an adapter loaded from ``directory`` (frozen unless ``is_trainable``)."""
        wrapped = cls(model, None)
        wrapped.load_adapter(directory, adapter_name, is_trainable=is_trainable)
        return wrapped


def get_singlora_model(model: nn.Module, config: SingLoRAConfig, adapter_name: str = "default") -> SingLoRAModel:
    """Inject SingLoRA adapters into ``model`` (in place) and return the wrapper, with the adapter active."""
    if not isinstance(config, SingLoRAConfig):  # SingLoRAModel(model, None) wraps without an adapter; this never does
        raise SingLoRAError(f"config must be a SingLoRAConfig, got {type(config).__name__}")
    return SingLoRAModel(model, config, adapter_name)
