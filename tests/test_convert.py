"""Import of the two public implementations' checkpoints. Fixtures are built here from their documented layouts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import assert_close, dense_update, expected_coefficient
from torch_singlora import AdapterFileError, SingLoRAError, SingLoRAModel
from torch_singlora.convert import convert_kyegomez, convert_peft_singlora


def _base() -> nn.Module:
    # square 8x8, in > out (12 -> 5), out > in (5 -> 12), and a Conv2d that these formats cannot hold
    return nn.ModuleDict({"sq": nn.Linear(8, 8), "down": nn.Linear(12, 5), "up": nn.Linear(5, 12),
                          "conv": nn.Conv2d(2, 3, 1)})


def _matrices(r: int = 2) -> dict[str, torch.Tensor]:
    return {"sq": torch.randn(8, r), "down": torch.randn(12, r), "up": torch.randn(12, r + 1)}


def _kyegomez_state(base: nn.Module, matrices: dict[str, torch.Tensor], steps: dict[str, float]) -> dict:
    """The documented layout: the whole model, adapted Linears wrapped as original_layer + A + training_step."""
    state = {}
    for name, module in base.named_children():
        for key, value in module.state_dict().items():
            prefix = f"{name}.original_layer" if name in matrices else name
            state[f"{prefix}.{key}"] = value.clone()
    for name, A in matrices.items():
        state[f"{name}.A"] = A
        state[f"{name}.training_step"] = torch.tensor(steps[name], dtype=torch.float32)
    return state


def _check_loaded(base: nn.Module, out_dir, matrices, alpha: float, step: int, T: int) -> None:
    model = SingLoRAModel.from_pretrained(base, out_dir)
    assert model.get_ramp_step() == step
    for name, layer in model.singlora_layers():
        A = matrices[name]
        c = expected_coefficient(A.shape[1], alpha, step, T)
        assert_close(layer.get_delta_weight("default"), dense_update(A, layer.d_out, layer.d_in, c), torch.float32)
    model.unload()


def test_kyegomez_checkpoint_converts_exactly(tmp_path) -> None:
    base, matrices = _base(), _matrices()
    state = _kyegomez_state(base, matrices, {"sq": 30.0, "down": 30.0, "up": 30.0})
    save_file(state, str(tmp_path / "ckpt.safetensors"))
    report = convert_kyegomez(tmp_path / "ckpt.safetensors", tmp_path / "out", base_model=base, alpha=4.0,
                              ramp_up_steps=100)
    assert report.mapped == {"sq": (8, 2), "down": (12, 2), "up": (12, 3)} and report.ramp_step == 30
    assert "forward calls" in str(report)
    assert all(p.requires_grad for p in base.parameters())  # base model left as it was
    _check_loaded(base, tmp_path / "out", matrices, alpha=4.0, step=30, T=100)


def test_kyegomez_refusals(tmp_path) -> None:
    base, matrices = _base(), _matrices()
    steps = {"sq": 3.0, "down": 4.0, "up": 3.0}
    with pytest.raises(SingLoRAError, match="steps differ"):
        convert_kyegomez(_kyegomez_state(base, matrices, steps), tmp_path, base_model=base, alpha=1.0, ramp_up_steps=5)
    same = dict.fromkeys(steps, 3.0)
    bad = dict(matrices, down=torch.randn(5, 2))  # n must be max(in, out) = 12
    with pytest.raises(SingLoRAError, match=r"'down' has A of shape \(5, 2\)"):
        convert_kyegomez(_kyegomez_state(base, bad, same), tmp_path, base_model=base, alpha=1.0, ramp_up_steps=5)
    state = _kyegomez_state(base, matrices, same)
    state["conv.A"], state["conv.training_step"], state["conv.original_layer.weight"] = (
        torch.randn(3, 1), torch.tensor(3.0), torch.zeros(3, 2, 1, 1))
    with pytest.raises(SingLoRAError, match="'conv' is a Conv2d"):
        convert_kyegomez(state, tmp_path, base_model=base, alpha=1.0, ramp_up_steps=5)
    state = _kyegomez_state(base, {"missing": torch.randn(8, 2)}, {"missing": 1.0})
    state["missing.original_layer.weight"] = torch.zeros(8, 8)
    with pytest.raises(SingLoRAError, match="'missing' is not in the base model"):
        convert_kyegomez(state, tmp_path, base_model=base, alpha=1.0, ramp_up_steps=5)
    (tmp_path / "model.bin").write_bytes(b"not opened")
    with pytest.raises(AdapterFileError, match="never opened"):
        convert_kyegomez(tmp_path / "model.bin", tmp_path, base_model=base, alpha=1.0, ramp_up_steps=5)
    assert not (tmp_path / "adapter_config.json").exists()


def _peft_singlora_dir(path, matrices, config: dict, steps: dict[str, float] | None) -> None:
    """The documented layout: a PEFT LoRA folder whose lora_A is (max(in, out), r), no lora_B."""
    path.mkdir()
    tensors = {f"base_model.model.{name}.lora_A": A for name, A in matrices.items()}
    for name, step in (steps or {}).items():
        tensors[f"base_model.model.{name}.training_step_default"] = torch.tensor(step)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": sorted(matrices),
                                                          **config}))


def test_peft_singlora_adapter_converts_exactly(tmp_path) -> None:
    base, matrices = _base(), _matrices()
    config = {"r": 2, "lora_alpha": 6, "rank_pattern": {"up": 3}, "alpha_pattern": {}, "use_rslora": False}
    _peft_singlora_dir(tmp_path / "in", matrices, config, dict.fromkeys(matrices, 12.0))
    report = convert_peft_singlora(tmp_path / "in", tmp_path / "out", base_model=base, ramp_up_steps=40)
    assert report.ramp_step == 12 and report.config.rank_for("up") == 3
    _check_loaded(base, tmp_path / "out", matrices, alpha=6.0, step=12, T=40)


def test_peft_singlora_refusals(tmp_path) -> None:
    base, matrices = _base(), _matrices()
    config = {"r": 2, "lora_alpha": 2, "rank_pattern": {"up": 3}}
    _peft_singlora_dir(tmp_path / "nostep", matrices, config, None)
    with pytest.raises(SingLoRAError, match="pass ramp_up_steps"):
        convert_peft_singlora(tmp_path / "nostep", tmp_path / "out", base_model=base)
    with pytest.raises(SingLoRAError, match="pass ramp_step="):
        convert_peft_singlora(tmp_path / "nostep", tmp_path / "out", base_model=base, ramp_up_steps=10)
    report = convert_peft_singlora(tmp_path / "nostep", tmp_path / "out", base_model=base, ramp_up_steps=10,
                                   ramp_step=10)
    assert report.ramp_step == 10
    wrong_rank = dict(matrices, up=torch.randn(12, 2))
    _peft_singlora_dir(tmp_path / "rank", wrong_rank, config, None)
    with pytest.raises(SingLoRAError, match="'up' has rank 2 but the checkpoint's config gives 3"):
        convert_peft_singlora(tmp_path / "rank", tmp_path / "o2", base_model=base, ramp_up_steps=10, ramp_step=1)
    _peft_singlora_dir(tmp_path / "lora", matrices, config, None)
    lora_b = {"base_model.model.sq.lora_B.weight": torch.zeros(8, 2)}
    save_file(lora_b, str(tmp_path / "lora" / "adapter_model.safetensors"))
    with pytest.raises(SingLoRAError, match="lora_B"):
        convert_peft_singlora(tmp_path / "lora", tmp_path / "o3", base_model=base, ramp_up_steps=10, ramp_step=1)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
