"""The ramp controls of a ``SingLoRAModel``: ``u = min(t / T, 1)`` with t = ``ramp_step`` (optimizer steps taken)
and T = ``ramp_up_steps`` (the ramp length), per named adapter.

    model.bind_optimizer(optimizer, total_steps=1000)   # t advances after every optimizer.step(); T = 1% of 1000
    model.get_ramp_step(), model.get_ramp_up_steps(), model.get_ramp_value()   # t, T, u
    model.set_ramp_step(t)                              # resuming

Which step ``u`` belongs to: optimizer step k (1, 2, ...) runs at ``u = min(k / T, 1)``. During a run (``bind_optimizer``,
the Trainer integration, or ``set_training_run(True)`` for a hand-written loop calling ``advance_ramp()``), a
training-mode forward computes step ``t + 1`` and uses its ``u``: the first step runs at ``1 / T``. With ``u = 0``
there, ``A``'s gradient ``s * u * (...)`` is exactly zero and the step would be lost (the paper's ``u(0) = 0`` is
the untrained model's, which at rest is the base model). At rest (eval mode, merging, export, saved files) ``u`` is
that of the last step taken, ``min(t / T, 1)``: a trained adapter keeps the ``u`` its last step trained with.

``RampControls`` is a base class of ``SingLoRAModel`` (this module keeps ``model.py`` to the surgery); it uses the
model's ``configs``, ``active_adapters``, ``singlora_layers()``, ``default_adapter()`` and ``_check_names()``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .errors import SingLoRAError, warn_deprecated
from .functional import ramp_value
from .layers import SingLoRAAdapter

if TYPE_CHECKING:
    from .config import SingLoRAConfig
    from .layers import SingLoRALayer


class RampControls:
    """t, T and u of a model's adapters (all layers of one adapter share them)."""

    configs: dict[str, SingLoRAConfig]
    active_adapters: list[str]
    if TYPE_CHECKING:  # provided by SingLoRAModel
        def singlora_layers(self) -> Iterator[tuple[str, SingLoRALayer]]: ...
        def default_adapter(self) -> str: ...
        def _check_names(self, names: list[str]) -> None: ...

    def _adapters(self, adapter_names: list[str]) -> list[SingLoRAAdapter]:
        return [layer.singlora[n] for _, layer in self.singlora_layers() for n in adapter_names if n in layer.singlora]

    def _one_adapter(self, adapter_name: str | None) -> SingLoRAAdapter:
        """The first layer's ``SingLoRAAdapter`` of ``adapter_name`` (default: ``default_adapter()``); all layers of
        an adapter share its ramp, and every adapter adapts at least one module."""
        name = self.default_adapter() if adapter_name is None else adapter_name
        self._check_names([name])
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
                raise SingLoRAError(
                    f"adapter {name!r}: ramp_up_steps={self.configs[name].ramp_up_steps} is a fraction of the run's "
                    "total optimizer steps, which are not known: pass bind_optimizer(optimizer, total_steps=N), call "
                    "set_total_steps(N), or set SingLoRAConfig(total_steps=N) or an int ramp_up_steps"
                )

    def set_total_steps(self, total_steps: int, adapter_name: str | None = None) -> None:
        """Record the run's length in optimizer steps for an adapter (default: every active one): its config's
        ``total_steps``, which resolves a fractional ``ramp_up_steps`` into ``T`` (saved with the adapter)."""
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or not 1 <= total_steps < 2**63:
            raise SingLoRAError(f"total_steps={total_steps!r} must be an int >= 1")
        names = self.active_adapters if adapter_name is None else [adapter_name]
        self._check_names(names)
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
        self._check_names(names)
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

    def step(self, n: int = 1) -> None:
        """Deprecated name of ``advance_ramp``."""
        warn_deprecated("SingLoRAModel.step()", "advance_ramp()")
        self.advance_ramp(n)

    def get_step(self, adapter_name: str | None = None) -> int:
        """Deprecated name of ``get_ramp_step``."""
        warn_deprecated("SingLoRAModel.get_step()", "get_ramp_step()")
        return self.get_ramp_step(adapter_name)

    def set_step(self, step: int, adapter_name: str | None = None) -> None:
        """Deprecated name of ``set_ramp_step``."""
        warn_deprecated("SingLoRAModel.set_step()", "set_ramp_step()")
        self.set_ramp_step(step, adapter_name)

    def set_training_run(self, active: bool = True, adapter_name: str | None = None) -> None:
        """Start (``active``) or end a training run of an adapter (default: every active one): during a run, a
        training-mode forward computes the step being taken, ``t + 1``, and uses its ``u`` (module docstring).
        ``bind_optimizer`` starts one; a loop that calls ``advance_ramp()`` itself calls this once first."""
        names = self.active_adapters if adapter_name is None else [adapter_name]
        self._check_names(names)
        for adapter in self._adapters(names):
            adapter.in_run = bool(active)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer, total_steps: int | None = None) -> Any:
        """Advance the ramp after every ``optimizer.step()`` and start a training run (``set_training_run``);
        returns a handle whose ``.remove()`` undoes both.

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
        names = list(self.active_adapters)
        self.set_training_run(True)
        return _Binding(inner.register_step_post_hook(lambda *_: self.advance_ramp()),
                        lambda: [self.set_training_run(False, n) for n in names if n in self.configs])


class _Binding:
    """What ``bind_optimizer`` returns: ``remove()`` unhooks the optimizer and ends the training run."""

    def __init__(self, hook: Any, end_run: Any) -> None:
        self.hook, self.end_run = hook, end_run

    def remove(self) -> None:
        self.hook.remove()
        self.end_run()
