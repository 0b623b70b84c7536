"""Mixed-adapter batches: one adapter per example, ``model(**batch, adapter_names=[...])`` as in PEFT.

    model.eval()
    logits = model(**batch, adapter_names=["alice", "bob", "__base__", "alice"]).logits
    out = model.generate(**batch, adapter_names=["alice", "bob", "__base__", "alice"], max_new_tokens=20)

``"__base__"`` runs the base model for that example. Every adapted layer holds one *selection* object, attached
once by its owner (``SingLoRAModel`` when it wraps the layer, ``bank.AdapterBank`` likewise); a mixed call only
selects the names on that one object (``Selection.selecting``) and clears them after. During the call a layer asks
the selection what its examples use (``for_layer``):

- ``Shared(A.T, c)``: every example uses the same adapter on this layer: the ordinary single-adapter update;
- ``Pooled(pool, rows, coefficients)``: example ``b`` uses the adapter whose ``A.T`` is ``pool[rows[b]]``: instead of
  PEFT's Python loop over the adapters with a sub-batch each, one gather and two batched matrix products
  (``functional.mixed_factored_update``; S-LoRA / Punica's gather + bmm), whatever the number of adapters and
  ranks (a lower rank lists zero rows, which add nothing);
- None: no example uses an adapter of this layer.

``modules_to_save`` copies run once per distinct adapter on that adapter's rows.

Two selections share the layer code: ``NamedSelection`` stacks the adapters of a ``SingLoRAModel`` (once per layer
per call, so a whole ``generate`` reuses it); ``bank.BankSelection`` reads the banks an ``AdapterBank`` keeps
resident for serving. Inputs must be example-major: a layer input's first dimension is the batch, or a multiple of
it (beam search, flattened sequences), each example's rows consecutive. Inference only: the model must be in eval
mode. Not thread-safe: one mixed call at a time per model.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import SingLoRAError

BASE = "__base__"  # the adapter name that means "no adapter" (PEFT's)


class Shared(NamedTuple):
    """Every example uses one adapter on the layer: ``At = A.T`` ``(r, n)``, the views an in-place update reads
    (``A_in = A[:d_in]`` ``(d_in, r)``, ``A_out = A[:d_out].T`` ``(r, d_out)``) and ``c = s * u``."""

    At: Tensor
    A_in: Tensor
    A_out: Tensor
    coefficient: Tensor | float


def shared(At: Tensor, d_out: int, d_in: int, coefficient: Tensor | float) -> Shared:
    """The ``Shared`` of ``At`` (``(r, n)``) on a ``(d_out, d_in)`` layer."""
    return Shared(At, At[:, :d_in].T, At[:, :d_out], coefficient)


class Pooled(NamedTuple):
    """Example ``b`` uses the adapter whose ``A.T`` is ``pool[rows[b]]``: ``pool`` ``(P, n)``, ``rows`` ``(B, W)``
    int64, ``coefficients`` ``(B,)`` (``functional.mixed_factored_update``)."""

    pool: Tensor
    rows: Tensor
    coefficients: Tensor


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


def check_mixed_call(modules: Sequence[nn.Module], model: nn.Module) -> None:
    """Refuse a mixed-adapter call on ``model`` (adapted ``modules``: layers and ``modules_to_save`` wrappers) in
    training mode, with adapters merged into the weights, or inside ``disable_adapters()``."""
    if model.training:
        raise SingLoRAError("mixed-adapter calls (adapter_names, AdapterBank.use) are for inference: call "
                            "model.eval() first")
    merged = sorted({name for module in modules for name in getattr(module, "merged_adapters", ())})
    if merged:
        raise SingLoRAError(f"adapter_names cannot be used while adapters {merged} are merged; unmerge() first")
    if any(module.disabled for module in modules):
        raise SingLoRAError("adapter_names cannot be used inside disable_adapters()")


class Selection:
    """Which adapter each example of the running batch uses; one object per model, held by its adapted layers.

    Attributes:
        active: Whether a mixed call is running (outside one, layers run their ordinary path).
        names: One adapter name per example (``"__base__"``: none).
        unique: The distinct names, in order of first appearance.
        inverse: ``(B,)`` int64, ``unique[inverse[b]] == names[b]``.
    """

    active = False

    def __init__(self) -> None:
        self.names: list[str] = []
        self.unique: list[str] = []
        self.inverse = torch.zeros(0, dtype=torch.long)

    def select(self, names: Sequence[str]) -> None:
        """Set the per-example names and make the selection active."""
        self.names = list(names)
        self.unique = list(dict.fromkeys(self.names))
        position = {name: i for i, name in enumerate(self.unique)}
        self.inverse = torch.tensor([position[name] for name in self.names], dtype=torch.long)
        self.active = True

    def clear(self) -> None:
        self.active = False

    @contextlib.contextmanager
    def selecting(self, names: Sequence[str]) -> Iterator[None]:
        """Inside the block, example ``b`` uses adapter ``names[b]`` (names checked by the caller)."""
        if self.active:
            raise SingLoRAError("a mixed-adapter call is already running on this model (calls cannot nest)")
        self.select(names)
        try:
            yield
        finally:
            self.clear()

    def for_layer(self, layer: nn.Module) -> Shared | Pooled | None:
        """What the examples use on ``layer`` (module docstring)."""
        raise NotImplementedError

    def copy_for(self, wrapper: nn.Module, name: str) -> nn.Module:
        """The module that runs adapter ``name``'s examples in a ``modules_to_save`` wrapper."""
        return wrapper.copies[name] if name in wrapper.copies else wrapper.original_module

    def run_copies(self, wrapper: nn.Module, *args: Any, **kwargs: Any) -> Any:
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


def stack_pool(As: Sequence[Tensor], coefficients: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """A pool from adapter matrices ``As[k]`` (``(n, r_k)``): ``(1 + K * R, n)`` with row 0 all zeros and rows
    ``1 + k * R ...`` holding ``As[k].T`` padded with zero rows to ``R = max r_k``, and the coefficients ``(1 + K,)``
    with 0 first. Adapter ``k`` (``0``: none) is ``rows_for(k, R)``. Differentiable in ``As``."""
    rank = max(A.shape[1] for A in As)
    dtype = As[0].dtype
    padded = [F.pad(A.T.to(dtype), (0, 0, 0, rank - A.shape[1])) for A in As]  # (R, n) each
    pool = torch.cat([As[0].new_zeros((1, As[0].shape[0])), *padded])
    return pool, torch.stack([torch.zeros((), dtype=dtype, device=pool.device), *[c.to(dtype) for c in coefficients]])


def rows_for(slots: Tensor, rank: int) -> Tensor:
    """The ``(B, R)`` pool rows of ``stack_pool``'s adapters ``slots`` (``(B,)``, 0: none)."""
    offsets = torch.arange(1, rank + 1, device=slots.device)
    return torch.where(slots[:, None] > 0, (slots[:, None] - 1) * rank + offsets, 0)


class NamedSelection(Selection):
    """A selection over the named adapters of a ``SingLoRAModel``: per layer, the pool of the adapters this batch
    uses there, stacked on first use and kept for the rest of the call (e.g. every step of ``generate``)."""

    def select(self, names: Sequence[str]) -> None:
        super().select(names)
        self._cache: dict[int, Shared | Pooled | None] = {}

    def for_layer(self, layer: nn.Module) -> Shared | Pooled | None:
        key = id(layer)
        if key not in self._cache:
            present = [name for name in self.unique if name in layer.singlora]
            adapters = [layer.singlora[name] for name in present]
            if not present:
                self._cache[key] = None
            elif len(self.unique) == 1:
                A = adapters[0].A
                self._cache[key] = shared(A.T, layer.d_out, layer.d_in, adapters[0].coefficient().to(A.dtype))
            else:
                pool, coefficients = stack_pool([a.A for a in adapters], [a.coefficient() for a in adapters])
                slot = torch.tensor([present.index(n) + 1 if n in present else 0 for n in self.unique])
                slots = slot[self.inverse].to(pool.device)
                rank = max(a.A.shape[1] for a in adapters)
                self._cache[key] = Pooled(pool, rows_for(slots, rank), coefficients[slots])
        return self._cache[key]
