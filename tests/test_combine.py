"""Weighted combination of adapters: exact for weights >= 0, refused for negative weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_close, dense_update, expected_coefficient
from torch_singlora import SingLoRAConfig, SingLoRAError, SingLoRAModel, get_singlora_model
from torch_singlora.combine import combine_adapters


def _model() -> SingLoRAModel:
    base = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 4)).double()
    model = get_singlora_model(base, SingLoRAConfig(r=2, alpha=3.0, target_modules=["0", "2"], ramp_up_steps=8), "a")
    model.add_adapter("b", SingLoRAConfig(r=3, alpha=1.0, target_modules=["2", "4"], ramp_up_steps=0))
    with torch.no_grad():
        for _, layer in model.singlora_layers():
            for adapter in layer.singlora.values():
                adapter.A.normal_()
    model.set_ramp_step(2, "a")
    return model


def test_combination_is_the_weighted_sum_of_updates(tmp_path) -> None:
    model = _model()
    weights = {"a": 0.7, "b": 2.0}
    combine_adapters(model, weights, "ab")
    coefficients = {"a": expected_coefficient(2, 3.0, 2, 8), "b": expected_coefficient(3, 1.0, 0, 0)}
    for name, layer in model.singlora_layers():
        expected = sum(
            weights[a] * dense_update(layer.singlora[a].A, layer.d_out, layer.d_in, coefficients[a])
            for a in weights if a in layer.singlora
        )
        assert_close(layer.get_delta_weight("ab"), expected)
        ranks = [layer.singlora[a].A.shape[1] for a in weights if a in layer.singlora]
        assert layer.singlora["ab"].A.shape[1] == sum(ranks)
    # Unit weights: the combined adapter runs like both sources active together; it saves and loads as any adapter.
    combine_adapters(model, {"a": 1.0, "b": 1.0}, "sum")
    x = torch.randn(5, 6, dtype=torch.float64)
    model.set_adapter(["a", "b"])
    both = model(x)
    model.set_adapter("sum")
    assert_close(model(x), both)
    model.set_adapter("ab")
    combined = model(x)
    model.save_adapter(tmp_path, "ab")
    again = SingLoRAModel.from_pretrained(model.unload(), tmp_path)
    assert_close(again(x), combined)


def test_negative_and_bad_weights_are_refused() -> None:
    model = _model()
    with pytest.raises(SingLoRAError, match="negative weights is indefinite"):
        combine_adapters(model, {"a": 1.0, "b": -0.5}, "ab")
    with pytest.raises(SingLoRAError, match="does not exist"):
        combine_adapters(model, {"zzz": 1.0}, "ab")
    with pytest.raises(SingLoRAError, match="at least one weight"):
        combine_adapters(model, {"a": 0.0}, "ab")
    assert "ab" not in model.configs
