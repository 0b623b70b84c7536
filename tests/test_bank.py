"""``AdapterBank`` (``bank.py``, its storage ``banked.py``): many adapters resident on one base model. Each example
of a mixed batch equals the same adapter loaded alone by ``SingLoRAModel`` (every layer kind, saved modules);
hundreds of adapters of mixed ranks cost their ``A`` matrices at their own ranks; rows an unloaded adapter leaves
are reused by any rank; swap writes in place; a batch on one adapter runs without a gather; a compiled model never
recompiles; refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_close
from mixed_models import NAMES, EveryKind, add_three_adapters, run_alone
from torch import nn

from torch_singlora import SingLoRAConfig, SingLoRAError, SingLoRAModel, get_singlora_model
from torch_singlora.bank import AdapterBank

TARGETS = ["emb", "conv1", "conv2", "up", "down"]


@pytest.fixture
def saved(tmp_path):
    """Three adapters ``a``, ``b``, ``c`` (every layer kind, ranks 2/5/3, a saved head on two) written to disk,
    the ``SingLoRAModel`` holding them, and a fresh copy of the base model."""
    torch.manual_seed(0)
    base = EveryKind()
    fresh = copy.deepcopy(base)
    model = add_three_adapters(base, TARGETS, ["head"])
    for name in "abc":
        model.save_adapter(tmp_path / name, name)
    return tmp_path, model, fresh.eval()


def test_mixed_batch_equals_each_adapter_loaded_alone(saved) -> None:
    folder, model, base = saved
    bank = AdapterBank(base, capacity=1)  # slots and ranks grow as adapters arrive
    for name in "abc":
        bank.load(name, folder / name)
    ids = torch.randint(0, 30, (len(NAMES), 7))
    with torch.no_grad(), bank.use(NAMES):
        mixed = base(ids)
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            assert_close(mixed[i], run_alone(model, name, ids[i : i + 1])[0], dtype=torch.float32)
        assert_close(base(ids), run_alone(model, "__base__", ids), dtype=torch.float32)  # outside use(): the base


def one_adapter_per_rank(folder, base: nn.Module, ranks: tuple[int, ...]) -> SingLoRAModel:
    """Adapters ``r<rank>`` on both Linear layers of ``base`` (a copy), saved under ``folder/r<rank>``."""
    model = None
    for r in ranks:
        config = SingLoRAConfig(r=r, target_modules=["0", "2"], init="gaussian", init_std=0.3)
        if model is None:
            model = get_singlora_model(copy.deepcopy(base), config, f"r{r}")
        else:
            model.add_adapter(f"r{r}", config)
        model.save_adapter(folder / f"r{r}", f"r{r}")
    return model.eval()


def test_hundreds_of_adapters_of_mixed_ranks_cost_their_A_matrices_at_their_own_ranks(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 160)).eval()  # square + rectangular
    model = one_adapter_per_rank(tmp_path, base, (2, 4, 8))
    originals = [p.detach().clone() for p in base.parameters()]
    bank = AdapterBank(base, max_rank=8, capacity=2)  # grows from rows for 2 adapters of rank 8
    for i in range(300):
        bank.load(f"user{i}", tmp_path / f"r{(2, 4, 8)[i % 3]}")
    memory = bank.memory()
    assert memory["adapters"] == 300
    for name, r in (("user0", 2), ("user1", 4), ("user2", 8)):  # (64 + 160) * r numbers, a table row per layer
        assert memory["per_adapter"][name] == {"singlora": (64 + 160) * r * 4, "lora": (128 + 224) * r * 4,
                                               "stored": (64 + 160) * r * 4 + 2 * (8 * 8 + 4), "saved": 0}
    used_rows = 100 * (2 + 4 + 8)
    for layer, n in ((base[0], 64), (base[2], 160)):
        pool, table, coefficients = layer.bank.pool, layer.bank.table, layer.bank.coefficients
        assert used_rows < pool.shape[0] - 1 <= used_rows + used_rows // 16 + 1  # grown by 1/16, no padding
        assert table.shape == (384, 8) and coefficients.shape == (384,)  # ids 0..300: 3 at first, doubled
    allocated = sum(layer.bank.pool.numel() * 4 + 384 * (8 * 8 + 4) for layer in (base[0], base[2]))
    spare = 2 * 8 * (64 + 1) * 4  # each weight and bias: 8 spare rows / entries (fused one-adapter steps)
    assert memory["allocated"] == allocated + spare
    weights = sum(m["singlora"] for m in memory["per_adapter"].values())
    assert allocated < 1.1 * weights + 2 * 84 * (8 * 8 + 4)  # at most 1/16 of the rows free, and unused ids
    for layer in (base[0], base[2]):  # the base weights moved into the fused buffers, not copied beside them
        assert layer.weight.data_ptr() == layer.bank.fused.data_ptr()
        assert layer.bias.data_ptr() == layer.bank.fused_bias.data_ptr()
    assert all(torch.equal(p, w) for p, w in zip(base.parameters(), originals))
    x = torch.randn(4, 64)
    with torch.no_grad(), bank.use(["user0", "user299", "__base__", "user298"]):
        out = base(x)
    with torch.no_grad():
        for row, name in ((0, "r2"), (1, "r8"), (3, "r4")):  # user i has rank (2, 4, 8)[i % 3]
            assert_close(out[row], run_alone(model, name, x[row : row + 1])[0], dtype=torch.float32)
        assert_close(out[2], run_alone(model, "__base__", x[2:3])[0], dtype=torch.float32)


def test_unloaded_rows_are_reused_by_any_rank_swap_writes_in_place(saved, tmp_path) -> None:
    folder, model, base = saved
    bank = AdapterBank(base, max_rank=5, capacity=2)  # up: rows for two adapters of rank 5
    for name in "ab":
        bank.load(name, folder / name)  # a: r=2 (every layer), b: r=5 (emb, conv2, down)
    up = base.up.bank
    pool, rows_a = up.pool.data_ptr(), up.held[bank.adapters["a"].id][0]
    bank.unload("a")
    assert up.pool[rows_a].abs().sum() == 0 and "a" not in base.head.copies
    bank.load("d", folder / "c")  # c: r=3 on up, takes a's 2 freed rows and one more
    assert set(rows_a) < set(up.held[bank.adapters["d"].id][0])
    bank.swap("d", folder / "b")  # d now holds b's weights (other rank, targets, a saved head): up freed
    bank.swap("b", folder / "a")  # rank 5 -> 2: b's rows on down become a's, the other three freed
    bank.load("e", folder / "c")
    assert up.pool.data_ptr() == pool  # nothing reallocated: freed rows served every load
    ids = torch.randint(0, 30, (4, 7))
    with torch.no_grad(), bank.use(["d", "e", "b", "__base__"]):
        out = base(ids)
    with torch.no_grad():
        for i, name in enumerate(["b", "c", "a", "__base__"]):
            assert_close(out[i], run_alone(model, name, ids[i : i + 1])[0], dtype=torch.float32)
    with pytest.raises(SingLoRAError, match="unknown adapter.*'a'"):
        bank.use(["a"])


def test_unloaded_memory_is_reused_not_grown(tmp_path) -> None:
    """Load 40 adapters of rank 8, unload them all, load 70 of rank 4 and 20 of rank 2 (the same 320 rows): the
    pools keep their size."""
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 160)).eval()
    one_adapter_per_rank(tmp_path, base, (2, 4, 8))
    bank = AdapterBank(base, max_rank=8, capacity=40)
    for i in range(40):
        bank.load(f"u{i}", tmp_path / "r8")
    pools = [layer.bank.pool for layer in (base[0], base[2])]
    assert [len(layer.bank.free) for layer in (base[0], base[2])] == [0, 0]
    for i in range(40):
        bank.unload(f"u{i}")
    for i in range(90):
        bank.load(f"v{i}", tmp_path / ("r4" if i < 70 else "r2"))
    assert all(layer.bank.pool is pool for layer, pool in zip((base[0], base[2]), pools))  # not reallocated
    assert [len(layer.bank.free) for layer in (base[0], base[2])] == [0, 0]


def test_a_batch_on_one_adapter_reads_its_rows_without_a_gather(saved, monkeypatch) -> None:
    """Every example on one adapter (or none): that adapter's own products on its rows (a view), no gather."""
    from torch_singlora import functional

    folder, model, base = saved
    bank = AdapterBank(base, max_rank=5)
    for name in "abc":
        bank.load(name, folder / name)
    gathers = []
    real = functional.gather_rows
    monkeypatch.setattr(functional, "gather_rows", lambda *args: gathers.append(args) or real(*args))
    ids = torch.randint(0, 30, (3, 7))
    with torch.no_grad():
        plain = base(ids)
        for name in "abc":
            with bank.use([name] * 3):
                out = base(ids)
            assert_close(out, run_alone(model, name, ids), dtype=torch.float32)
        with bank.use(["__base__"] * 3):
            assert torch.equal(base(ids), plain)
    assert not gathers
    with torch.no_grad(), bank.use(["a", "b", "a"]):
        base(ids)
    assert gathers  # a mixed batch does gather (the count above could fail)
    held = base.up.bank.shared(bank.adapters["a"].id, base.up.d_out, base.up.d_in).At
    assert held.data_ptr() != base.up.bank.pool.data_ptr() and held._base is base.up.bank.pool  # a view


def test_the_storage_and_selection_are_declared_on_the_layers(saved) -> None:
    """The bank's storage is a declared submodule of ``SingLoRALayer``; one selection object is attached to every
    module the bank wraps when it wraps it, and a call only activates it."""
    from torch_singlora.layers import SingLoRALayer

    assert "bank" in SingLoRALayer(nn.Linear(3, 3))._modules  # declared (None until create_bank)
    folder, _, base = saved
    bank = AdapterBank(base)
    bank.load("a", folder / "a")
    wrapped = [m for m in base.modules() if hasattr(m, "selection")]
    assert len(wrapped) == 6 and all(m.selection is wrapped[0].selection for m in wrapped)
    selection = wrapped[0].selection
    with bank.use(["a", "__base__"]):
        assert selection.active and selection.ids.tolist() == [bank.adapters["a"].id, 0]
    assert not selection.active and all(m.selection is selection for m in wrapped)


def test_compiled_model_never_recompiles_across_load_swap_unload(saved) -> None:
    folder, model, base = saved
    torch._dynamo.reset()
    bank = AdapterBank(base, max_rank=5, capacity=4)
    bank.load("a", folder / "a")
    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(base, backend=counting_backend)
    ids = torch.randint(0, 30, (3, 7))
    steps = [(["a", "a", "__base__"], None), (["b", "a", "b"], ("load", "b")), (["c", "b", "a"], ("load", "c")),
             (["a", "c", "b"], ("swap", "a", "c")), (["__base__", "c", "b"], ("unload", "a"))]
    with torch.no_grad():
        for names, change in steps:
            if change and change[0] == "load":
                bank.load(change[1], folder / change[1])
            elif change and change[0] == "swap":
                bank.swap(change[1], folder / change[2])
            elif change:
                bank.unload(change[1])
            with bank.use(names):
                out = compiled(ids)
            model_names = [("c" if n == "a" and change and change[0] == "swap" else n) for n in names]
            for i, name in enumerate(model_names):
                assert_close(out[i], run_alone(model, name, ids[i : i + 1])[0], dtype=torch.float32)
    assert len(graphs) == 1, f"{len(graphs)} graphs were compiled"


def test_refusals_change_nothing(saved, tmp_path) -> None:
    folder, _, base = saved
    bank = AdapterBank(base, max_rank=3)
    bank.load("a", folder / "a")
    before = {k: v.clone() for k, v in base.up.bank.named_buffers()}
    assert set(before) == {"pool", "table", "coefficients"}
    with pytest.raises(SingLoRAError, match="r=5 .* exceeds this bank's max_rank=3"):
        bank.load("b", folder / "b")
    with pytest.raises(SingLoRAError, match="already loaded"):
        bank.load("a", folder / "c")
    with pytest.raises(SingLoRAError, match="not a directory"):
        bank.load("x", tmp_path / "missing")
    with pytest.raises(SingLoRAError, match="not loaded"):
        bank.swap("b", folder / "c")
    with pytest.raises(SingLoRAError, match="must be a non-empty string"):
        bank.load("__base__", folder / "c")
    with_head = [n for n in "abc" if json.loads((folder / n / "adapter_config.json").read_text())["modules_to_save"]]
    with pytest.raises(SingLoRAError, match="needs a name without '.'"):  # its saved-module copies are keyed by it
        bank.load("x.v2", folder / with_head[0])
    assert list(bank.adapters) == ["a"]
    for key, value in base.up.bank.named_buffers():
        assert torch.equal(value, before[key])
    base.train()
    with pytest.raises(SingLoRAError, match="eval"):
        bank.use(["a"])
    with pytest.raises(SingLoRAError, match="plain base model"):
        AdapterBank(base)


class TiedNet(nn.Module):
    """Three Linear layers; the last one's weight is also held by a module outside the forward (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.tied = nn.Linear(6, 10), nn.Linear(10, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.tied.weight = self.c.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(torch.tanh(self.a(x))))


def test_one_adapter_steps_on_a_plain_linear_run_one_gemm(tmp_path) -> None:
    """A plain Linear's weight moves (once, values kept) into a buffer with spare rows; a batch on one adapter runs
    the base product and ``x @ A_in`` as one GEMM (its output: a view of that GEMM's first ``d_out`` columns),
    adapter after adapter, equal to the adapter alone; a tied weight is never moved; after ``.to()`` moved the
    weight the layer drops the buffer and takes the separate products."""
    torch.manual_seed(0)
    base = TiedNet().eval()
    model = get_singlora_model(copy.deepcopy(base), SingLoRAConfig(
        r=2, target_modules=["a", "b", "c"], init="gaussian", init_std=0.5), "a")
    model.add_adapter("b", SingLoRAConfig(r=3, target_modules=["a", "b", "c"], init="gaussian", init_std=0.5))
    for name in "ab":
        model.save_adapter(tmp_path / name, name)
    model.eval()
    bank = AdapterBank(base)
    for name in "ab":
        bank.load(name, tmp_path / name)
    assert base.a.bank.fused is not None and base.b.bank.fused is not None and base.c.bank.fused is None
    x = torch.randn(4, 6)
    with torch.no_grad():
        for name in "abab":  # the spare rows follow the step's adapter
            with bank.use([name] * 4):
                hidden = base.a(x)
                assert hidden._base is not None and hidden.stride(0) == 10 + {"a": 2, "b": 3}[name]
                out = base(x)
            assert_close(out, run_alone(model, name, x), dtype=torch.float32)
        base.double()  # moves every weight: the fused buffers are dropped at the next step
        with bank.use(["b"] * 4):
            out = base(x.double())
        assert base.a.bank.fused is None
        assert_close(out, run_alone(model.double(), "b", x.double()), dtype=torch.float32)
