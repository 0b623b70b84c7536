"""The banked storage of one adapted layer: many resident adapters' ``A`` in one pool of rows (``LayerBank``).

S-LoRA's unified paging with one row per page: an adapter of rank ``r`` on a layer (``A``: ``(n, r)``) holds ``r``
rows of the layer's pool, its ``A.T``, wherever rows are free. Nothing is padded to the largest rank, and rows an
unloaded adapter leaves are reused by the next adapter of any rank::

    pool   (P + 1, n)   row 0: zeros; rows 1..P: the A.T rows of the resident adapters, or free
    table  (G, W)       adapter id -> its pool rows, then 0s up to the width W (zero rows add nothing to A A.T)
    coefficients (G,)   adapter id -> c = s * u (0: the id does not adapt this layer; id 0 is the base model)

A mixed batch (example ``b`` uses adapter id ``ids[b]``) reads ``pool[table[ids]]``: one gather of ``(B, W, n)``
and two batched products (``functional.pooled_factored_update``), whatever the number of adapters and ranks.
When every example uses one adapter, its rows are read as they lie (``rows_of``: a view when they are contiguous,
which the allocator prefers), so the step costs one adapter's two small products, as an unbanked layer does.

Memory per adapter and layer: ``n * r`` numbers, ``W`` table entries and one coefficient. Growing copies: the pool
by ``max(needed, P / 16)`` rows (so at most ~1/16 of it is free after a growth, and loading K adapters copies each
row ~16 times in all), the table by doubling its ids. ``torch.compile``: sizes given up front (``rows``, ``width``,
``ids``) are never changed by adding, replacing or removing adapters that fit them.
"""

from __future__ import annotations

import bisect

import torch
from torch import Tensor, nn

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
        self.held: dict[int, tuple[list[int], float]] = {}

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
        """Make at least ``needed`` rows free: ``max(needed - free, P / 16)`` new rows at the end."""
        old = self.pool.shape[0]
        added = max(needed - len(self.free), (old - 1) // GROWTH, 1)
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
        with torch.no_grad():
            self.pool.index_fill_(0, torch.tensor(held[0], device=self.pool.device), 0)
            self.table[adapter_id].zero_()
            self.coefficients[adapter_id] = 0
        self._release(held[0])

    def rows_of(self, adapter_id: int) -> tuple[Tensor, float] | None:
        """``(A.T (r, n), c)`` of ``adapter_id`` (a view of the pool when its rows are contiguous), or None."""
        held = self.held.get(adapter_id)
        if held is None:
            return None
        rows, coefficient = held
        if rows[-1] - rows[0] == len(rows) - 1:
            return self.pool[rows[0] : rows[-1] + 1], coefficient
        return self.pool.index_select(0, self.table[adapter_id, : len(rows)]), coefficient

    def held_bytes(self, adapter_id: int) -> int:
        """Bytes ``adapter_id`` occupies here: its rows, its table row and its coefficient."""
        rows = len(self.held[adapter_id][0]) if adapter_id in self.held else 0
        return (rows * self.pool.shape[1] * self.pool.element_size() + self.width * self.table.element_size()
                + self.coefficients.element_size())

    def allocated_bytes(self) -> int:
        """Bytes of every buffer (free rows, the zero row and unused ids included)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        return f"n={self.pool.shape[1]}, rows={self.pool.shape[0] - 1}, free={len(self.free)}, width={self.width}"
