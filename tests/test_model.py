"""Model surgery, named adapters, ramp by optimizer steps, merging and unloading."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, dense_update
from toy_models import IDS, Toy, toy
from torch import nn

from torch_singlora import SingLoRAConfig, SingLoRAError, get_singlora_model


def reference_forward(model: Toy, adapted, ids: torch.Tensor) -> torch.Tensor:
    """Dense float64 forward of the adapted Toy: every targeted weight + c * (A A^T)[:out, :in]."""
    weights = {}
    for name, layer in adapted.singlora_layers():
        adapter = layer.singlora["default"]
        T = adapter.ramp_up_steps
        c = adapter.scale * (1.0 if T == 0 else min(int(adapter.ramp_step) / T, 1.0))
        weights[name] = layer.base_layer.weight.detach() + dense_update(adapter.A.detach(), layer.d_out, layer.d_in, c)
    get = lambda n: weights.get(n, getattr(model, n).weight)  # noqa: E731
    base = lambda n: getattr(model, n).base_layer if n in weights else getattr(model, n)  # noqa: E731
    h = get("embed")[ids]
    h = torch.tanh(F.linear(h, get("up"), base("up").bias))
    h = F.linear(F.linear(h, get("down"), base("down").bias), get("square"), base("square").bias)
    head = model.head.active_module() if hasattr(model.head, "active_module") else model.head
    return head(h.mean(1))


def make(ramp_up_steps: int = 0, **kwargs):
    config = SingLoRAConfig(r=3, alpha=6, target_modules=["embed", "up", "down", "square"], ramp_up_steps=ramp_up_steps, **kwargs)
    model = toy()
    return model, get_singlora_model(model, config)


def test_forward_matches_dense_reference() -> None:
    model, adapted = make()
    assert_close(adapted(IDS), reference_forward(model, adapted, IDS))


def test_injection_freezes_everything_but_adapters_and_saved_modules() -> None:
    model, adapted = make(modules_to_save=["head"])
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == {f"model.{m}.singlora.default.A" for m in ("embed", "up", "down", "square")} | {
        "model.head.copies.default.weight", "model.head.copies.default.bias"}
    expected = sum(max(a, b) * 3 for a, b in [(11, 6), (10, 6), (10, 6), (6, 6)]) + 6 * 3 + 3
    assert adapted.get_nb_trainable_parameters()[0] == expected


def test_gradients_flow_only_to_A_and_base_unchanged_after_steps() -> None:
    model, adapted = make(ramp_up_steps=2)
    before = {k: v.clone() for k, v in model.state_dict().items() if "singlora" not in k}
    optimizer = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.1)
    adapted.bind_optimizer(optimizer)
    As = [layer.singlora["default"].A for _, layer in adapted.singlora_layers()]
    A_before = [A.detach().clone() for A in As]
    for _ in range(3):
        optimizer.zero_grad()
        adapted(IDS).square().sum().backward()
        for name, p in adapted.named_parameters():
            assert (p.grad is not None) == p.requires_grad, name
        optimizer.step()
    after = {k: v for k, v in model.state_dict().items() if "singlora" not in k}
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(not torch.equal(A, A0) for A, A0 in zip(As, A_before))  # u > 0 after step 1: A learns


def test_u_zero_at_step_zero_equals_base_exactly() -> None:
    model = toy()
    expected = model(IDS)
    adapted = get_singlora_model(model, SingLoRAConfig(target_modules="all-linear", ramp_up_steps=10, r=2))
    assert torch.equal(adapted(IDS), expected)


def test_ramp_counts_optimizer_steps_under_accumulation_and_checkpointing() -> None:
    model = Toy(checkpointing=True).double()
    adapted = get_singlora_model(model, SingLoRAConfig(r=2, target_modules=["up", "down"], ramp_up_steps=8))
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-3)
    adapted.bind_optimizer(optimizer)
    accumulation, optimizer_steps = 4, 3
    forwards = 0
    for _ in range(optimizer_steps):
        for _ in range(accumulation):
            (adapted(IDS).sum() / accumulation).backward()  # checkpointing runs each forward twice
            forwards += 1
        optimizer.step()
        optimizer.zero_grad()
    assert forwards == 12
    assert adapted.get_ramp_step() == optimizer_steps
    for _, layer in adapted.singlora_layers():
        assert int(layer.singlora["default"].ramp_step) == optimizer_steps
        assert float(layer.singlora["default"].coefficient()) == pytest.approx(8 / 2 * 3 / 8)  # s = alpha / r, u = 3 / 8


def test_fractional_ramp_resolves_against_total_steps() -> None:
    _, adapted = make(ramp_up_steps=0.1, total_steps=50)
    assert all(layer.singlora["default"].ramp_up_steps == 5 for _, layer in adapted.singlora_layers())


def test_merge_unmerge_merge_and_unload_agree_and_strict_load() -> None:
    model, adapted = make(ramp_up_steps=4)
    adapted.set_ramp_step(3)
    unmerged = adapted(IDS)
    adapted.merge()
    merged_weights = {k: v.clone() for k, v in model.state_dict().items()}
    adapted.merge()  # twice: a no-op
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in merged_weights.items())
    assert_close(adapted(IDS), unmerged)
    adapted.unmerge()
    adapted.unmerge()
    assert_close(adapted(IDS), unmerged)
    plain = adapted.merge_and_unload()
    assert type(plain.up) is nn.Linear and type(plain.embed) is nn.Embedding
    fresh = toy()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert_close(fresh(IDS), unmerged)


def test_unload_returns_original_modules_and_weights() -> None:
    model = toy()
    originals = {n: m for n, m in model.named_children()}
    state = copy.deepcopy(model.state_dict())
    adapted = get_singlora_model(model, SingLoRAConfig(r=2, target_modules="all-linear", ramp_up_steps=0))
    adapted.merge()
    plain = adapted.unload()
    assert all(getattr(plain, n) is m for n, m in originals.items())
    for key, value in state.items():
        assert_close(plain.state_dict()[key], value)


def test_unload_gives_back_the_original_modules_to_save_module_merge_and_unload_the_trained_copy() -> None:
    """unload() removes every adapter: the model is the base model again, the head included (PEFT 0.21's unload()
    keeps the trained copy instead). merge_and_unload() keeps what was trained: the copy."""
    results = {}
    for method in ("unload", "merge_and_unload"):
        model = toy()
        original = model.head
        weight = original.weight.detach().clone()
        adapted = get_singlora_model(model, SingLoRAConfig(r=2, target_modules=["up"], modules_to_save=["head"],
                                                           ramp_up_steps=0))
        trained = adapted.model.head.copies["default"]
        with torch.no_grad():
            trained.weight.add_(1.0)
        results[method] = (getattr(adapted, method)().head, original, trained, weight)
    head, original, _, weight = results["unload"]
    assert head is original and torch.equal(head.weight, weight)
    head, _, trained, weight = results["merge_and_unload"]
    assert head is trained and torch.equal(head.weight, weight + 1.0)


def test_merge_unmerge_cycles_float32_stay_bounded() -> None:
    model = Toy().float()
    adapted = get_singlora_model(model, SingLoRAConfig(r=3, target_modules="all-linear", ramp_up_steps=0))
    original = {k: v.clone() for k, v in model.state_dict().items() if "base_layer.weight" in k}
    for _ in range(1000):
        adapted.merge()
        adapted.unmerge()
    drift = max((model.state_dict()[k] - v).abs().max().item() for k, v in original.items())
    assert drift < 1e-5  # stated bound: 1e-5 absolute after 1,000 float32 cycles


def test_safe_merge_refuses_non_finite_and_leaves_weights() -> None:
    model, adapted = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        adapted.model.square.singlora["default"].A[0, 0] = float("inf")
    with pytest.raises(SingLoRAError, match="square.*non-finite"):
        adapted.merge(safe=True)
    for key, value in before.items():
        if "singlora" not in key:
            assert torch.equal(model.state_dict()[key], value), key
    assert all(not layer.merged_adapters for _, layer in adapted.singlora_layers())


def test_named_adapters_add_set_delete_disable() -> None:
    model, adapted = make()
    with adapted.disable_adapters():
        base_output = adapted(IDS)
    out_default = adapted(IDS)
    adapted.add_adapter("other", SingLoRAConfig(r=2, target_modules=["up"], ramp_up_steps=0))
    assert adapted.active_adapters == ["default"]
    assert not adapted.model.up.singlora["other"].A.requires_grad
    assert torch.equal(adapted(IDS), out_default)
    adapted.set_adapter("other")
    assert adapted.model.up.singlora["other"].A.requires_grad
    assert not adapted.model.up.singlora["default"].A.requires_grad
    assert adapted.model.down.active_adapters == []
    up = adapted.model.up
    other = up.base_layer.weight + dense_update(up.singlora["other"].A.detach(), 10, 6, 8 / 2)
    expected = toy()
    expected.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if "singlora" not in k})
    with torch.no_grad():
        expected.up.weight.copy_(other)
    assert_close(adapted(IDS), expected(IDS))
    adapted.set_adapter(["default", "other"])
    with adapted.disable_adapters():
        assert_close(adapted(IDS), base_output)
    adapted.delete_adapter("other")
    assert "other" not in adapted.configs and adapted.active_adapters == ["default"]
    assert torch.equal(adapted(IDS), out_default)
    adapted.delete_adapter("default")
    assert type(model.up) is nn.Linear
    with pytest.raises(SingLoRAError, match="does not exist"):
        adapted.set_adapter("default")


def test_disable_adapters_with_merged_weights_restores_merge() -> None:
    model, adapted = make()
    out = adapted(IDS)
    with adapted.disable_adapters():
        base_output = adapted(IDS)
    adapted.merge()
    with adapted.disable_adapters():
        assert_close(adapted(IDS), base_output)
    assert all(layer.merged_adapters == ["default"] for _, layer in adapted.singlora_layers())
    assert_close(adapted(IDS), out)


def test_rank_and_alpha_patterns() -> None:
    config = SingLoRAConfig(r=2, alpha=4, target_modules=["up", "down"], rank_pattern={"up": 5}, alpha_pattern={"down": 1.0})
    adapted = get_singlora_model(toy(), config)
    assert adapted.model.up.singlora["default"].A.shape == (10, 5)
    assert adapted.model.up.singlora["default"].scale == pytest.approx(4 / 5)
    assert adapted.model.down.singlora["default"].scale == pytest.approx(1.0 / 2)


def test_bad_adapter_names() -> None:
    _, adapted = make()
    with pytest.raises(SingLoRAError, match="already exists"):
        adapted.add_adapter("default", SingLoRAConfig(target_modules=["up"]))
    with pytest.raises(SingLoRAError, match="needs a name without '.'"):
        adapted.add_adapter("a.b", SingLoRAConfig(target_modules=["up"]))
    with pytest.raises(SingLoRAError, match="SingLoRAConfig"):
        adapted.add_adapter("x", {"r": 2})
    with pytest.raises(SingLoRAError, match="ramp_step=-1"):
        adapted.set_ramp_step(-1)
