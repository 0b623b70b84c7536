"""The per-module plan (kind, d_out, d_in, n, r, scale), derived once and read by injection, file checks and export;
and the one "most common rank + rank_pattern" rule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from torch_singlora import SingLoRAConfig, SingLoRAError, get_singlora_model
from torch_singlora.combine import combine_adapters
from torch_singlora.config import rank_and_pattern
from torch_singlora.export import collect_lora_factors, peft_config
from torch_singlora.plan import plan_adapter


def _tree() -> nn.Module:
    tree = nn.Module()
    tree.wide = nn.Linear(12, 5)  # (out, in) = (5, 12)
    tree.block = nn.Module()
    tree.block.tall = nn.Linear(3, 9)
    tree.conv = nn.Conv2d(2, 4, (3, 2))  # matrix view (4, 2 * 3 * 2)
    tree.emb = nn.Embedding(20, 6)
    tree.gpt = Conv1D(7, 4)  # transformers Conv1D(nf=out, nx=in): weight stored (in, out) = (4, 7)
    tree.head = nn.Linear(5, 2)
    return tree


CONFIG = SingLoRAConfig(r=3, alpha=6.0, target_modules=["wide", "tall", "conv", "emb", "gpt"], modules_to_save=["head"],
                        rank_pattern={"conv": 2}, alpha_pattern={"emb": 1.5}, use_rslora=True, ramp_up_steps=0.1,
                        total_steps=30)
# Written out by hand: (kind, weight_shape, d_out, d_in, n, r, alpha); rsLoRA scale = alpha / sqrt(r).
EXPECTED = {
    "wide": ("linear", (5, 12), 5, 12, 12, 3, 6.0),
    "block.tall": ("linear", (9, 3), 9, 3, 9, 3, 6.0),
    "conv": ("conv", (4, 2, 3, 2), 4, 12, 12, 2, 6.0),
    "emb": ("embedding", (20, 6), 20, 6, 20, 3, 1.5),
    "gpt": ("conv1d_t", (4, 7), 7, 4, 7, 3, 6.0),
}


def _check(plan) -> None:
    assert list(plan.modules) == list(EXPECTED)
    for name, (kind, shape, d_out, d_in, n, r, alpha) in EXPECTED.items():
        m = plan.modules[name]
        assert (m.kind, m.weight_shape, m.d_out, m.d_in, m.n, m.r) == (kind, shape, d_out, d_in, n, r), name
        assert m.scale == pytest.approx(alpha / math.sqrt(r)), name
    assert plan.saved_modules == ("head",)
    assert plan.saved_tensors == {"head.weight": ((2, 5), torch.float32), "head.bias": ((2,), torch.float32)}
    assert plan.ramp_up_steps == 3


def test_plan_is_derived_without_changing_the_model_and_drives_injection() -> None:
    tree = _tree()
    state = {k: v.clone() for k, v in tree.state_dict().items()}
    structure = [(n, type(m)) for n, m in tree.named_modules()]
    plan = plan_adapter(tree, CONFIG)
    _check(plan)
    assert [(n, type(m)) for n, m in tree.named_modules()] == structure
    assert all(torch.equal(tree.state_dict()[k], v) for k, v in state.items())
    assert all(p.requires_grad for p in tree.parameters())
    model = get_singlora_model(tree, CONFIG)
    for name, m in plan.modules.items():
        adapter = model.model.get_submodule(name).singlora["default"]
        assert tuple(adapter.A.shape) == (m.n, m.r) and adapter.scale == m.scale and adapter.ramp_up_steps == 3
    _check(plan_adapter(model.model, CONFIG))  # the same plan on a model that already holds adapters


@pytest.mark.parametrize(
    "module,r,match",
    [(nn.Linear(3, 4), 5, "module 'm': r=5 exceeds n=max\\(d_out=4, d_in=3\\)=4"),
     (nn.Conv2d(4, 4, 3, groups=2), 1, "module 'm': .*groups=2; SingLoRA supports groups=1 only")],
)
def test_plan_refuses_naming_the_module(module: nn.Module, r: int, match: str) -> None:
    tree = nn.Module()
    tree.m = module
    with pytest.raises(SingLoRAError, match=match):
        plan_adapter(tree, SingLoRAConfig(r=r, target_modules=["m"]))


def test_export_from_a_directory_uses_the_plan_not_a_model(tmp_path) -> None:
    model = get_singlora_model(_tree(), CONFIG)
    model.set_ramp_step(2)
    model.save_adapter(tmp_path)
    base = _tree()
    before = [(n, type(m)) for n, m in base.named_modules()]
    exported = collect_lora_factors(tmp_path, base)
    assert [(n, type(m)) for n, m in base.named_modules()] == before
    for name, (kind, _, d_out, d_in, _, r, alpha) in EXPECTED.items():
        factors = exported.factors[name]
        A = model.model.get_submodule(name).singlora["default"].A.detach().double()
        c = alpha / math.sqrt(r) * 2 / 3  # u = t / T = 2 / 3
        torch.testing.assert_close((factors.lora_B @ factors.lora_A).double(), c * A[:d_out] @ A[:d_in].T)


@pytest.mark.parametrize("ranks,expected", [
    ({"a": 4, "b": 8}, (4, {"b": 8})), ({"b": 8, "a": 4}, (4, {"b": 8})),  # a tie: the smaller rank
    ({"x.1": 2, "x.2": 6, "x.3": 6}, (6, {r"x\.1": 2})), ({}, (1, {})),
])
def test_rank_and_pattern(ranks: dict, expected: tuple) -> None:
    assert rank_and_pattern(ranks) == expected


def test_combine_and_export_agree_on_the_rank_whatever_the_order() -> None:
    """A tie between ranks 4 and 8: combine (max over a set) and the PEFT export (first most common) broke it
    differently; both now use rank_and_pattern."""
    for order in (("p", "q"), ("q", "p")):
        base = nn.Module()
        base.p, base.q = nn.Linear(8, 8), nn.Linear(8, 8)
        ranks = {"p": 4, "q": 8}
        model = get_singlora_model(base, SingLoRAConfig(r=ranks[order[0]], target_modules=[order[0]], ramp_up_steps=0))
        model.add_adapter("two", SingLoRAConfig(r=ranks[order[1]], target_modules=[order[1]], ramp_up_steps=0))
        config = combine_adapters(model, {"default": 1.0, "two": 1.0}, "sum")
        model.set_adapter("sum")
        exported = peft_config(collect_lora_factors(model, adapter_name="sum"))
        assert (config.r, config.rank_pattern) == (exported["r"], exported["rank_pattern"]) == (4, {"q": 8}), order
