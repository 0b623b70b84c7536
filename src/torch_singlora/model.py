"""Model surgery: ``SingLoRAModel`` wraps any ``nn.Module`` (transformers models included), injects SingLoRA
layers into the targeted modules, and manages named adapters, the ramp step, merging and unloading.

    model = get_singlora_model(base, SingLoRAConfig(r=8, target_modules="all-linear"))
    model.bind_optimizer(optimizer, total_steps=1000)  # t = ramp_step advances on each optimizer step
    ...train...
    model.save_adapter("out/")           # adapter_config.json + adapter_model.safetensors
    plain = model.merge_and_unload()     # the original module classes, adapters folded in
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Union

import torch
from torch import nn

from .adapter_file import A_SUFFIX, WEIGHTS_FILE, as_directory, read_adapter_config, read_adapter_for
from .adapter_file import read_adapter_tensors, write_adapter
from .config import SingLoRAConfig
from .errors import SingLoRAError
from .experts import SingLoRAExpertParameter, adapt_parameter, release_parameter
from .copies import TrainableCopy
from .layers import SingLoRAAdapter, SingLoRALayer, set_submodule
from .mixed import NamedSelection, check_adapter_names, check_mixed_call
from .plan import plan_adapter
from .ramp import RampControls
from .tied import retie_config, untie_before_merge
from .untrusted import check_finite

AdapterNames = Union[str, list[str]]


def _as_names(value: Any, field: str) -> list[str]:
    """``str | list[str]`` -> list of names; ``SingLoRAError`` naming ``field`` and the value otherwise."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise SingLoRAError(f"{field}={value!r} must be an adapter name or a list of adapter names")


class SingLoRAModel(RampControls, nn.Module):
    """A model with SingLoRA adapters. Calls and unknown attributes go to the wrapped ``model``.

    Attributes:
        model: The wrapped model, modified in place (targeted modules replaced by ``SingLoRALayer``).
        configs: ``{adapter name: SingLoRAConfig}``.
        active_adapters: Names of the adapters that run in forward and train.
    """

    def __init__(
        self, model: nn.Module, config: SingLoRAConfig | None, adapter_name: str = "default"
    ) -> None:
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
        self._check_names([adapter_name])
        found: dict[str, nn.Module] = {}
        for name, layer in self.singlora_layers():
            if adapter_name in layer.singlora:
                found[name] = layer.singlora[adapter_name]
        for name, wrapper in self.trainable_copies():
            if adapter_name in wrapper.copies:
                found[name] = wrapper.copies[adapter_name]
        return found

    # ---- named adapters ---------------------------------------------------------------------------------------

    def _check_names(self, names: list[str]) -> None:
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
        _check_adapter_name(adapter_name)
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
        names = _as_names(adapter_names, "adapter_names")
        self._check_names(names)
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
        self._check_names([adapter_name])
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
        names = self.active_adapters if adapter_names is None else _as_names(adapter_names, "adapter_names")
        self._check_names(names)
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

    # ---- files (the format: adapter_file.py; the transaction: here) ---------------------------------------------

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tensors of one adapter under the documented file keys (the live parameters, not copies)."""
        tensors: dict[str, torch.Tensor] = {}
        for module_name, module in self.adapter_modules(adapter_name).items():
            if isinstance(module, SingLoRAAdapter):
                tensors[f"{module_name}.{A_SUFFIX}"] = module.A
            else:
                tensors.update({f"{module_name}.{key}": value for key, value in module.state_dict().items()})
        return tensors

    def save_adapter(self, directory: str | os.PathLike, adapter_name: str | None = None,
                     dtype: str | torch.dtype | None = None) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` of one adapter (default: ``default_adapter()``).

        ``dtype``: ``"float32"``, ``"bfloat16"`` or ``"float16"`` to store the tensors in (smaller files; loading
        casts back); ``None`` keeps the training dtype. Values beyond the dtype's range are refused.
        """
        name = self.default_adapter() if adapter_name is None else adapter_name
        _check_adapter_name(name)
        as_directory(directory)
        self._check_names([name])
        base_name = getattr(getattr(self.model, "config", None), "name_or_path", None) or None
        write_adapter(directory, self.adapter_state_dict(name), self.configs[name], self.get_ramp_step(name), base_name,
                      dtype)

    save_pretrained = save_adapter

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = True) -> None:
        """Add adapter ``adapter_name`` from files written by ``save_adapter`` and make it active.

        Everything is validated first (config, keys, shapes, dtypes, values against this model); on any error the
        model is left exactly as it was (modules, tensors, ``requires_grad`` flags).
        """
        if not isinstance(is_trainable, bool):
            raise SingLoRAError(f"is_trainable={is_trainable!r} must be a bool")
        _check_adapter_name(adapter_name)
        directory = as_directory(directory)
        config, meta = read_adapter_config(directory)
        if adapter_name in self.configs:
            raise SingLoRAError(f"adapter {adapter_name!r} already exists; delete_adapter() it first")
        plan, tensors = read_adapter_for(self.model, directory, config)
        flags = [(p, p.requires_grad) for p in self.parameters()]
        try:
            self.add_adapter(adapter_name, config, modules=list(plan.modules))
            self._copy_in(adapter_name, tensors, meta["ramp_step"], directory / WEIGHTS_FILE)
        except BaseException:  # roll back: the model is as it was
            if adapter_name in self.configs:
                self.delete_adapter(adapter_name)
            for parameter, flag in flags:
                parameter.requires_grad_(flag)
            raise
        self.set_adapter(adapter_name)
        if not is_trainable:
            for module in self.adapter_modules(adapter_name).values():
                module.requires_grad_(False)

    def load_adapter_in_place(self, directory: str | os.PathLike, adapter_name: str) -> None:
        """Copy a saved adapter's tensors and ramp step into the existing adapter ``adapter_name`` (same parameter
        objects, so an optimizer holding them stays valid: resuming). The files must fit that adapter exactly (keys,
        shapes, dtypes, as its own config gives them); everything is checked before anything is copied."""
        _check_adapter_name(adapter_name)
        directory = as_directory(directory)
        self._check_names([adapter_name])
        saved_config, meta = read_adapter_config(directory)
        own = {key: (tuple(value.shape), value.dtype) for key, value in self.adapter_state_dict(adapter_name).items()}
        tensors = read_adapter_tensors(directory / WEIGHTS_FILE, own)
        if self.get_ramp_up_steps(adapter_name) is None and saved_config.total_steps is not None:
            self.set_total_steps(saved_config.total_steps, adapter_name)  # the run's length, known when it was saved
        self._copy_in(adapter_name, tensors, meta["ramp_step"], directory / WEIGHTS_FILE)

    def _copy_in(self, adapter_name: str, tensors: dict[str, torch.Tensor], ramp_step: int, path: Path) -> None:
        """Copy checked ``tensors`` into the adapter's parameters (same objects), cast to their dtypes, and set its
        ramp step. Values that do not fit a parameter's dtype are refused before anything is copied."""
        targets = self.adapter_state_dict(adapter_name)
        check_finite(path, tensors, {key: target.dtype for key, target in targets.items()})
        with torch.no_grad():
            for key, target in targets.items():
                target.copy_(tensors[key].to(target.dtype))
        self.set_ramp_step(ramp_step, adapter_name)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
    ) -> "SingLoRAModel":
        """Wrap ``model`` with an adapter loaded from ``directory`` (frozen unless ``is_trainable``)."""
        wrapped = cls(model, None)
        wrapped.load_adapter(directory, adapter_name, is_trainable=is_trainable)
        return wrapped


def _check_adapter_name(adapter_name: Any) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise SingLoRAError(f"adapter_name={adapter_name!r} must be a non-empty string without '.'")


def get_singlora_model(model: nn.Module, config: SingLoRAConfig, adapter_name: str = "default") -> SingLoRAModel:
    """Inject SingLoRA adapters into ``model`` (in place) and return the wrapper, with the adapter active."""
    if not isinstance(config, SingLoRAConfig):  # SingLoRAModel(model, None) wraps without an adapter; this never does
        raise SingLoRAError(f"config must be a SingLoRAConfig, got {type(config).__name__}")
    return SingLoRAModel(model, config, adapter_name)
