"""Property-based tests, each with a floor on the examples that reach its oracle.

- Valid by construction: random trees of Linear / Conv1d / Conv2d / Embedding layers with random valid configs
  (list / suffix / regex / all-linear targets, exclusions, rank and alpha patterns, rsLoRA, int and fractional
  ramps): every example compares every module, unmerged, merged and unmerged again, with a dense float64 reference
  computed here.
- Invalid by construction: the same, with one mistake; every example must be refused with ``SingLoRAError`` and the
  model (fresh, or already holding an adapter) must be exactly as it was.
- Garbage arguments to the public API: a ``SingLoRAError``, or a normal return whose result is checked.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from torch_singlora import SingLoRAConfig, SingLoRAError, SingLoRAModel, get_singlora_model

SETTINGS = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))
KINDS = ("linear", "conv1d", "conv2d", "embedding")


@st.composite
def layer_specs(draw: Any) -> dict[str, Any]:
    kind = draw(st.sampled_from(KINDS))
    spec: dict[str, Any] = {"kind": kind, "a": draw(st.integers(1, 9)), "b": draw(st.integers(1, 9))}
    if kind.startswith("conv"):
        spec["k"] = draw(st.integers(1, 3))
        spec["stride"] = draw(st.integers(1, 2))
        spec["padding"] = draw(st.integers(0, 1))
    spec["bias"] = draw(st.booleans())
    return spec


def build(spec: dict[str, Any]) -> nn.Module:
    kind, a, b = spec["kind"], spec["a"], spec["b"]
    if kind == "linear":
        return nn.Linear(a, b, bias=spec["bias"])
    if kind == "embedding":
        return nn.Embedding(a, b)
    conv = nn.Conv1d if kind == "conv1d" else nn.Conv2d
    return conv(a, b, spec["k"], stride=spec["stride"], padding=spec["padding"], bias=spec["bias"])


def make_input(module: nn.Module) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return torch.randn(3, module.in_features)
    if isinstance(module, nn.Embedding):
        return torch.randint(0, module.num_embeddings, (2, 4))
    size = (5,) if isinstance(module, nn.Conv1d) else (5, 4)
    return torch.randn(2, module.in_channels, *size)


def reference(module: nn.Module, x: torch.Tensor, A: torch.Tensor | None, c: float) -> torch.Tensor:
    """The layer's output in float64 with weight ``W0 + c * A[:d_out] @ A[:d_in].T`` (matrix view of W)."""
    weight = module.weight.detach().double()
    if A is not None:
        shape = weight.shape
        d_out, d_in = shape[0], math.prod(shape[1:])
        A = A.detach().double()
        weight = weight + (c * A[:d_out] @ A[:d_in].T).reshape(shape)
    bias = None if getattr(module, "bias", None) is None else module.bias.detach().double()
    if isinstance(module, nn.Linear):
        return F.linear(x.double(), weight, bias)
    if isinstance(module, nn.Embedding):
        return F.embedding(x, weight)
    conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
    return conv(x.double(), weight, bias, module.stride, module.padding, module.dilation, module.groups)


NAMES = ("m0", "block.m1", "m2", "block.inner.m3")  # names at three depths; the suffixes m0..m3 are unique


def rows(module: nn.Module) -> int:
    """n = max(d_out, d_in) of a module's matrix view, written out (Linear/Embedding weights are 2-D)."""
    shape = module.weight.shape
    return max(shape[0], math.prod(shape[1:]))


def make_tree(specs: list[dict[str, Any]]) -> nn.Module:
    torch.manual_seed(0)
    tree = nn.Module()
    tree.block = nn.Module()
    tree.block.inner = nn.Module()
    for name, spec in zip(NAMES, specs):
        parent, _, leaf = name.rpartition(".")
        (tree.get_submodule(parent) if parent else tree).add_module(leaf, build(spec))
    return tree


@st.composite
def valid_cases(draw: Any) -> dict[str, Any]:
    """A tree and a config that is valid for it by construction, with the expected adapted modules, ranks and
    scales computed from the drawn choices (not by the library)."""
    specs = [draw(layer_specs()) for _ in range(draw(st.integers(2, 4)))]
    names = list(NAMES[: len(specs)])
    linear = [n for n, spec in zip(names, specs) if spec["kind"] == "linear"]
    form = draw(st.sampled_from(["list", "regex", "all-linear"] if linear else ["list", "regex"]))
    if form == "all-linear":
        chosen, targets = linear, "all-linear"
    else:
        chosen = draw(st.permutations(names))[: draw(st.integers(1, len(names)))]
        if form == "list":  # full names or unique dotted suffixes
            targets = [draw(st.sampled_from([n, n.rsplit(".", 1)[-1]])) for n in chosen]
        else:
            targets = "|".join(re.escape(n) for n in chosen)
    excluded = chosen[:1] if len(chosen) > 1 and draw(st.booleans()) else []
    adapted = [n for n in names if n in chosen and n not in excluded]
    n_of = {n: rows(build(spec)) for n, spec in zip(names, specs)}
    r = draw(st.integers(1, min(n_of[n] for n in adapted)))
    ranks = {n: draw(st.integers(1, n_of[n])) for n in draw(st.lists(st.sampled_from(adapted), unique=True))}
    alphas = {n: draw(st.floats(0.1, 10.0)) for n in draw(st.lists(st.sampled_from(adapted), unique=True))}
    ramp = draw(st.one_of(st.integers(0, 6), st.floats(0.0, 1.0)))
    total = draw(st.one_of(st.none(), st.integers(1, 20)))
    if isinstance(ramp, int):
        T: int | None = ramp
    elif total is None:
        T = None  # a fraction of an unknown run: u = 0 and t stays 0
    else:
        T = max(1, round(ramp * total)) if ramp > 0 else 0
    config = SingLoRAConfig(
        r=r, alpha=draw(st.floats(0.1, 10.0)), target_modules=targets, exclude_modules=excluded or None,
        rank_pattern={n.rsplit(".", 1)[-1]: v for n, v in ranks.items()},
        alpha_pattern={n.rsplit(".", 1)[-1]: v for n, v in alphas.items()}, use_rslora=draw(st.booleans()),
        ramp_up_steps=ramp, total_steps=total,
    )
    step = 0 if T is None else draw(st.integers(0, 8))
    u = 0.0 if T is None else 1.0 if T == 0 else min(step / T, 1.0)
    expected = {}
    for n in adapted:
        rank = ranks.get(n, r)
        expected[n] = (rank, alphas.get(n, config.alpha) / (math.sqrt(rank) if config.use_rslora else rank) * u)
    return {"specs": specs, "names": names, "config": config, "step": step, "expected": expected}


def test_valid_configs_match_the_float64_reference_merged_and_unmerged() -> None:
    compared: list[int] = []

    @SETTINGS
    @given(case=valid_cases())
    def run(case: dict[str, Any]) -> None:
        tree = make_tree(case["specs"])
        originals = {n: tree.get_submodule(n) for n in case["names"]}
        inputs = {n: make_input(m) for n, m in originals.items()}
        model = get_singlora_model(tree, case["config"])
        model.set_ramp_step(case["step"])
        model.eval()
        adapted = dict(model.singlora_layers())
        assert sorted(adapted) == sorted(case["expected"])
        atol, rtol = TOLERANCES[torch.float32]
        with torch.no_grad():
            with torch.random.fork_rng():
                torch.manual_seed(1)
                for layer in adapted.values():  # larger than the N(0, 1/n) init, so the update is not negligible
                    layer.singlora["default"].A.normal_()
            expected = {}
            for name, module in originals.items():
                A, c = None, 0.0
                if name in adapted:
                    rank, c = case["expected"][name]
                    A = adapted[name].singlora["default"].A
                    assert tuple(A.shape) == (rows(module), rank)
                expected[name] = reference(module, inputs[name], A, c)
            for state in ("unmerged", "merged", "unmerged again"):
                if state == "merged":
                    model.merge()
                elif state == "unmerged again":
                    model.unmerge()
                for name, x in inputs.items():
                    actual = model.model.get_submodule(name)(x).double()
                    torch.testing.assert_close(actual, expected[name], atol=atol, rtol=rtol, msg=f"{name} {state}")
        compared.append(len(adapted))

    run()
    assert len(compared) == SETTINGS.max_examples  # every example reached the reference
    assert sum(compared) >= SETTINGS.max_examples  # and adapted at least one module each


def snapshot(tree: nn.Module, model: SingLoRAModel | None) -> tuple:
    """Everything a refused call must leave as it was: module types, every tensor, requires_grad flags, adapters."""
    structure = [(n, type(m)) for n, m in tree.named_modules()]
    tensors = {k: v.detach().clone() for k, v in tree.state_dict().items()}
    flags = [(n, p.requires_grad) for n, p in tree.named_parameters()]
    adapters = None if model is None else (dict(model.configs), list(model.active_adapters))
    return structure, tensors, flags, adapters


def same(a: tuple, b: tuple) -> bool:
    return (a[0] == b[0] and a[2] == b[2] and a[3] == b[3] and a[1].keys() == b[1].keys()
            and all(torch.equal(a[1][k], b[1][k]) for k in a[1]))


def mistakes(case: dict[str, Any], tree: nn.Module) -> dict[str, SingLoRAConfig]:
    """One config-valid change per kind of mistake that makes ``case``'s config invalid for ``tree``."""
    config: SingLoRAConfig = case["config"]
    adapted = sorted(case["expected"])
    first = adapted[0]
    nested = [n for n in case["names"] if "." in n]  # a string naming it by its suffix alone matches nothing
    plain = {"exclude_modules": None, "rank_pattern": {}, "alpha_pattern": {}}
    changes = {
        "r > n": {"r": min(rows(tree.get_submodule(n)) for n in adapted) + 1, "rank_pattern": {}},
        "rank_pattern value > n": {"rank_pattern": {first.rsplit(".", 1)[-1]: rows(tree.get_submodule(first)) + 1}},
        "list entry matches nothing": {"target_modules": [*adapted, "zzz"], "exclude_modules": None},
        "regex matches nothing": {"target_modules": "zzz.*", "exclude_modules": None},
        "string names a module by suffix only": {"target_modules": nested[0].rsplit(".", 1)[-1] if nested else "zzz",
                                                 **plain},
        "rank_pattern key matches nothing": {"rank_pattern": {"nomatch": 1}},
        "alpha_pattern key matches nothing": {"alpha_pattern": {"nomatch": 1.0}},
        "exclude entry matches nothing": {"exclude_modules": ["zzz"]},
        "modules_to_save matches nothing": {"modules_to_save": ["zzz"]},
        "grouped conv targeted": {"target_modules": ["grouped"], **plain},
        "unsupported module targeted": {"target_modules": ["block"], **plain},
    }
    return {name: dataclasses.replace(config, **change) for name, change in changes.items()}


MISTAKES = ("r > n", "rank_pattern value > n", "list entry matches nothing", "regex matches nothing",
            "string names a module by suffix only", "rank_pattern key matches nothing",
            "alpha_pattern key matches nothing", "exclude entry matches nothing", "modules_to_save matches nothing",
            "grouped conv targeted", "unsupported module targeted")


def test_invalid_configs_are_refused_and_change_nothing() -> None:
    refused: list[str] = []

    @SETTINGS
    @given(case=valid_cases(), mistake=st.sampled_from(MISTAKES), existing=st.booleans())
    def run(case: dict[str, Any], mistake: str, existing: bool) -> None:
        tree = make_tree(case["specs"])
        tree.grouped = nn.Conv2d(4, 4, 3, groups=2)
        model = get_singlora_model(tree, case["config"]) if existing else None  # a model already holding one
        if model is not None:
            model.set_ramp_step(case["step"])
        before = snapshot(tree, model)
        bad = mistakes(case, tree)[mistake]
        with pytest.raises(SingLoRAError):
            if model is None:
                get_singlora_model(tree, bad)
            else:
                model.add_adapter("second", bad)
        assert same(snapshot(tree, model), before), mistake
        refused.append(mistake)

    run()
    assert len(refused) == SETTINGS.max_examples and len(set(refused)) >= 8  # most kinds of mistake were made


# ---- garbage arguments to the public API ----------------------------------------------------------------------

garbage = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=5),
    st.sampled_from(["default", "other", "", ".", "a.b", "../x"]), st.lists(st.sampled_from(["default", "x", 1]),
                                                                         max_size=2),
    st.just({"a": 1}), st.just(object()), st.just(nn.Linear(2, 2)),
)
CALLS = ["set_ramp_step", "set_adapter", "merge", "delete_adapter", "add_adapter", "get_ramp_step", "advance_ramp",
         "bind_optimizer", "set_total_steps", "get_ramp_value", "unmerge", "get_singlora_model", "config",
         "disable_adapters", "load_adapter", "save_adapter", "load_name"]
X = torch.randn(2, 4)


def _is_count(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _as_list(value: Any) -> list:
    return [value] if isinstance(value, str) else value


def _path(folder: Any, a: Any) -> Any:
    return folder / str(a).replace("/", "_")[:20] if isinstance(a, str) else a


def _call(call: str, a: Any, b: Any, model: SingLoRAModel, folder: Any) -> Callable[[], None]:
    """Make the call (garbage ``a``, ``b``); returns the check to run when it returned normally: the arguments
    were in fact valid, and the result and the model are what that call promises."""
    layer = model.model[0]
    before, base = model(X), layer.base_layer(X)
    if call in ("set_ramp_step", "advance_ramp"):
        getattr(model, call)(a)
        return lambda: _expect(_is_count(a) and model.get_ramp_step() == a)
    if call == "set_total_steps":
        model.set_total_steps(a)
        return lambda: _expect(_is_count(a, 1) and model.get_ramp_up_steps() == max(1, round(0.01 * a)))
    if call in ("get_ramp_step", "get_ramp_value"):
        result = getattr(model, call)(a)
        return lambda: _expect(a in (None, "default") and result == 0)
    if call == "set_adapter":
        model.set_adapter(a)
        return lambda: _expect(a in ("default", ["default"], []) and model.active_adapters == _as_list(a))
    if call in ("merge", "unmerge"):
        model.merge(a) if call == "merge" else (model.merge(), model.unmerge())
        merged = [] if call == "unmerge" else ["default"]

        def check() -> None:
            _expect(call == "unmerge" or a in (None, "default", ["default"]))
            _expect(layer.merged_adapters == merged and torch.allclose(model(X), before, atol=1e-6))
        return check
    if call == "delete_adapter":
        model.delete_adapter(a)
        return lambda: _expect(a == "default" and not model.configs and type(model.model[0]) is nn.Linear)
    if call == "add_adapter":
        config = SingLoRAConfig(r=2, target_modules=["0"]) if b is None else b
        model.add_adapter(a, config)
        valid = isinstance(a, str) and a not in ("", "default") and "." not in a and isinstance(config, SingLoRAConfig)
        return lambda: _expect(valid and model.configs[a] is config and a in layer.singlora)
    if call == "bind_optimizer":
        model.bind_optimizer(a)
        return lambda: _expect(False)  # no garbage is an optimizer
    if call == "get_singlora_model":
        get_singlora_model(a, b)
        return lambda: _expect(False)  # no garbage is a (model, config) pair
    if call == "config":
        if isinstance(b, (int, float)):
            config = SingLoRAConfig(r=a, alpha=b)
            return lambda: _expect(_is_count(a, 1) and not isinstance(b, bool) and math.isfinite(b) and b > 0
                                   and (config.r, config.alpha) == (a, b))
        config = SingLoRAConfig(target_modules=a, r=2)
        valid = a is None or (isinstance(a, str) and a) or (
            isinstance(a, list) and a and all(isinstance(v, str) and v for v in a))
        return lambda: _expect(bool(valid) and config.target_modules == a)
    if call == "disable_adapters":
        with model.disable_adapters():
            inside = model(X)
        return lambda: _expect(torch.equal(inside, base) and torch.equal(model(X), before))
    if call == "save_adapter":
        model.save_adapter(_path(folder, a), b)
        return lambda: _expect(isinstance(a, str) and b in (None, "default") and sorted(
            p.name for p in _path(folder, a).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"])
    if call == "load_adapter":
        model.load_adapter(_path(folder, a), "x", b)
        return lambda: _expect(False)  # nothing was saved there
    assert call == "load_name"
    model.save_adapter(folder)
    model.load_adapter(folder, a)
    return lambda: _expect(isinstance(a, str) and a not in ("", "default") and "." not in a and model.active_adapters
                           == [a] and torch.equal(layer.singlora[a].A, layer.singlora["default"].A))


def _expect(condition: bool) -> None:
    assert condition


def test_public_api_garbage_raises_singlora_error_or_returns_what_it_should(tmp_path_factory: Any) -> None:
    returned: list[str] = []

    @SETTINGS
    @given(call=st.sampled_from(CALLS), a=garbage, b=garbage)
    def run(call: str, a: Any, b: Any) -> None:
        torch.manual_seed(0)
        model = get_singlora_model(nn.Sequential(nn.Linear(4, 3)), SingLoRAConfig(r=2, target_modules=["0"]))
        try:
            check = _call(call, a, b, model, tmp_path_factory.mktemp("d"))
        except SingLoRAError:
            return
        check()
        returned.append(call)

    run()
    assert len(returned) >= 5  # some garbage is valid after all, and those results were checked


# ---- training options (``singlora train``) ---------------------------------------------------------------------

numbers = st.one_of(st.integers(-3, 5), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0]))
TRAIN_NUMBERS = ("r", "alpha", "adapter_dropout", "loraplus_lr_ratio", "lr", "weight_decay", "eval_split",
                 "max_grad_norm", "epochs", "max_steps", "batch_size", "grad_accum", "max_length", "eval_every",
                 "save_every", "log_every", "eval_batch_size", "max_train_samples")


@SETTINGS
@given(changes=st.dictionaries(st.sampled_from(TRAIN_NUMBERS), numbers, min_size=1, max_size=3),
       texts=st.dictionaries(st.sampled_from(["ramp_up_steps", "warmup"]),
                             st.sampled_from(["0.01", "5", "-1", "1.5", "abc", "", "nan", "0"]), max_size=2))
def test_train_options_validated_up_front(changes: dict[str, Any], texts: dict[str, str]) -> None:
    """``TrainConfig.validate`` (run before anything is loaded) accepts only values the run can use: every numeric
    option is finite and in range, or the error names the flag."""
    from torch_singlora.train.loop import TrainConfig

    config = TrainConfig(model="m", train_data="d", output_dir="o", **changes, **texts)
    try:
        config.validate()
    except SingLoRAError as exc:
        assert any(f"--{name.replace('_', '-')}" in str(exc) for name in [*changes, *texts, "epochs"]), str(exc)
        return
    for name in TRAIN_NUMBERS:
        assert math.isfinite(getattr(config, name)), name
    assert config.r >= 1 and config.alpha > 0 and config.lr > 0 and config.loraplus_lr_ratio > 0
    assert config.max_grad_norm >= 0 and config.weight_decay >= 0  # a negative clip norm flips the gradients
    assert 0 <= config.eval_split < 1 and 0 <= config.adapter_dropout < 1
