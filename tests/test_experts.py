"""SingLoRA on 3-D expert parameters (``target_parameters``) of two transformers MoE architectures, Qwen3-MoE
(``(E, d_out, d_in)``) and gpt-oss (``(E, d_in, d_out)``, ``is_transposed``), against a dense float64 reference
written here; merge, unload, save/load, and the PEFT ``target_parameters`` export loaded by stock PEFT."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import expected_coefficient
from torch_singlora import SingLoRAConfig, SingLoRAError, SingLoRAModel, get_singlora_model
from torch_singlora.export import export_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _tiny(arch: str) -> torch.nn.Module:
    """A tiny float64 MoE causal LM (eager experts: grouped_mm has no float64 kernel)."""
    torch.manual_seed(0)
    common = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=8, num_experts_per_tok=2, experts_implementation="eager")
    if arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(intermediate_size=24, moe_intermediate_size=12, num_experts=4,
                                             mlp_only_layers=[], **common)
        model = transformers.Qwen3MoeForCausalLM(config)
    else:
        config = transformers.GptOssConfig(intermediate_size=12, num_local_experts=4,
                                           layer_types=["full_attention"] * 2, **common)
        model = transformers.GptOssForCausalLM(config)
    return model.double().eval()


def _adapted(arch: str, **overrides) -> tuple[torch.nn.Module, SingLoRAModel]:
    base = _tiny(arch)
    reference = copy.deepcopy(base)
    fields = dict(r=3, alpha=5.0, target_modules=[], target_parameters=PARAMETERS, ramp_up_steps=10,
                  rank_pattern={r"model\.layers\.1\.mlp\.experts\.down_proj": 2})
    fields.update(overrides)
    model = get_singlora_model(base, SingLoRAConfig(**fields))
    with torch.no_grad():
        for _, layer in model.singlora_layers():
            layer.singlora["default"].A.normal_(0, 0.3)
    model.set_ramp_step(5)  # u = 0.5
    return reference, model


def _dense_reference(reference: torch.nn.Module, model: SingLoRAModel, arch: str) -> torch.nn.Module:
    """``reference`` with every adapted stack updated expert by expert: W[e] += c * A[e, :d_out] @ A[e, :d_in].T,
    transposed for gpt-oss, whose stacks are (E, d_in, d_out)."""
    expected = copy.deepcopy(reference)
    with torch.no_grad():
        for name, layer in model.singlora_layers():
            A = layer.singlora["default"].A.detach().double()
            r = A.shape[-1]
            c = expected_coefficient(r, 5.0, 5, 10)
            stack = expected.get_parameter(name)
            for e in range(stack.shape[0]):
                if arch == "gpt_oss":
                    d_in, d_out = stack.shape[1:]
                    stack[e] += (c * A[e, :d_out] @ A[e, :d_in].T).T
                else:
                    d_out, d_in = stack.shape[1:]
                    stack[e] += c * A[e, :d_out] @ A[e, :d_in].T
    return expected


def _ids() -> torch.Tensor:
    return torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


ARCHS = ["qwen3_moe", "gpt_oss"]


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_merge_unload_match_dense_reference(arch) -> None:
    reference, model = _adapted(arch)
    names = [name for name, _ in model.singlora_layers()]
    assert names == [f"model.layers.{i}.{p}" for i in range(2) for p in PARAMETERS]
    shapes = {name: tuple(layer.singlora["default"].A.shape) for name, layer in model.singlora_layers()}
    assert shapes["model.layers.0.mlp.experts.gate_up_proj"] == (4, 24, 3)  # (E, max(2 * 12, 16), r)
    assert shapes["model.layers.1.mlp.experts.down_proj"] == (4, 16, 2)  # rank_pattern
    expected = _logits(_dense_reference(reference, model, arch))
    base = _logits(reference)
    assert (expected - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(_logits(model), expected, atol=1e-10, rtol=1e-10)
    with model.disable_adapters():
        torch.testing.assert_close(_logits(model), base, atol=1e-10, rtol=1e-10)
    model.merge()
    torch.testing.assert_close(_logits(model), expected, atol=1e-10, rtol=1e-10)
    model.unmerge()
    torch.testing.assert_close(_logits(model), expected, atol=1e-10, rtol=1e-10)
    plain = model.merge_and_unload()
    experts = plain.model.layers[0].mlp.experts
    assert type(experts) is type(reference.model.layers[0].mlp.experts)
    fresh = _tiny(arch)
    fresh.load_state_dict(plain.state_dict(), strict=True)  # the original keys, adapter folded in
    torch.testing.assert_close(_logits(fresh), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_step_moves_only_A(arch) -> None:
    _, model = _adapted(arch, rank_pattern={})
    stack = model.model.get_parameter("model.layers.0.mlp.experts.base_layer.gate_up_proj").detach().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.dim() for p in trainable} == {3}
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    before = [p.detach().clone() for p in trainable]
    model(_ids(), labels=_ids()).loss.backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, trainable))
    assert torch.equal(model.model.get_parameter("model.layers.0.mlp.experts.base_layer.gate_up_proj"), stack)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_and_stock_peft_export(arch, tmp_path) -> None:
    reference, model = _adapted(arch)
    expected = _logits(_dense_reference(reference, model, arch))
    model.save_adapter(tmp_path / "singlora")
    loaded = SingLoRAModel.from_pretrained(copy.deepcopy(reference), tmp_path / "singlora")
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-10, rtol=1e-10)

    export_lora(model, tmp_path / "peft")
    # PEFT 0.21 warns that rank_pattern keys naming parameters "did not match any targeted module"; it applies them
    # all the same (the rank-2 stacks of layer 1 would not load otherwise).
    served = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(served), expected, atol=1e-10, rtol=1e-10)
    export_lora(tmp_path / "singlora", tmp_path / "peft_from_dir", base_model=copy.deepcopy(reference))
    served = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "peft_from_dir").eval()
    torch.testing.assert_close(_logits(served), expected, atol=1e-10, rtol=1e-10)


def test_expert_errors() -> None:
    with pytest.raises(SingLoRAError, match="target_parameters entry 'mlp.experts.nothing' matches no parameter"):
        _adapted("qwen3_moe", target_parameters=["mlp.experts.nothing"], rank_pattern={})
    with pytest.raises(SingLoRAError, match="3-D"):
        _adapted("qwen3_moe", target_parameters=["mlp.gate.weight"], rank_pattern={})
    with pytest.raises(SingLoRAError, match="dropout"):
        _adapted("qwen3_moe", dropout=0.1, rank_pattern={})
    base = _tiny("qwen3_moe")
    state = copy.deepcopy(base.state_dict())
    with pytest.raises(SingLoRAError, match="r=40 .*exceeds"):
        get_singlora_model(base, SingLoRAConfig(r=40, target_modules=[], target_parameters=PARAMETERS))
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in state.items())  # nothing changed


def test_file_keys_delete_and_mixed_batches(tmp_path) -> None:
    from safetensors import safe_open

    reference, model = _adapted("qwen3_moe")
    model.save_adapter(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as weights:
        shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    assert shapes == {"model.layers.0.mlp.experts.gate_up_proj.singlora_A": (4, 24, 3),
                      "model.layers.0.mlp.experts.down_proj.singlora_A": (4, 16, 3),
                      "model.layers.1.mlp.experts.gate_up_proj.singlora_A": (4, 24, 3),
                      "model.layers.1.mlp.experts.down_proj.singlora_A": (4, 16, 2)}
    model.eval()
    from torch_singlora.inspection import inspect_adapter

    report = inspect_adapter(str(tmp_path))["modules"]["model.layers.0.mlp.experts.gate_up_proj"]
    A = model.model.model.layers[0].mlp.experts.gate_up_proj.singlora["default"].A.detach().double()
    assert report["shape"] == [4, 24, 3]
    assert report["norm_update"] == pytest.approx(5 / 3 * 0.5 * float(torch.cat([a.T @ a for a in A]).norm()))
    with pytest.raises(SingLoRAError, match="mixed-adapter batches .*target_parameters"):
        model(_ids(), adapter_names=["default", "__base__"])
    model.delete_adapter("default")
    assert type(model.model.model.layers[0].mlp.experts) is type(reference.model.layers[0].mlp.experts)
    assert set(model.model.state_dict()) == set(reference.state_dict())
    torch.testing.assert_close(_logits(model), _logits(reference), atol=0, rtol=0)


def test_reset_parameters_reinitialises_each_expert(tmp_path) -> None:
    """FSDP2's meta-device recipe calls reset_parameters(): each expert's (n, r) slice gets N(0, 1/n), t = 0
    (it used to initialise the 3-D A as one matrix with n = E: std 0.7 instead of 0.031 here)."""
    from torch_singlora.experts import ExpertAdapter

    adapter = ExpertAdapter(2, 1024, 8, scale=1.0, ramp_up_steps=0, dropout=0.0, init="normal", init_std=None)
    with torch.no_grad():
        adapter.A.fill_(float("nan"))
        adapter.ramp_step.fill_(7)
    adapter.reset_parameters()
    for expert in adapter.A.detach():
        assert float(expert.std()) == pytest.approx(1024 ** -0.5, rel=0.05)
    assert int(adapter.ramp_step) == 0


def test_a_file_naming_expert_parameters_with_dropout_changes_nothing(tmp_path) -> None:
    """Loading takes the adapted parameters from the file's keys: dropout is refused for them before the model
    changes (it was refused only after the experts module had been wrapped)."""
    import json

    _, model = _adapted("qwen3_moe")
    model.save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update(dropout=0.1, target_parameters=None, target_modules=["q_proj"])  # patterns are metadata here
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base = _tiny("qwen3_moe")
    types, state = [type(m) for m in base.modules()], copy.deepcopy(base.state_dict())
    with pytest.raises(SingLoRAError, match="dropout=0.1 cannot apply to expert parameters"):
        SingLoRAModel.from_pretrained(base, tmp_path)
    assert [type(m) for m in base.modules()] == types
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in state.items())
