"""SingLoRAConfig validation: every bad field is a SingLoRAError naming the field and the value."""

from __future__ import annotations

import pytest

from torch_singlora import SingLoRAConfig, SingLoRAError


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r": 0}, "r=0"),
        ({"r": -2}, "r=-2"),
        ({"r": 2.5}, "r=2.5"),
        ({"r": True}, "r=True"),
        ({"alpha": 0}, "alpha=0"),
        ({"alpha": float("nan")}, "alpha=nan"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"ramp_up_steps": -1}, "ramp_up_steps=-1"),
        ({"ramp_up_steps": 1.5}, "ramp_up_steps=1.5"),
        ({"ramp_up_steps": "10"}, "ramp_up_steps='10'"),
        ({"total_steps": 0}, "total_steps=0"),
        ({"init": "xavier"}, "init='xavier'"),
        ({"init": "gaussian"}, "init_std=None"),
        ({"init_std": 0.1}, "init_std=0.1 is only used"),
        ({"target_modules": []}, "target_modules=\\[\\] is empty"),
        ({"target_modules": ""}, "target_modules='' is empty"),
        ({"target_modules": "(("}, "not a valid regex"),
        ({"target_modules": [1]}, "target_modules=\\[1\\]"),
        ({"modules_to_save": "head"}, "modules_to_save='head'"),
        ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\]=0"),
        ({"alpha_pattern": {"q": -1}}, r"alpha_pattern\['q'\]=-1"),
        ({"use_rslora": 1}, "use_rslora=1"),
    ],
)
def test_bad_fields(kwargs: dict, match: str) -> None:
    with pytest.raises(SingLoRAError, match=match):
        SingLoRAConfig(**kwargs)


def test_round_trip_and_unknown_fields() -> None:
    config = SingLoRAConfig(r=4, alpha=16, target_modules=["q"], ramp_up_steps=0.02, total_steps=1000, use_rslora=True)
    assert SingLoRAConfig.from_dict(config.to_dict()) == config
    assert config.resolve_ramp_up_steps() == 20
    assert config.scale_for("x.q") == pytest.approx(16 / 2)  # rsLoRA: alpha / sqrt(r)
    with pytest.raises(SingLoRAError, match=r"cfg.json: unknown config field\(s\) \['rank'\]"):
        SingLoRAConfig.from_dict({"rank": 4}, source="cfg.json")
