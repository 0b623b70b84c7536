"""``AdapterBank``: many adapters resident on one base model. Each example of a mixed batch equals the same adapter
loaded alone by ``SingLoRAModel`` (every layer kind, saved modules); hundreds of adapters cost exactly their ``A``
matrices; unload frees and reuses slots; swap writes in place; a compiled model never recompiles; refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_close
from helpers import NAMES, EveryKind, add_three_adapters, run_alone
from torch import nn

from torch_singlora import SingLoRAConfig, SingLoRAError, get_singlora_model
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


def test_hundreds_of_adapters_cost_their_A_matrices_only(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 40)).eval()  # square + rectangular
    model = get_singlora_model(copy.deepcopy(base), SingLoRAConfig(r=4, target_modules=["0", "2"]))
    model.save_adapter(tmp_path / "one")
    base_bytes = {k: v.data_ptr() for k, v in base.state_dict().items()}
    bank = AdapterBank(base, capacity=300)
    for i in range(300):
        bank.load(f"user{i}", tmp_path / "one")
    memory = bank.memory()
    assert memory["adapters"] == 300
    assert memory["per_adapter"]["user7"] == {"singlora": (16 * 4 + 40 * 4) * 4, "stored": (16 * 4 + 40 * 4) * 4,
                                             "lora": ((16 + 16) * 4 + (16 + 40) * 4) * 4, "saved": 0}
    # per layer: 300 slots + the zero slot of A and of the coefficients, the slot table; nothing else
    tables = sum(layer.bank.slots.numel() * 8 for layer in (base[0], base[2]))
    assert tables <= 2 * 2 * 301 * 8
    assert memory["allocated"] == 301 * (16 + 40) * 4 * 4 + 2 * 301 * 4 + tables
    assert [p.data_ptr() for p in base.parameters()] == list(base_bytes.values())  # the base weights, not copied
    x = torch.randn(3, 16)
    with torch.no_grad(), bank.use(["user0", "user299", "__base__"]):
        out = base(x)
    with torch.no_grad():
        assert_close(out[0], model(x[:1])[0], dtype=torch.float32)
        assert_close(out[1], model(x[1:2])[0], dtype=torch.float32)
        with model.disable_adapters():
            assert_close(out[2], model(x[2:])[0], dtype=torch.float32)


def test_unload_frees_and_reuses_slots_swap_writes_in_place(saved) -> None:
    folder, model, base = saved
    bank = AdapterBank(base, max_rank=5, capacity=3)
    for name in "abc":
        bank.load(name, folder / name)
    up = base.up.bank
    buffer, slot_a = up.A.data_ptr(), int(up.slots[bank.adapters["a"].id])
    bank.unload("a")
    assert up.A[slot_a].abs().sum() == 0 and "a" not in base.head.copies
    bank.load("d", folder / "c")  # takes a's freed id and slot
    assert int(up.slots[bank.adapters["d"].id]) == slot_a
    bank.swap("c", folder / "b")  # c now holds b's weights (other rank, targets, a saved head)
    bank.swap("b", folder / "a")  # rank 5 -> 2: the old columns must not stay
    assert up.A.data_ptr() == buffer  # nothing reallocated
    ids = torch.randint(0, 30, (3, 7))
    with torch.no_grad(), bank.use(["c", "d", "b"]):
        out = base(ids)
    with torch.no_grad():
        assert_close(out[0], run_alone(model, "b", ids[:1])[0], dtype=torch.float32)
        assert_close(out[1], run_alone(model, "c", ids[1:2])[0], dtype=torch.float32)
        assert_close(out[2], run_alone(model, "a", ids[2:])[0], dtype=torch.float32)
    with pytest.raises(SingLoRAError, match="unknown adapter.*'a'"), bank.use(["a"]):
        pass


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
    with pytest.raises(SingLoRAError, match="eval"), bank.use(["a"]):
        pass
    with pytest.raises(SingLoRAError, match="plain base model"):
        AdapterBank(base)
