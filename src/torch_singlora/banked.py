"""The banked storage of one adapted layer: many resident adapters' ``A`` in one pool of rows (``LayerBank``).

S-LoRA's unified paging with one row per page: an adapter of rank ``r`` on a layer (``A``: ``(n, r)``) holds ``r``
rows of the layer's pool, its ``A.T``, wherever rows are free. Nothing is padded to the largest rank, and rows an
unloaded adapter leaves are reused by the next adapter of any rank::

    pool   (P + 1, n)   row 0: zeros; rows 1..P: the A.T rows of the resident adapters, or free
    table  (G, W)       adapter id -> its pool rows, then 0s up to the width W (zero rows add nothing to A A.T)
    coefficients (G,)   adapter id -> c = s * u (0: the id does not adapt this layer; id 0 is the base model)

A mixed batch (example ``b`` uses adapter id ``ids[b]``) reads ``pool[table[ids]]``: one gather of ``(B, W, n)``
and two batched products (``functional.pooled_factored_update``), whatever the number of adapters and ranks.
When every example uses one adapter, its rows are read as they lie (``shared``: a view when they are contiguous,
which the allocator prefers), so the step costs one adapter's two small products, as an unbanked layer does. On a
plain ``nn.Linear`` (``fuse``) the first of them joins the base product: the weight lives in a buffer with ``W``
spare rows below it (the Linear keeps a view of its own rows: same values, no second copy), the step's adapter puts
its ``A_in^T`` there, and one GEMM gives the base output and ``x @ A_in`` together (``fused_forward``); at 16
decoding rows two separate small products cost about 5% of SmolLM2's step, this about half of that.

Memory per adapter and layer: ``n * r`` numbers, ``W`` table entries and one coefficient. Growing copies: the pool
by ``max(needed, P / 16, its first size)`` rows (so, once large, at most ~1/16 of it is free after a growth, and
loading K adapters copies each row ~16 times in all), the table by doubling its ids. ``torch.compile``: sizes given up front (``rows``, ``width``,
``ids``) are never changed by adding, replacing or removing adapters that fit them.
"""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mixed import Shared, shared

GROWTH = 16  # the pool grows by at least 1/GROWTH of its rows


class LayerBank(nn.Module):
    """The resident adapters of one layer (non-persistent buffers: never in a state dict, moved by ``.to()``).

    Buffers: ``pool`` ``(P + 1, n)``, ``table`` ``(G, W)`` int64, ``coefficients`` ``(G,)`` (module docstring).
    Host state: ``held`` ``{adapter id: (rows, c)}``; ``free``: the free pool rows, ascending.
    """

    def __init__(self, n: int, *, rows: int, width: int, ids: int, dtype: torch.dtype,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.register_buffer("pool", torch.zeros(rows + 1, n, dtype=dtype, device=device), persistent=False)
        self.register_buffer("table", torch.zeros(ids, width, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("coefficients", torch.zeros(ids, dtype=dtype, device=device), persistent=False)
        self.free = list(range(1, rows + 1))
        self.min_growth = max(rows, 1)  # a growth adds at least the first allocation's rows
        self.held: dict[int, tuple[list[int], float]] = {}
        self._shared: dict[int, Shared] = {}  # adapter id -> its rows as read by a batch on that one adapter
        self._shared_pool: Tensor | None = None  # the pool those rows view
        self.fused: Tensor | None = None  # (d_out + W, d_in): a Linear's weight and spare rows (``fuse``)
        self.fused_bias: Tensor | None = None
        self.fused_for: Shared | None = None  # the adapter rows whose A_in^T is in the spare rows

    @property
    def width(self) -> int:
        """``W``: the most rows (the highest rank) an adapter can hold here without growing the table."""
        return self.table.shape[1]

    def ensure_ids(self, ids: int) -> None:
        """Room in the table for adapter ids ``< ids`` (doubled: loading K adapters copies O(K) entries)."""
        if ids > self.table.shape[0]:
            added = max(ids, 2 * self.table.shape[0]) - self.table.shape[0]
            self.table = torch.cat([self.table, self.table.new_zeros(added, self.width)])
            self.coefficients = torch.cat([self.coefficients, self.coefficients.new_zeros(added)])

    def _grow_pool(self, needed: int) -> None:
        """Make at least ``needed`` rows free: ``max(needed - free, P / 16, first allocation)`` new rows at the
        end."""
        old = self.pool.shape[0]
        added = max(needed - len(self.free), (old - 1) // GROWTH, self.min_growth)
        self.pool = torch.cat([self.pool, self.pool.new_zeros(added, self.pool.shape[1])])
        self.free.extend(range(old, old + added))

    def _take(self, r: int) -> list[int]:
        """``r`` free rows: the first contiguous run of them, else the lowest ``r``."""
        if len(self.free) < r:
            self._grow_pool(r)
        free = self.free
        start = next((i for i in range(len(free) - r + 1) if free[i + r - 1] - free[i] == r - 1), 0)
        rows = free[start : start + r]
        del free[start : start + r]
        return rows

    def _release(self, rows: list[int]) -> None:
        for row in rows:
            bisect.insort(self.free, row)

    def put(self, adapter_id: int, A: Tensor, coefficient: float) -> None:
        """Hold ``A`` (``(n, r)``, already this bank's dtype and device) for ``adapter_id`` with ``c = coefficient``,
        replacing what the id held here (its rows are reused when the rank is the same). Grows the table's width
        when ``r > W`` (a caller that fixed the width refuses such an ``A`` first)."""
        self._shared.clear()
        self.fused_for = None
        r = A.shape[1]
        if r > self.width:
            self.table = torch.cat([self.table, self.table.new_zeros(self.table.shape[0], r - self.width)], dim=1)
        old = self.held.get(adapter_id)
        if old is not None and len(old[0]) == r:
            rows = old[0]
        else:
            self.remove(adapter_id)
            rows = self._take(r)
        index = torch.tensor(rows, device=self.pool.device)
        with torch.no_grad():
            self.pool.index_copy_(0, index, A.T)
            self.table[adapter_id].zero_()
            self.table[adapter_id, :r] = index
            self.coefficients[adapter_id] = coefficient
        self.held[adapter_id] = (rows, coefficient)

    def remove(self, adapter_id: int) -> None:
        """Free ``adapter_id``'s rows (zeroed, for any rank to reuse); no-op if it holds none here."""
        held = self.held.pop(adapter_id, None)
        if held is None:
            return
        self._shared.clear()
        self.fused_for = None
        with torch.no_grad():
            self.pool.index_fill_(0, torch.tensor(held[0], device=self.pool.device), 0)
            self.table[adapter_id].zero_()
            self.coefficients[adapter_id] = 0
        self._release(held[0])

    def shared(self, adapter_id: int, d_out: int, d_in: int) -> Shared | None:
        """``adapter_id``'s rows as a ``mixed.Shared`` for a ``(d_out, d_in)`` layer (``A.T``: a view of the pool
        when its rows are contiguous, else gathered), or None if it holds none here. Kept until the bank
        changes (or ``.to()`` replaces the pool): a decoding step on one adapter reads it as it lies."""
        if self._shared_pool is not self.pool:
            self._shared.clear()
            self._shared_pool = self.pool
        found = self._shared.get(adapter_id)
        if found is None and adapter_id in self.held:
            rows, coefficient = self.held[adapter_id]
            if rows[-1] - rows[0] == len(rows) - 1:
                At = self.pool[rows[0] : rows[-1] + 1]
            else:
                At = self.pool.index_select(0, self.table[adapter_id, : len(rows)])
            found = self._shared[adapter_id] = shared(At, d_out, d_in, coefficient)
        return found

    def fuse(self, linear: nn.Linear) -> None:
        """Move ``linear``'s weight (and bias) into buffers with ``W`` spare rows (entries) below; ``linear`` keeps
        views of its own rows (module docstring). Again after the table widened: the buffers grow."""
        weight, bias = linear.weight, linear.bias
        self.spare = self.width
        self.fused = weight.new_zeros(weight.shape[0] + self.width, weight.shape[1])
        self.fused[: weight.shape[0]] = weight.detach()
        linear.weight = nn.Parameter(self.fused[: weight.shape[0]], requires_grad=weight.requires_grad)
        if bias is not None:
            self.fused_bias = bias.new_zeros(bias.shape[0] + self.width)
            self.fused_bias[: bias.shape[0]] = bias.detach()
            linear.bias = nn.Parameter(self.fused_bias[: bias.shape[0]], requires_grad=bias.requires_grad)

    def fused_forward(self, linear: nn.Linear, x: Tensor, found: Shared) -> Tensor | None:
        """``linear(x)`` plus the update of ``found`` (``self.shared``'s, every example's; ``c`` a number) with one
        GEMM for the base product and ``x @ A_in``: a view of that GEMM's first ``d_out`` columns. None (nothing
        done) if ``linear`` no longer holds views of the buffers (``.to()`` moved it): they are dropped."""
        d_out, r = linear.out_features, found.At.shape[0]
        if linear.weight.data_ptr() != self.fused.data_ptr() or linear.weight.dtype != self.fused.dtype:
            self.fused = self.fused_bias = self.fused_for = None
            return None
        if self.fused.shape[0] < d_out + r:  # the table widened since (no max_rank): more spare rows
            self.fuse(linear)
            self.fused_for = None
        if self.fused_for is not found:
            self.fused[d_out:].zero_()
            self.fused[d_out : d_out + r] = found.A_in.T
            self.fused_for = found
        bias = None if self.fused_bias is None else self.fused_bias[: d_out + r]
        out = F.linear(x, self.fused[: d_out + r], bias)  # (..., d_out + r): base output, then x @ A_in
        flat = out.view(-1, d_out + r)
        flat[:, :d_out].addmm_(flat[:, d_out:], found.A_out, alpha=found.coefficient)
        return out[..., :d_out]

    def held_bytes(self, adapter_id: int) -> int:
        """Bytes ``adapter_id`` occupies here: its rows, its table row and its coefficient."""
        rows = len(self.held[adapter_id][0]) if adapter_id in self.held else 0
        return (rows * self.pool.shape[1] * self.pool.element_size() + self.width * self.table.element_size()
                + self.coefficients.element_size())

    def allocated_bytes(self) -> int:
        """Bytes of every buffer (free rows, the zero row and unused ids included) and of the spare rows of a fused
        weight (not the weight's own rows: those are the base model's)."""
        spare = 0 if self.fused is None else \
            self.spare * (self.fused.shape[1] + (self.fused_bias is not None)) * self.fused.element_size()
        return sum(t.numel() * t.element_size() for t in self.buffers()) + spare

    def extra_repr(self) -> str:
        return f"n={self.pool.shape[1]}, rows={self.pool.shape[0] - 1}, free={len(self.free)}, width={self.width}"
