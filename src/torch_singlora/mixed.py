"""Mixed-adapter batches: one adapter per example, ``model(**batch, adapter_names=[...])`` as in PEFT.

    model.eval()
    logits = model(**batch, adapter_names=["alice", "bob", "__base__", "alice"]).logits
    out = model.generate(**batch, adapter_names=["alice", "bob", "__base__", "alice"], max_new_tokens=20)

``"__base__"`` runs the base model for that example. During the call every adapted layer holds a *selection*
(``layer.selection``) that tells it which adapter each example uses. Instead of PEFT's Python loop over the
adapters with a sub-batch each, a layer gathers each example's ``A`` from a stacked, zero-padded *bank* and runs
two batched matrix products (``functional.mixed_factored_update``; S-LoRA / Punica's gather + bmm): one set of
kernels whatever the number of adapters, and different ranks are padded exactly (zero columns add nothing).
``modules_to_save`` copies run once per distinct adapter on that adapter's rows.

Two sources of banks share the layer code: ``NamedSelection`` stacks the adapters of a ``SingLoRAModel`` (built
once per layer per call, so a whole ``generate`` reuses it); ``torch_singlora.bank.AdapterBank`` keeps its banks
resident for serving many adapters. Inputs must be example-major: a layer input's first dimension is the batch,
or a multiple of it (beam search, flattened sequences), each example's rows consecutive. Inference only: the model
must be in eval mode. Not thread-safe: one mixed call at a time per model.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import SingLoRAError
from .layers import SingLoRALayer, TrainableCopy
from .names import BASE

if TYPE_CHECKING:
    from .model import SingLoRAModel


def check_adapter_names(adapter_names: Any, known: Any) -> list[str]:
    """``adapter_names`` as a list after checking it: a non-empty list of names in ``known`` or ``"__base__"``."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)) or not adapter_names:
        raise SingLoRAError(f"adapter_names={adapter_names!r} must be a non-empty list with one adapter name per "
                            f"example ({BASE!r} for none)")
    names = list(adapter_names)
    unknown = sorted({repr(n) for n in names if not isinstance(n, str) or (n != BASE and n not in known)})
    if unknown:
        raise SingLoRAError(f"adapter_names: unknown adapter(s) {', '.join(unknown)}; adapters are {sorted(known)} "
                            f"(and {BASE!r} for none)")
    return names


class Selection:
    """Which adapter each example of a batch uses; held by every adapted layer during a mixed call.

    Attributes:
        names: One adapter name per example (``"__base__"``: none).
        unique: The distinct names, in order of first appearance.
        inverse: ``(B,)`` int64, ``unique[inverse[b]] == names[b]``.
    """

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.select(names)

    def select(self, names: Sequence[str]) -> None:
        """Set the per-example names (a selection object can be reused from call to call)."""
        self.names = list(names)
        self.unique = list(dict.fromkeys(self.names))
        position = {name: i for i, name in enumerate(self.unique)}
        self.inverse = torch.tensor([position[name] for name in self.names], dtype=torch.long)

    def for_layer(self, layer: SingLoRALayer) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(bank (K, R, n), coefficients (K,), index (B,))`` for ``layer``, or None if no example uses it."""
        raise NotImplementedError

    def copy_for(self, wrapper: TrainableCopy, name: str) -> nn.Module:
        """The module that runs adapter ``name``'s examples in a ``modules_to_save`` wrapper."""
        return wrapper.copies[name] if name in wrapper.copies else wrapper.original_module

    def run_copies(self, wrapper: TrainableCopy, *args: Any, **kwargs: Any) -> Any:
        """Run ``wrapper`` (a ``modules_to_save`` module) with each example's own copy, once per distinct copy."""
        modules = [self.copy_for(wrapper, name) for name in self.unique]
        if all(module is modules[0] for module in modules):
            return modules[0](*args, **kwargs)
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] % len(self.names):
            raise SingLoRAError(f"modules_to_save module {type(wrapper.original_module).__name__}: a mixed-adapter "
                                "batch needs a tensor first argument whose first dimension is the batch")
        inverse = self.inverse.to(x.device).repeat_interleave(x.shape[0] // len(self.names))
        result: Tensor | None = None
        for module in dict.fromkeys(modules):  # each distinct module once, on all its rows
            chosen = [i for i, m in enumerate(modules) if m is module]
            rows = torch.isin(inverse, torch.tensor(chosen, device=x.device)).nonzero().squeeze(1)
            out = module(x.index_select(0, rows), *args[1:], **kwargs)
            if not isinstance(out, Tensor):
                raise SingLoRAError(f"modules_to_save module {type(module).__name__} returns "
                                    f"{type(out).__name__}; a mixed-adapter batch needs a tensor output")
            if result is None:
                result = out.new_empty((x.shape[0], *out.shape[1:]))
            result.index_copy_(0, rows, out)
        return result


def stack_bank(As: Sequence[Tensor], coefficients: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """A bank from adapter matrices ``As[k]`` (``(n, r_k)``): ``(K + 1, R, n)`` with slot 0 all zeros (the base
    model) and slot ``k + 1`` holding ``As[k].T`` padded with zero rows to ``R = max r_k``; coefficients
    ``(K + 1,)`` with 0 first. Differentiable in ``As``."""
    rank = max(A.shape[1] for A in As)
    dtype = As[0].dtype
    zero = As[0].new_zeros((1, rank, As[0].shape[0]))
    padded = [F.pad(A.T.to(dtype), (0, 0, 0, rank - A.shape[1])) for A in As]  # (R, n) each
    bank = torch.cat([zero, torch.stack(padded)])
    return bank, torch.stack([torch.zeros((), dtype=dtype, device=zero.device), *[c.to(dtype) for c in coefficients]])


class NamedSelection(Selection):
    """A selection over the named adapters of a ``SingLoRAModel``: per layer, the bank of the adapters this batch
    uses there, stacked on first use and kept for the rest of the call (e.g. every step of ``generate``)."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(names)
        self._cache: dict[int, tuple[Tensor, Tensor, Tensor] | None] = {}

    def for_layer(self, layer: SingLoRALayer) -> tuple[Tensor, Tensor, Tensor] | None:
        key = id(layer)
        if key not in self._cache:
            present = [name for name in self.unique if name in layer.singlora]
            if not present:
                self._cache[key] = None
            else:
                adapters = [layer.singlora[name] for name in present]
                bank, coefficients = stack_bank([a.A for a in adapters], [a.coefficient() for a in adapters])
                slot = torch.tensor([present.index(n) + 1 if n in present else 0 for n in self.unique])
                self._cache[key] = (bank, coefficients, slot[self.inverse].to(bank.device))
        return self._cache[key]


@contextlib.contextmanager
def selecting(modules: Sequence[nn.Module], selection: Selection) -> Iterator[None]:
    """Give every adapted module in ``modules`` the ``selection`` for the duration of the block."""
    if any(m.selection is not None for m in modules):
        raise SingLoRAError("a mixed-adapter call is already running on this model (calls cannot nest)")
    try:
        for module in modules:
            module.selection = selection
        yield
    finally:
        for module in modules:
            module.selection = None


@contextlib.contextmanager
def use_adapter_names(model: "SingLoRAModel", adapter_names: Any) -> Iterator[None]:
    """Inside the block, example ``b`` of every forward of ``model`` uses adapter ``adapter_names[b]``.

    Checks first: eval mode, every name an adapter of ``model`` or ``"__base__"``, nothing merged, adapters not
    disabled. ``SingLoRAError`` naming the problem otherwise.
    """
    names = check_adapter_names(adapter_names, model.configs)
    if model.training:
        raise SingLoRAError("adapter_names is for inference: call model.eval() first")
    layers = [layer for _, layer in model.singlora_layers()]
    copies = [wrapper for _, wrapper in model.trainable_copies()]
    merged = sorted({name for layer in layers for name in layer.merged_adapters})
    if merged:
        raise SingLoRAError(f"adapter_names cannot be used while adapters {merged} are merged; unmerge() first")
    if any(module.disabled for module in layers + copies):
        raise SingLoRAError("adapter_names cannot be used inside disable_adapters()")
    with selecting(layers + copies, NamedSelection(names)):
        yield
