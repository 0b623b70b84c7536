"""The ramp u = min(t / T, 1): one vocabulary (t = ramp_step, T = ramp_up_steps, u = ramp_value), one parser of
"steps or a fraction of the total", and the model's public accessors (``SingLoRAModel``'s ramp controls)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from torch_singlora import SingLoRAConfig, SingLoRAError, SingLoRAModel, get_singlora_model
from torch_singlora.config import parse_steps_or_fraction, resolve_steps


@pytest.mark.parametrize(
    "text,expected",
    [("100", 100), (" 7 ", 7), ("0", 0), ("0.01", 0.01), ("1e-2", 0.01), ("1.0", 1.0), ("0.0", 0.0), (".5", 0.5),
     (100, 100), (0.25, 0.25), (1.0, 1.0)],
)
def test_parser_reads_steps_or_fraction(text, expected) -> None:
    value = parse_steps_or_fraction(text, "--x")
    assert value == expected and type(value) is type(expected)  # int = steps, float = fraction


@pytest.mark.parametrize(
    "text,match",
    [("-1", "--x='-1' must be a number of optimizer steps"), ("1.5", "in \\[0, 1\\]"), ("abc", "--x='abc'"),
     ("", "--x=''"), ("nan", "--x='nan'"), ("inf", "--x='inf'"), ("1e3", "write 1000 steps as an int"),
     ("2.0", "write 2 steps as an int"), (True, "--x=True"), (-1, "--x=-1"), (1.5, "--x=1.5"),
     (float("nan"), "--x=nan"), (2**64, "--x=18446744073709551616"), (None, "--x=None")],
)
def test_parser_refuses_with_the_name_and_value(text, match) -> None:
    with pytest.raises(SingLoRAError, match=match):
        parse_steps_or_fraction(text, "--x")


def test_resolve_steps_rounds_and_never_turns_a_positive_fraction_into_zero() -> None:
    assert resolve_steps(0.01, 1000) == 10
    assert resolve_steps(0.01, 6) == 1  # round(0.06) = 0, but a positive fraction means a ramp
    assert resolve_steps(0.0, 50) == 0
    assert resolve_steps(1.0, 37) == 37  # the whole run
    assert resolve_steps(12, None) == 12
    assert resolve_steps(0.5, None) is None  # total unknown


def test_config_uses_the_parser_whole_run_and_zero_fraction() -> None:
    assert SingLoRAConfig(ramp_up_steps=1.0, total_steps=40).resolve_ramp_up_steps() == 40  # not one step
    assert SingLoRAConfig(ramp_up_steps=0.0, total_steps=40).resolve_ramp_up_steps() == 0
    with pytest.raises(SingLoRAError, match="ramp_up_steps='10'"):  # typed: strings are for command lines
        SingLoRAConfig(ramp_up_steps="10")


def _model(**config) -> SingLoRAModel:
    base = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    fields = {"r": 2, "alpha": 4.0, "target_modules": ["0", "1"], "ramp_up_steps": 8, **config}
    return get_singlora_model(base, SingLoRAConfig(**fields))


def test_accessors_for_t_T_and_u() -> None:
    model = _model()
    model.add_adapter("other", SingLoRAConfig(r=1, target_modules=["1"], ramp_up_steps=0.5, total_steps=6))
    assert (model.get_ramp_step(), model.get_ramp_up_steps(), model.get_ramp_value()) == (0, 8, 0.0)
    assert (model.get_ramp_up_steps("other"), model.get_ramp_value("other")) == (3, 0.0)
    model.advance_ramp(3)  # the active adapter only
    assert model.get_ramp_step() == 3 and model.get_ramp_step("other") == 0
    assert model.get_ramp_value() == 3 / 8
    model.set_ramp_step(2, "other")
    assert model.get_ramp_value("other") == pytest.approx(2 / 3, abs=1e-15)  # float64
    model.set_ramp_step(20)
    assert model.get_ramp_value() == 1.0
    for _, layer in model.singlora_layers():  # every layer holds the same t
        assert int(layer.singlora["default"].ramp_step) == 20
        assert float(layer.singlora["default"].coefficient()) == pytest.approx(4.0 / 2 * 1.0)
    with pytest.raises(SingLoRAError, match="adapter 'nope' does not exist"):
        model.get_ramp_value("nope")


def test_bind_optimizer_advances_t() -> None:
    model = _model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.bind_optimizer(optimizer)
    for _ in range(5):
        optimizer.step()
    assert model.get_ramp_step() == 5 and model.get_ramp_value() == 5 / 8


def test_file_keeps_the_ramp_step_field(tmp_path) -> None:
    model = _model()
    model.set_ramp_step(4)
    model.save_adapter(tmp_path)
    document = json.loads((tmp_path / "adapter_config.json").read_text())
    assert document["ramp_step"] == 4 and document["ramp_up_steps"] == 8
    loaded = SingLoRAModel.from_pretrained(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3)), tmp_path)
    assert (loaded.get_ramp_step(), loaded.get_ramp_up_steps(), loaded.get_ramp_value()) == (4, 8, 0.5)


# ---- one default everywhere: T = 1% of the run ---------------------------------------------------------------


def test_default_is_one_percent_of_the_run_as_the_cli() -> None:
    from torch_singlora.config import DEFAULT_RAMP_UP_STEPS
    from torch_singlora.diffusion.dreambooth import DreamBoothArgs
    from torch_singlora.train.config import TrainConfig

    assert SingLoRAConfig().ramp_up_steps == DEFAULT_RAMP_UP_STEPS == 0.01
    train = TrainConfig(model="m", train_data="d", output_dir="o").ramp_up_steps
    dreambooth = DreamBoothArgs(pretrained_model="m", instance_data_dir="d", instance_prompt="p").ramp_up_steps
    for flag in (train, dreambooth):
        assert parse_steps_or_fraction(flag, "--ramp-up-steps") == DEFAULT_RAMP_UP_STEPS


def _short_run(model: SingLoRAModel, steps: int, **bind) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.bind_optimizer(optimizer, **bind)
    for _ in range(steps):
        optimizer.step()


def test_a_short_api_run_ramps_fully() -> None:
    """Six steps with the default ramp: T = max(1, round(0.06)) = 1, so u = 1 (the old default of 100 steps gave
    u = 0.06)."""
    model = _model(ramp_up_steps=DEFAULT, total_steps=6)
    _short_run(model, 6)
    assert (model.get_ramp_up_steps(), model.get_ramp_value()) == (1, 1.0)


DEFAULT = SingLoRAConfig().ramp_up_steps


def test_unknown_total_waits_at_u_zero_and_refuses_to_advance(tmp_path) -> None:
    base = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    expected = base(x)
    model = get_singlora_model(base, SingLoRAConfig(r=2, target_modules=["0", "1"]))  # default ramp, no total
    assert model.get_ramp_up_steps() is None and model.get_ramp_value() == 0.0
    assert torch.equal(model(x), expected)  # u = 0: the base model, exactly
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for call in (lambda: model.bind_optimizer(optimizer), lambda: model.advance_ramp(), lambda: model.set_ramp_step(3)):
        with pytest.raises(SingLoRAError, match=r"adapter 'default': ramp_up_steps=0.01 is a fraction .* total_steps"):
            call()
    assert model.get_ramp_step() == 0
    model.set_ramp_step(0)  # t = 0 needs no T
    _short_run(model, 4, total_steps=200)  # the run's length, given where the loop starts
    assert (model.get_ramp_up_steps(), model.get_ramp_step(), model.get_ramp_value()) == (2, 4, 1.0)
    assert model.configs["default"].total_steps == 200
    model.save_adapter(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["total_steps"] == 200
    loaded = SingLoRAModel.from_pretrained(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3)), tmp_path)
    assert (loaded.get_ramp_up_steps(), loaded.get_ramp_value()) == (2, 1.0)


def test_set_total_steps_leaves_the_config_object_and_int_ramps_alone() -> None:
    config = SingLoRAConfig(r=2, target_modules=["0"])
    model = get_singlora_model(nn.Sequential(nn.Linear(4, 6)), config)
    model.add_adapter("fixed", SingLoRAConfig(r=2, target_modules=["0"], ramp_up_steps=7))
    model.set_total_steps(1000)
    model.set_total_steps(1000, "fixed")
    assert config.total_steps is None  # the caller's object is not mutated
    assert (model.get_ramp_up_steps(), model.get_ramp_up_steps("fixed")) == (10, 7)
    with pytest.raises(SingLoRAError, match="total_steps=0 must be an int >= 1"):
        model.set_total_steps(0)


def test_trainer_callback_fills_in_the_total_from_max_steps() -> None:
    from types import SimpleNamespace

    from torch_singlora.integrations.trainer import SingLoRACallback

    model = _model(ramp_up_steps=DEFAULT)
    callback = SingLoRACallback(model, save_adapter=False)
    state = SimpleNamespace(global_step=0, max_steps=300)
    callback.on_train_begin(None, state, None)
    assert model.get_ramp_up_steps() == 3
    state.global_step = 2
    callback.on_step_end(None, state, None)
    assert model.get_ramp_value() == 2 / 3


def test_resuming_in_place_takes_the_saved_run_length(tmp_path) -> None:
    """SingLoRATrainer's resume: a fresh model with the default ramp (total unknown) takes T and t from the file."""
    model = _model(ramp_up_steps=DEFAULT)
    _short_run(model, 5, total_steps=400)
    model.save_adapter(tmp_path)
    fresh = _model(ramp_up_steps=DEFAULT)
    fresh.load_adapter_in_place(tmp_path, "default")
    assert (fresh.get_ramp_up_steps(), fresh.get_ramp_step(), fresh.get_ramp_value()) == (4, 5, 1.0)


def test_each_optimizer_step_k_runs_at_u_k_over_T_so_the_first_one_trains() -> None:
    """Issue 24: with u = t / T and t = steps taken, step 1 ran at u = 0: A's gradient was exactly 0 and the step
    was lost. During a run, step k runs at u = min(k / T, 1); at rest after k steps u is that of step k; outside a
    run (and at t = 0 at rest) nothing changes: the untrained model is the base model."""
    torch.manual_seed(0)
    base = nn.Linear(6, 4).double()
    config = SingLoRAConfig(r=2, alpha=2.0, target_modules=["0"], ramp_up_steps=4)
    model = get_singlora_model(nn.Sequential(base), config)
    adapter = model.model[0].singlora["default"]
    x = torch.randn(3, 6, dtype=torch.float64)

    def reference(u: float) -> torch.Tensor:  # base + s * u * A[:4] A[:6]^T, dense float64
        A = adapter.A.detach()
        return x @ (base.weight.detach() + 1.0 * u * (A[:4] @ A[:6].T)).T + base.bias.detach()

    model.train()
    torch.testing.assert_close(model(x), reference(0.0), rtol=0, atol=0)  # no run yet: at rest, the base model
    optimizer = torch.optim.SGD([adapter.A], lr=0.1)
    handle = model.bind_optimizer(optimizer)
    for k in range(1, 7):
        start = adapter.A.detach().clone()
        output = model(x)
        torch.testing.assert_close(output, reference(min(k / 4, 1.0)))  # step k computes at u = k / T
        output.square().sum().backward()
        assert adapter.A.grad.abs().max() > 0, k
        optimizer.step()
        optimizer.zero_grad()
        assert not torch.equal(adapter.A.detach(), start), k  # step 1 trains too
        model.eval()
        assert model.get_ramp_value() == min(k / 4, 1.0)  # at rest: the u step k trained with
        torch.testing.assert_close(model(x), reference(min(k / 4, 1.0)))
        model.train()
    handle.remove()  # t no longer moves
    model.set_training_run(False)  # the run ends: training-mode forwards are at rest again
    optimizer.step()
    assert model.get_ramp_step() == 6 and not adapter.in_run
    torch.testing.assert_close(model(x), reference(1.0))
