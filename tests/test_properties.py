"""Property-based tests: random configs on random module trees either work, matching a dense float64 reference
computed here, or raise ``SingLoRAError`` (leaving the model unchanged), never another exception type. Random
(garbage) arguments to the public API get the same treatment."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from conftest import TOLERANCES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from torch_singlora import SingLoRAConfig, SingLoRAError, get_singlora_model

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
        spec["groups"] = draw(st.sampled_from([1, 1, 1, 2]))
    spec["bias"] = draw(st.booleans())
    return spec


def build(spec: dict[str, Any]) -> nn.Module:
    kind, a, b = spec["kind"], spec["a"], spec["b"]
    if kind == "linear":
        return nn.Linear(a, b, bias=spec["bias"])
    if kind == "embedding":
        return nn.Embedding(a, b)
    conv = nn.Conv1d if kind == "conv1d" else nn.Conv2d
    groups = spec["groups"] if a % spec["groups"] == 0 and b % spec["groups"] == 0 else 1
    return conv(a, b, spec["k"], stride=spec["stride"], padding=spec["padding"], groups=groups, bias=spec["bias"])


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


targets_strategy = st.one_of(
    st.lists(st.sampled_from(["m0", "m1", "m2", "block.m1", "zzz", "m", "1"]), min_size=0, max_size=3),
    st.sampled_from(["all-linear", "m.*", ".*", "block\\..*", "(", "", "m[02]"]),
    st.none(),
)


@SETTINGS
@given(
    specs=st.lists(layer_specs(), min_size=1, max_size=3),
    r=st.integers(-1, 10),
    alpha=st.one_of(st.floats(-1.0, 10.0), st.integers(-1, 10), st.just(float("nan"))),
    targets=targets_strategy,
    ramp=st.one_of(st.integers(-1, 6), st.floats(-0.1, 1.2)),
    total=st.one_of(st.none(), st.integers(0, 20)),
    step=st.integers(0, 8),
    rslora=st.booleans(),
    rank_pattern=st.one_of(st.just({}), st.dictionaries(st.sampled_from(["m0", "m1", "m2", "q"]), st.integers(0, 4),
                                                       max_size=2)),
)
def test_random_configs_on_random_trees(
    specs: list[dict[str, Any]], r: int, alpha: float, targets: Any, ramp: Any, total: Any, step: int,
    rslora: bool, rank_pattern: dict[str, int],
) -> None:
    torch.manual_seed(0)
    tree = nn.Module()
    tree.block = nn.Module()
    for i, spec in enumerate(specs):  # m0, block.m1, m2: names at two depths
        (tree.block if i == 1 else tree).add_module(f"m{i}", build(spec))
    names = [f"block.m{i}" if i == 1 else f"m{i}" for i in range(len(specs))]
    originals = {name: tree.get_submodule(name) for name in names}
    inputs = {name: make_input(module) for name, module in originals.items()}
    before = {k: v.clone() for k, v in tree.state_dict().items()}
    structure = [(n, type(m)) for n, m in tree.named_modules()]
    try:
        config = SingLoRAConfig(r=r, alpha=alpha, target_modules=targets, ramp_up_steps=ramp, total_steps=total,
                                use_rslora=rslora, rank_pattern=rank_pattern)
        model = get_singlora_model(tree, config)
        model.set_ramp_step(step)
    except SingLoRAError:
        assert [(n, type(m)) for n, m in tree.named_modules()] == structure
        assert all(torch.equal(v, before[k]) for k, v in tree.state_dict().items())
        return
    model.eval()
    adapted = dict(model.singlora_layers())
    T = config.resolve_ramp_up_steps()
    u = 1.0 if T == 0 else min(step / T, 1.0)
    for name, module in originals.items():
        # The targeting rule, written out: list = exact name or dotted suffix; string = full regex match.
        if targets == "all-linear":
            wanted = isinstance(module, nn.Linear)
        elif isinstance(targets, list):
            wanted = any(name == t or name.endswith("." + t) for t in targets)
        else:
            wanted = re.fullmatch(targets, name) is not None
        assert (name in adapted) == wanted, (name, targets)
        A, c = None, 0.0
        if wanted:
            rank = next((v for k, v in rank_pattern.items() if re.fullmatch(rf"(.*\.)?{k}", name)), r)
            adapter = adapted[name].singlora["default"]
            assert tuple(adapter.A.shape) == (max(adapted[name].d_out, adapted[name].d_in), rank)
            A = adapter.A
            c = alpha / (math.sqrt(rank) if rslora else rank) * u
        expected = reference(module, inputs[name], A, c)
        atol, rtol = TOLERANCES[torch.float32]
        with torch.no_grad():
            torch.testing.assert_close(model.model.get_submodule(name)(inputs[name]).double(), expected,
                                       atol=atol, rtol=rtol)
            model.merge()
            torch.testing.assert_close(model.model.get_submodule(name)(inputs[name]).double(), expected,
                                       atol=atol, rtol=rtol)
            model.unmerge()


# ---- garbage arguments to the public API ----------------------------------------------------------------------

garbage = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=5),
    st.sampled_from(["default", "other", "", ".", "a.b", "../x"]), st.lists(st.sampled_from(["default", "x", 1]),
                                                                         max_size=2),
    st.just({"a": 1}), st.just(object()), st.just(nn.Linear(2, 2)),
)
CALLS = ["set_step", "set_adapter", "merge", "delete_adapter", "add_adapter", "get_step", "step", "bind_optimizer",
         "unmerge", "get_singlora_model", "config", "disable_adapters", "load_adapter", "save_adapter", "load_name"]


@SETTINGS
@given(call=st.sampled_from(CALLS), a=garbage, b=garbage)
def test_public_api_garbage_raises_singlora_error(call: str, a: Any, b: Any, tmp_path_factory: Any) -> None:
    torch.manual_seed(0)
    model = get_singlora_model(nn.Sequential(nn.Linear(4, 3)), SingLoRAConfig(r=2, target_modules=["0"]))
    try:
        if call == "get_singlora_model":
            get_singlora_model(a, b)
        elif call == "config":
            SingLoRAConfig(r=a, alpha=b) if isinstance(b, (int, float)) else SingLoRAConfig(target_modules=a, r=2)
        elif call == "add_adapter":
            model.add_adapter(a, SingLoRAConfig(r=2, target_modules=["0"]) if b is None else b)
        elif call == "disable_adapters":
            with model.disable_adapters():
                model(torch.randn(1, 4))
        elif call in ("load_adapter", "save_adapter"):
            directory = tmp_path_factory.mktemp("d") / str(a).replace("/", "_")[:20] if isinstance(a, str) else a
            getattr(model, call)(directory, b) if call == "save_adapter" else model.load_adapter(directory, "x", b)
        elif call == "load_name":
            directory = tmp_path_factory.mktemp("d")
            model.save_adapter(directory)
            model.load_adapter(directory, a)
        elif call == "unmerge":
            model.unmerge()
        else:
            getattr(model, call)(a)
    except SingLoRAError:
        pass


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
