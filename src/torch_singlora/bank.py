"""Many adapters resident on one frozen base model, for inference: ``AdapterBank``.

    bank = AdapterBank(base_model, max_rank=16)     # wraps nothing yet; the base model is changed in place
    bank.load("alice", "adapters/alice")             # files checked as load_adapter checks them
    bank.load("bob", "adapters/bob")
    with bank.use(["alice", "bob", "__base__"]):     # one adapter per example
        out = base_model.generate(**batch)
    bank.swap("alice", "adapters/alice-v2")          # new weights in place: no model rebuilt, nothing recompiled
    bank.unload("bob")
    bank.memory()                                     # bytes per adapter, SingLoRA vs LoRA at equal rank

Each adapted layer holds one ``LayerBank``: the ``A`` of every resident adapter that adapts it, stacked transposed
and zero-padded to the bank's rank ``R``, in a ``(K, R, n)`` buffer (slot 0 stays zero: the base model), with one
coefficient ``c = s * u(t)`` per slot. An adapter costs exactly its ``A`` matrices (``n * R`` numbers per layer,
half of a LoRA's ``2 * n * r`` on square layers) plus its ``modules_to_save`` copies; nothing else is copied,
and no module is created per adapter. A forward reads ``bank[index]`` (``functional.mixed_*``): the batch's
adapters cost one gather and two batched products per layer, whatever their number.

``torch.compile``: give ``max_rank`` (and ``capacity`` for the most adapters you will hold) up front, then
loading, swapping and unloading adapters only write into preallocated buffers and never change a shape, so a
compiled model does not recompile. Without them the buffers grow as needed (a shape change: one recompile).

Adapters are frozen (``u`` is the one saved with the adapter). Not thread-safe: change the bank between forward
calls, from the thread that runs them (``torch_singlora.serving`` does so).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from .adapter_file import A_SUFFIX, read_adapter_config, read_adapter_for
from .config import SingLoRAConfig
from .errors import SingLoRAError
from .functional import ramp_value
from .layers import SingLoRALayer, TrainableCopy, adapter_dtype, set_submodule
from .mixed import Selection, check_adapter_names
from .names import BASE, check_adapter_name


class LayerBank(nn.Module):
    """The resident adapters of one layer (non-persistent buffers: never in a state dict, moved by ``.to()``).

    Buffers:
        A: ``(K, R, n)``: slot ``k`` holds an adapter's ``A.T`` zero-padded to ``R`` rows; slot 0 is all zeros.
        coefficients: ``(K,)``: ``c = s * u`` of each slot (0 for free slots).
        slots: ``(G,)`` int64: the slot of each adapter id of the ``AdapterBank`` (0: it does not adapt this layer).
    """

    def __init__(self, n: int, rank: int, capacity: int, ids: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("A", torch.zeros(capacity + 1, rank, n, dtype=dtype, device=device), persistent=False)
        self.register_buffer("coefficients", torch.zeros(capacity + 1, dtype=dtype, device=device), persistent=False)
        self.register_buffer("slots", torch.zeros(max(ids, capacity + 1), dtype=torch.long, device=device),
                             persistent=False)
        self.free = list(range(capacity, 0, -1))  # free slots, popped from the end (lowest first)

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def _grow(self, rank: int, capacity: int) -> None:
        """Reallocate to ``rank`` rows and ``capacity`` slots (plus slot 0), keeping every resident adapter."""
        old = self.A
        self.A = old.new_zeros(capacity + 1, rank, old.shape[2])
        self.A[: old.shape[0], : old.shape[1]] = old
        coefficients = self.coefficients
        self.coefficients = coefficients.new_zeros(capacity + 1)
        self.coefficients[: coefficients.shape[0]] = coefficients
        self.free = list(range(capacity, old.shape[0] - 1, -1)) + self.free

    def ensure_ids(self, ids: int) -> None:
        """Room in ``slots`` for adapter ids ``< ids`` (grown geometrically: loading K adapters copies O(K))."""
        if ids > self.slots.shape[0]:
            slots = self.slots.new_zeros(max(ids, 2 * self.slots.shape[0]))
            slots[: self.slots.shape[0]] = self.slots
            self.slots = slots

    def put(self, adapter_id: int, A: Tensor, coefficient: float) -> None:
        """Store ``A`` (``(n, r)``) for adapter ``adapter_id``: into its own slot if it has one (in place), else a
        free slot; grows the buffers when the rank or the slots run out."""
        if A.shape[1] > self.rank:
            self._grow(A.shape[1], self.A.shape[0] - 1)
        slot = int(self.slots[adapter_id])
        if slot == 0:
            if not self.free:
                self._grow(self.rank, 2 * (self.A.shape[0] - 1))
            slot = self.free.pop()
        with torch.no_grad():
            self.A[slot].zero_()
            self.A[slot, : A.shape[1]].copy_(A.T)
            self.coefficients[slot] = coefficient
        self.slots[adapter_id] = slot

    def remove(self, adapter_id: int) -> None:
        """Free adapter ``adapter_id``'s slot (zeroed); no-op if it has none."""
        slot = int(self.slots[adapter_id])
        if slot:
            self.A[slot].zero_()
            self.coefficients[slot] = 0
            self.slots[adapter_id] = 0
            self.free.append(slot)
            self.free.sort(reverse=True)

    def extra_repr(self) -> str:
        return f"slots={self.A.shape[0] - 1}, rank={self.rank}, n={self.A.shape[2]}, free={len(self.free)}"


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


@dataclass
class _Checked:
    """An adapter folder read and checked against the model, before anything changes."""

    config: SingLoRAConfig
    ramp_step: int
    modules: dict[str, tuple[int, int, int, float]]  # name -> (d_out, d_in, r, c)
    saved: list[str]
    tensors: dict[str, Tensor]


class BankSelection(Selection):
    """The selection an ``AdapterBank`` gives its layers: per layer, its resident bank and each example's slot.
    One object per bank, reused by every call (``torch.compile`` sees the same object, with a new index)."""

    ids = torch.zeros(0, dtype=torch.long)  # (B,): each example's adapter id (0: the base model)

    def for_layer(self, layer: SingLoRALayer) -> tuple[Tensor, Tensor, Tensor] | None:
        bank = layer.bank
        return bank.A, bank.coefficients, bank.slots.index_select(0, self.ids)


class AdapterBank:
    """Many SingLoRA adapters on one base model, selected per example (see the module docstring).

    Attributes:
        model: The base model, changed in place (adapted modules wrapped in ``SingLoRALayer``s holding a
            ``LayerBank``, ``modules_to_save`` in ``TrainableCopy``s).
        adapters: ``{name: Resident}``.
    """

    def __init__(self, model: nn.Module, *, max_rank: int | None = None, capacity: int = 4) -> None:
        """``max_rank``: allocate every layer bank at this rank and refuse adapters above it (None: grow as
        needed). ``capacity``: slots allocated per layer at first (doubled when full)."""
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
        self._selection = BankSelection()
        self._wrapped_layers: list[SingLoRALayer] = []  # every module the bank wrapped (never unwrapped): use()
        self._wrapped_copies: list[TrainableCopy] = []  # runs on every forward, without walking the model

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
        u = float(ramp_value(torch.tensor(meta["ramp_step"]), plan.ramp_up_steps, torch.float64))
        modules = {name: (m.d_out, m.d_in, m.r, m.scale * u) for name, m in plan.modules.items()}
        return _Checked(config, meta["ramp_step"], modules, list(plan.saved_modules), tensors)

    # ---- changing the bank ------------------------------------------------------------------------------------

    def _layer(self, name: str) -> SingLoRALayer:
        """The wrapped layer ``name``, wrapping it (with an empty ``LayerBank``) on first use."""
        module = self.model.get_submodule(name)
        if isinstance(module, SingLoRALayer):
            return module
        layer = SingLoRALayer(module)
        layer.bank = LayerBank(max(layer.d_out, layer.d_in), self.max_rank or 1, self.capacity, self._ids,
                               adapter_dtype(module.weight), module.weight.device)
        set_submodule(self.model, name, layer)
        self._wrapped_layers.append(layer)
        return layer

    def _saved(self, name: str) -> TrainableCopy:
        module = self.model.get_submodule(name)
        if isinstance(module, TrainableCopy):
            return module
        wrapper = TrainableCopy(module)
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
            layer = self._layer(module_name)  # every bank holds self._ids slots (_new_id, _layer)
            A = checked.tensors[f"{module_name}.{A_SUFFIX}"].to(layer.bank.A.dtype)
            layer.bank.put(adapter_id, A.to(layer.bank.A.device), c)
        for module_name in (old.modules if old else {}):
            if module_name not in checked.modules:
                self.model.get_submodule(module_name).bank.remove(adapter_id)
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
        """Replace adapter ``name``'s weights with those of another folder, in place (same slots: no module is
        rebuilt; a compiled model does not recompile while ranks stay within ``max_rank``)."""
        if name not in self.adapters:
            raise SingLoRAError(f"adapter {name!r} is not loaded; loaded: {sorted(self.adapters)}")
        checked = self._check(directory, name)
        self._write(name, self.adapters[name].id, checked, str(directory))

    def unload(self, name: str) -> None:
        """Remove adapter ``name``: its slots are zeroed and freed, its saved-module copies dropped."""
        resident = self.adapters.pop(name, None)
        if resident is None:
            raise SingLoRAError(f"adapter {name!r} is not loaded; loaded: {sorted(self.adapters)}")
        for module_name in resident.modules:
            self.model.get_submodule(module_name).bank.remove(resident.id)
        for module_name in resident.saved:
            self.model.get_submodule(module_name).delete_adapter(name)
        self._free_ids.append(resident.id)

    # ---- using it ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, adapter_names: Sequence[str]) -> Iterator[None]:
        """Inside the block, example ``b`` of every forward of ``model`` uses adapter ``adapter_names[b]``
        (``"__base__"``: none). The model must be in eval mode."""
        from .mixed import selecting

        names = check_adapter_names(adapter_names, self.adapters)
        if self.model.training:
            raise SingLoRAError("an AdapterBank is for inference: call model.eval() first")
        selection = self._selection
        selection.select(names)  # the same object each call: a compiled model keeps its graph
        device = next((layer.bank.slots.device for layer in self._wrapped_layers), torch.device("cpu"))
        selection.ids = torch.tensor([0 if n == BASE else self.adapters[n].id for n in names], device=device)
        with selecting(self._wrapped_layers + self._wrapped_copies, selection):
            yield

    def memory(self) -> dict[str, Any]:
        """Bytes held, in total and per adapter: ``singlora`` (its ``A`` matrices, ``n * r`` numbers per layer),
        ``stored`` (its slots, padded to each bank's rank ``R``), ``lora`` (a LoRA of the same rank on the same
        layers: ``(d_in + d_out) * r``), ``saved`` (its ``modules_to_save`` copies); ``allocated``: every layer
        bank's buffers (padding and free slots included)."""
        per_adapter = {}
        for name, resident in self.adapters.items():
            banks = {m: self.model.get_submodule(m).bank for m in resident.modules}
            saved = sum(t.numel() * t.element_size() for m in resident.saved
                        for t in self.model.get_submodule(m).copies[name].state_dict().values())
            per_adapter[name] = {
                "singlora": sum(max(o, i) * r * banks[m].A.element_size()
                                for m, (o, i, r) in resident.modules.items()),
                "stored": sum(banks[m].A[0].numel() * banks[m].A.element_size() for m in resident.modules),
                "lora": sum((o + i) * r * banks[m].A.element_size() for m, (o, i, r) in resident.modules.items()),
                "saved": saved,
            }
        allocated = sum(t.numel() * t.element_size() for layer in self._wrapped_layers for t in layer.bank.buffers())
        return {"adapters": len(self.adapters), "allocated": allocated, "per_adapter": per_adapter}

