"""Names and matching (``torch_singlora.names``): the adapter-name rule, walking a model through singlora's wrappers,
and what a config selects."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close
from toy_models import toy
from torch import nn

from torch_singlora import SingLoRAConfig, SingLoRAError, SingLoRALayer, get_singlora_model
from torch_singlora.mixed import BASE
from torch_singlora.names import check_adapter_name, resolve, walk_adaptable


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def test_base_is_reserved_so_a_mixed_batch_runs_the_base_model_for_it(tmp_path) -> None:
    """``SingLoRAModel.add_adapter("__base__", ...)`` used to be accepted (the bank and the server refused the name):
    in a mixed batch that adapter then ran for the examples that asked for the base model. Every way of naming an
    adapter now refuses it, changing nothing, and a ``"__base__"`` example gives the base model's output."""
    base = _net()
    reference = copy.deepcopy(base)  # the base model, never wrapped
    config = SingLoRAConfig(r=2, target_modules=["0", "2"], ramp_up_steps=0)
    model = get_singlora_model(base, config, "a")
    with torch.no_grad():
        for layer in (model.model[0], model.model[2]):
            layer.singlora["a"].A.normal_()  # a visible update (A ~ N(0, 1/n) alone is small)
    model.save_adapter(tmp_path / "a")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    message = "adapter name '__base__' must be a non-empty string other than '__base__' \\(reserved"
    for add in (lambda: model.add_adapter(BASE, config), lambda: model.load_adapter(tmp_path / "a", BASE),
                lambda: get_singlora_model(_net(), config, BASE)):
        with pytest.raises(SingLoRAError, match=message):
            add()
    assert list(model.configs) == ["a"] and model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    model.eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        mixed = model(x, adapter_names=[BASE, "a", BASE, "a"])
        alone = model(x)
    assert_close(mixed[[0, 2]], reference(x[[0, 2]]))
    assert_close(mixed[[1, 3]], alone[[1, 3]])
    assert not torch.allclose(alone, reference(x))  # the adapter does change the output


@pytest.mark.parametrize("name, dots, message", [
    ("", False, "must be a non-empty string"), (3, True, "must be a non-empty string"),
    (BASE, True, "other than '__base__'"), ("a.b", False, "needs a name without '.'"),
])
def test_adapter_name_rule(name, dots, message) -> None:
    with pytest.raises(SingLoRAError, match=message):
        check_adapter_name(name, dots=dots)
    assert check_adapter_name("a.b", dots=True) == "a.b" and check_adapter_name("customer-1") == "customer-1"


def test_an_adapted_model_is_walked_as_its_user_sees_it() -> None:
    """Once a module is wrapped, its insides (``base_layer``, the adapters) are not modules a config can name: they
    are neither walked nor offered in the error's list of candidates (they used to be: ``'base_layer'``)."""
    plain = _net()
    model = get_singlora_model(_net(), SingLoRAConfig(r=1, target_modules=["0"], modules_to_save=["2"]), "a")
    walked = dict(walk_adaptable(model.model))
    assert list(walked) == [name for name, _ in plain.named_modules()]
    assert walked["0"] is model.model[0].base_layer and walked["2"] is model.model[2].original_module
    with pytest.raises(SingLoRAError, match=r"'nope' matches no module; adaptable modules end in \['0', '2'\]$"):
        model.add_adapter("b", SingLoRAConfig(r=1, target_modules=["nope"]))
    assert resolve(model.model, SingLoRAConfig(r=1, target_modules=["0"])).modules == ["0"]  # a second adapter


def test_exclude_and_regex_targets() -> None:
    adapted = get_singlora_model(toy(), SingLoRAConfig(r=2, target_modules=r"(up|down)", exclude_modules=["down"]))
    assert [n for n, _ in adapted.singlora_layers()] == ["up"]
    adapted = get_singlora_model(toy(), SingLoRAConfig(r=2, target_modules="all-linear", modules_to_save=["head"]))
    assert sorted(n for n, _ in adapted.singlora_layers()) == ["down", "square", "up"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"target_modules": ["nope"]}, "'nope' matches no module"),
        ({"target_modules": ["up", "nope"]}, "'nope' matches no module"),
        ({"target_modules": "zz.*"}, "matches no module"),
        ({"target_modules": ["up"], "exclude_modules": ["up"]}, "matches no module"),
        ({"target_modules": ["up"], "r": 11}, "module 'up': r=11 exceeds n"),
        ({"target_modules": ["up"], "modules_to_save": ["missing"]}, "'missing' matches no module"),
        ({"target_modules": ["up"], "rank_pattern": {"down": 2}}, "rank_pattern key 'down'"),
    ],
)
def test_bad_targets_are_clear_errors_and_change_nothing(kwargs: dict, match: str) -> None:
    model = toy()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SingLoRAError, match=match):
        get_singlora_model(model, SingLoRAConfig(**kwargs))
    assert all(type(m) is not SingLoRALayer for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_error_lists_candidates() -> None:
    with pytest.raises(SingLoRAError, match=r"adaptable modules end in \['down', 'embed', 'head', 'square', 'up'\]"):
        get_singlora_model(toy(), SingLoRAConfig(target_modules=["q_proj"]))


def test_a_string_target_is_a_full_match_regex_and_the_error_says_so() -> None:
    tree = nn.Module()
    tree.block = nn.Module()
    tree.block.q_proj = nn.Linear(4, 4)
    with pytest.raises(SingLoRAError, match=(
            r"target_modules='q_proj' matches no module: a string is a regex that must match the whole module name "
            r"\(e.g. 'block.q_proj'\); to match names or dotted suffixes pass a list: target_modules=\['q_proj'\]")):
        get_singlora_model(tree, SingLoRAConfig(r=1, target_modules="q_proj"))
    adapted = get_singlora_model(tree, SingLoRAConfig(r=1, target_modules=["q_proj"]))  # the list form works
    assert [n for n, _ in adapted.singlora_layers()] == ["block.q_proj"]


def test_unsupported_target_type() -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(3, 3))

    with pytest.raises(SingLoRAError, match="'block' is a Sequential"):
        get_singlora_model(Outer(), SingLoRAConfig(r=1, target_modules=["block"]))
