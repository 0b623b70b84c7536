"""Many adapters resident on one frozen base model, for inference: ``AdapterBank``.

    bank = AdapterBank(base_model, max_rank=16)     # wraps nothing yet; the base model is changed in place
    bank.load("alice", "adapters/alice")             # files checked as load_adapter checks them
    bank.load("bob", "adapters/bob")
    with bank.use(["alice", "bob", "__base__"]):     # one adapter per example
        out = base_model.generate(**batch)
    bank.swap("alice", "adapters/alice-v2")          # new weights in place: no model rebuilt, nothing recompiled
    bank.unload("bob")
    bank.memory()                                     # bytes per adapter, SingLoRA vs LoRA at equal rank

Each adapted layer holds its banked storage (``SingLoRALayer.create_bank``, ``banked.LayerBank``): the ``A`` of every
resident adapter that adapts it, as rows of one pool, each adapter at its own rank (S-LoRA's unified paging), with
one coefficient ``c = s * u(t)`` each. An adapter costs its ``A`` matrices (``n * r`` numbers per layer, half of a
LoRA's ``2 * n * r`` on square layers) plus a table row per layer and its ``modules_to_save`` copies; rows an
unloaded adapter leaves are reused by the next one, of any rank; no module is created per adapter. A forward of a
mixed batch gathers each example's rows (``functional.mixed_*``): one gather and two batched products per layer,
whatever the number of adapters and ranks; a batch whose examples all use one adapter (or none) runs that adapter's
two small products (or nothing), as a model holding only that adapter would.

The bank attaches one ``BankSelection`` to the layers it wraps, once; ``use(names)`` only selects the names on it.

``torch.compile``: give ``max_rank`` (and ``capacity``: pool rows for that many adapters of rank ``max_rank``, more
of lower ranks) up front, then loading, swapping and unloading adapters only write into preallocated buffers and
never change a shape, so a compiled model does not recompile (it always runs the gather path, at ``max_rank``).
Without them the buffers grow as needed (a shape change: one recompile).

Adapters are frozen (``u`` is the one saved with the adapter). Not thread-safe: change the bank between forward
calls, from the thread that runs them (``torch_singlora.serving`` does so).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Sequence

import torch
from torch import Tensor, nn

from .adapter_file import A_SUFFIX, read_adapter_config, read_adapter_for
from .config import SingLoRAConfig
from .copies import TrainableCopy
from .errors import SingLoRAError
from .functional import saved_coefficient
from .layers import SingLoRALayer, set_submodule
from .mixed import BASE, Pooled, Selection, Shared, check_adapter_names, check_mixed_call
from .names import check_adapter_name
from .tied import shared_weights


@dataclass
class Resident:
    """One adapter held by an ``AdapterBank``.

    Attributes:
        id: Its adapter id (index into every ``LayerBank.slots``). config: its ``SingLoRAConfig``.
        ramp_step: ``t`` it was saved at. modules: ``{module name: (d_out, d_in, r)}`` of the layers it adapts.
        saved: names of its ``modules_to_save`` modules. source: the folder it was loaded from.
    """

    id: int
    config: SingLoRAConfig
    ramp_step: int
    modules: dict[str, tuple[int, int, int]]
    saved: list[str]
    source: str

    @property
    def rank(self) -> int:
        """Its highest rank over the layers it adapts."""
        return max(r for _, _, r in self.modules.values())


@dataclass
class _Checked:
    """An adapter folder read and checked against the model, before anything changes."""

    config: SingLoRAConfig
    ramp_step: int
    modules: dict[str, tuple[int, int, int, float]]  # name -> (d_out, d_in, r, c)
    saved: list[str]
    tensors: dict[str, Tensor]


class BankSelection(Selection):
    """The selection an ``AdapterBank`` attaches to its layers: each example's adapter id, read from each layer's
    banked storage. One object per bank, reselected each call (``torch.compile`` sees the same object)."""

    def __init__(self, adapters: dict[str, "Resident"]) -> None:
        super().__init__()
        self.adapters = adapters
        self.ids = torch.zeros(0, dtype=torch.long)  # (B,): each example's adapter id (0: the base model)
        self.shared: int | None = None  # the id every example uses (0: none), or None when they differ
        self.width = 0  # the highest rank among the batch's adapters
        self.device = torch.device("cpu")  # the banks' (set by the AdapterBank when it wraps a layer)

    def select(self, names: Sequence[str]) -> None:
        super().select(names)
        ids = [0 if name == BASE else self.adapters[name].id for name in self.names]
        self.ids = torch.tensor(ids, device=self.device)
        self.shared = ids[0] if len(set(ids)) == 1 else None
        self.width = max((self.adapters[name].rank for name in self.unique if name != BASE), default=0)

    def for_layer(self, layer: SingLoRALayer) -> Shared | Pooled | None:
        bank = layer.bank
        if not torch.compiler.is_compiling():  # eager: exact sizes (a compiled graph keeps one shape)
            if self.shared is not None:
                return bank.shared(self.shared, layer.d_out, layer.d_in) if self.shared else None
            rows = bank.table[:, : self.width].index_select(0, self.ids)
        else:
            rows = bank.table.index_select(0, self.ids)
        return Pooled(bank.pool, rows, bank.coefficients.index_select(0, self.ids))


class AdapterBank:
    """Many SingLoRA adapters on one base model, selected per example (see the module docstring).

    Attributes:
        model: The base model, changed in place (adapted modules wrapped in ``SingLoRALayer``s with banked
            storage, ``modules_to_save`` in ``TrainableCopy``s).
        adapters: ``{name: Resident}``.
    """

    def __init__(self, model: nn.Module, *, max_rank: int | None = None, capacity: int = 4) -> None:
        """``max_rank``: the highest rank an adapter may have (None: any; the layers' tables widen as needed).
        ``capacity``: adapters of rank ``max_rank`` (of the first adapter's rank without it) each layer's pool has
        rows for at first; it grows when full."""
        if not isinstance(model, nn.Module):
            raise SingLoRAError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if any(isinstance(m, (SingLoRALayer, TrainableCopy)) for m in model.modules()):
            raise SingLoRAError("model already holds SingLoRA adapters; an AdapterBank needs the plain base model")
        for field_name, value in (("max_rank", max_rank), ("capacity", capacity)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SingLoRAError(f"{field_name}={value!r} must be an int >= 1")
        self.model = model
        self.max_rank = max_rank
        self.capacity = capacity
        self.adapters: dict[str, Resident] = {}
        self._ids = 1  # adapter ids in use are < self._ids; 0 is the base model
        self._free_ids: list[int] = []
        self._selection = BankSelection(self.adapters)  # attached to every module the bank wraps
        self._tied = set(shared_weights(model))  # weights several modules hold: never moved (fuse)
        self._wrapped_layers: list[SingLoRALayer] = []  # every layer the bank wrapped (never unwrapped)
        self._wrapped_copies: list[TrainableCopy] = []

    # ---- reading, before any change --------------------------------------------------------------------------

    def _check(self, directory: str | Path, name: str) -> _Checked:
        """Read ``directory`` (``adapter_config.json`` + ``adapter_model.safetensors``) and check it against the
        model (``plan.plan_adapter``: targets, ranks; ``<= max_rank``; keys, shapes, dtypes, finite values) and
        the adapter's ``name``. Changes nothing."""
        directory = Path(directory)
        config, meta = read_adapter_config(directory)
        plan, tensors = read_adapter_for(self.model, directory, config)  # exactly as loading reads it
        check_adapter_name(name, dots=not plan.saved_modules)  # saved-module copies live in a ModuleDict under it
        too_big = {name: m.r for name, m in plan.modules.items() if self.max_rank is not None and m.r > self.max_rank}
        if too_big:
            name, r = next(iter(too_big.items()))
            raise SingLoRAError(f"{directory}: r={r} for module {name!r} exceeds this bank's max_rank={self.max_rank}")
        modules = {name: (m.d_out, m.d_in, m.r, saved_coefficient(m.scale, meta["ramp_step"], plan.ramp_up_steps))
                   for name, m in plan.modules.items()}
        return _Checked(config, meta["ramp_step"], modules, list(plan.saved_modules), tensors)

    # ---- changing the bank ------------------------------------------------------------------------------------

    def _layer(self, name: str, rank: int) -> SingLoRALayer:
        """The wrapped layer ``name``, wrapping it (with empty banked storage sized for an adapter of ``rank``)
        on first use."""
        module = self.model.get_submodule(name)
        if isinstance(module, SingLoRALayer):
            return module
        layer = SingLoRALayer(module)
        width = self.max_rank or rank
        layer.create_bank(rows=self.capacity * width, width=width, ids=max(self._ids, self.capacity + 1),
                          fuse=id(module.weight) not in self._tied)
        layer.selection = self._selection
        self._selection.device = module.weight.device
        set_submodule(self.model, name, layer)
        self._wrapped_layers.append(layer)
        return layer

    def _saved(self, name: str) -> TrainableCopy:
        module = self.model.get_submodule(name)
        if isinstance(module, TrainableCopy):
            return module
        wrapper = TrainableCopy(module)
        wrapper.selection = self._selection
        set_submodule(self.model, name, wrapper)
        self._wrapped_copies.append(wrapper)
        return wrapper

    def _new_id(self) -> int:
        if self._free_ids:
            return self._free_ids.pop()
        self._ids += 1
        for layer in self._wrapped_layers:
            layer.bank.ensure_ids(self._ids)
        return self._ids - 1

    def _write(self, name: str, adapter_id: int, checked: _Checked, source: str) -> None:
        """Put ``checked`` into the layers and copies under ``name`` / ``adapter_id`` (in place where it was)."""
        old = self.adapters.get(name)
        for module_name, (d_out, d_in, r, c) in checked.modules.items():
            layer = self._layer(module_name, r)  # every layer's table has room for self._ids ids
            layer.set_banked(adapter_id, checked.tensors[f"{module_name}.{A_SUFFIX}"], c)
        for module_name in (old.modules if old else {}):
            if module_name not in checked.modules:
                self.model.get_submodule(module_name).reset_banked(adapter_id)
        for module_name in (old.saved if old else []):
            if module_name not in checked.saved:
                self.model.get_submodule(module_name).delete_adapter(name)
        for module_name in checked.saved:
            wrapper = self._saved(module_name)
            if name not in wrapper.copies:
                wrapper.add_adapter(name)
            replica = wrapper.copies[name]
            state = {key[len(module_name) + 1:]: value for key, value in checked.tensors.items()
                     if key.startswith(module_name + ".") and not key.endswith(A_SUFFIX)}
            replica.load_state_dict(state, strict=True)
            replica.requires_grad_(False)
        modules = {k: v[:3] for k, v in checked.modules.items()}
        self.adapters[name] = Resident(adapter_id, checked.config, checked.ramp_step, modules, checked.saved, source)

    def load(self, name: str, directory: str | Path) -> None:
        """Add adapter ``name`` from a singlora adapter folder; on any error nothing changes."""
        check_adapter_name(name, dots=True)
        if name in self.adapters:
            raise SingLoRAError(f"adapter {name!r} is already loaded; swap() replaces it, unload() removes it")
        checked = self._check(directory, name)
        self._write(name, self._new_id(), checked, str(directory))

    def swap(self, name: str, directory: str | Path) -> None:
        """Replace adapter ``name``'s weights with those of another folder, in place (same id, same rows where the
        rank is the same: no module is rebuilt; a compiled model does not recompile while the bank's sizes hold)."""
        if name not in self.adapters:
            raise SingLoRAError(f"adapter {name!r} is not loaded; loaded: {sorted(self.adapters)}")
        checked = self._check(directory, name)
        self._write(name, self.adapters[name].id, checked, str(directory))

    def unload(self, name: str) -> None:
        """Remove adapter ``name``: its rows are zeroed and freed (for the next adapter, of any rank), its
        saved-module copies dropped."""
        resident = self.adapters.pop(name, None)
        if resident is None:
            raise SingLoRAError(f"adapter {name!r} is not loaded; loaded: {sorted(self.adapters)}")
        for module_name in resident.modules:
            self.model.get_submodule(module_name).reset_banked(resident.id)
        for module_name in resident.saved:
            self.model.get_submodule(module_name).delete_adapter(name)
        self._free_ids.append(resident.id)

    # ---- using it ---------------------------------------------------------------------------------------------

    def use(self, adapter_names: Sequence[str]) -> ContextManager[None]:
        """A context inside which example ``b`` of every forward of ``model`` uses adapter ``adapter_names[b]``
        (``"__base__"``: none). The model must be in eval mode."""
        names = check_adapter_names(adapter_names, self.adapters)
        check_mixed_call(self._wrapped_layers + self._wrapped_copies, self.model)
        return self._selection.selecting(names)

    def memory(self) -> dict[str, Any]:
        """Bytes held, in total and per adapter: ``singlora`` (its ``A`` matrices, ``n * r`` numbers per layer),
        ``stored`` (what it occupies in the layers: its pool rows, table rows and coefficients), ``lora`` (a LoRA
        of the same rank on the same layers: ``(d_in + d_out) * r``), ``saved`` (its ``modules_to_save`` copies);
        ``allocated``: every layer's banked storage (free rows, the zero row and unused ids included)."""
        per_adapter = {}
        for name, resident in self.adapters.items():
            banks = {m: self.model.get_submodule(m).bank for m in resident.modules}
            size = {m: bank.pool.element_size() for m, bank in banks.items()}
            saved = sum(t.numel() * t.element_size() for m in resident.saved
                        for t in self.model.get_submodule(m).copies[name].state_dict().values())
            per_adapter[name] = {
                "singlora": sum(max(o, i) * r * size[m] for m, (o, i, r) in resident.modules.items()),
                "stored": sum(bank.held_bytes(resident.id) for bank in banks.values()),
                "lora": sum((o + i) * r * size[m] for m, (o, i, r) in resident.modules.items()),
                "saved": saved,
            }
        allocated = sum(layer.bank.allocated_bytes() for layer in self._wrapped_layers)
        return {"adapters": len(self.adapters), "allocated": allocated, "per_adapter": per_adapter}
