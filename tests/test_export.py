"""Exact export to plain LoRA: stock PEFT and stock diffusers load our files and reproduce the SingLoRA model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from conftest import assert_close, dense_update, expected_coefficient
from torch_singlora import SingLoRAConfig, SingLoRAError, get_singlora_model
from torch_singlora.export import collect_lora_factors, export_lora

peft = pytest.importorskip("peft")


class Toy(nn.Module):
    """Embedding (30, 12) -> square Linear 12x12 -> wide Linear 12->20 (out > in) -> narrow Linear 20->6,
    plus a Conv2d 3->5 (3x3) branch on an image."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.square = nn.Linear(12, 12)
        self.wide = nn.Linear(12, 20)
        self.narrow = nn.Linear(20, 6)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.head = nn.Linear(6, 2)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.narrow(torch.tanh(self.wide(torch.tanh(self.square(self.emb(ids))))))
        return self.head(h).sum(1) + self.conv(image).mean((1, 2, 3))[:, None]


def _assert_differs(base_output: torch.Tensor, adapted_output: torch.Tensor) -> None:
    """The adapter must change the output, or a loader that drops it would pass."""
    assert (base_output - adapted_output).abs().max() > 1e-3


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 30, (2, 7)), torch.randn(2, 3, 6, 6)


def _adapted(**overrides) -> tuple[nn.Module, nn.Module]:
    """(un-adapted copy of the base, SingLoRA model) with random A and a half-way ramp (u = 0.5)."""
    base = Toy()
    reference = copy.deepcopy(base)
    fields = dict(r=3, alpha=5.0, target_modules=["emb", "square", "wide", "narrow", "conv"], ramp_up_steps=10,
                  rank_pattern={"wide": 4})
    fields.update(overrides)
    model = get_singlora_model(base, SingLoRAConfig(**fields))
    with torch.no_grad():
        for _, layer in model.singlora_layers():
            layer.singlora["default"].A.normal_(0, 0.5)
    model.set_ramp_step(5)
    return reference, model


def test_factors_equal_dense_reference() -> None:
    _, model = _adapted()
    factors = collect_lora_factors(model).factors
    for name, layer in model.singlora_layers():
        A = layer.singlora["default"].A
        r = A.shape[1]
        c = expected_coefficient(r, 5.0, 5, 10)
        expected = dense_update(A, layer.d_out, layer.d_in, c)
        assert_close((factors[name].lora_B.double() @ factors[name].lora_A.double()), expected, torch.float32)


def test_stock_peft_loads_export_linear_conv_embedding(tmp_path) -> None:
    reference, model = _adapted(modules_to_save=["head"])
    with torch.no_grad():
        model.model.head.copies["default"].weight.add_(1.0)
    export_lora(model, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 3 and config["rank_pattern"] == {"wide": 4}
    ids, image = _inputs()
    with torch.no_grad():
        _assert_differs(reference(ids, image), model(ids, image))
        loaded = peft.PeftModel.from_pretrained(reference, tmp_path)
        assert_close(loaded(ids, image), model(ids, image))


def test_export_from_directory_equals_export_from_model(tmp_path) -> None:
    reference, model = _adapted()
    model.save_adapter(tmp_path / "singlora")
    export_lora(tmp_path / "singlora", tmp_path / "a", base_model=copy.deepcopy(reference))
    export_lora(model, tmp_path / "b")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert_close(a[key], b[key])


def test_export_errors(tmp_path) -> None:
    _, model = _adapted()
    with pytest.raises(SingLoRAError, match="format="):
        export_lora(model, tmp_path, format="onnx")
    with pytest.raises(SingLoRAError, match="base_model"):
        export_lora(tmp_path, tmp_path / "x")
    with pytest.raises(SingLoRAError, match="embedding layer"):
        export_lora(model, tmp_path, format="diffusers")
    model.merge()
    with pytest.raises(SingLoRAError, match="unmerge"):
        export_lora(model, tmp_path)


def test_export_refuses_factors_beyond_the_storage_range(tmp_path) -> None:
    """A float64 adapter file whose update overflows float32, or float16 storage of large factors: refused, no file."""
    reference, model = _adapted()
    model.double()
    with torch.no_grad():
        model.model.square.singlora["default"].A.fill_(1e100)  # the update fits float64, the factors not float32
    model.save_adapter(tmp_path / "f64")
    with pytest.raises(SingLoRAError, match=r"\['base_model.model.square.lora_A.weight', 'base_model.model.square."
                                            r"lora_B.weight'\] would hold NaN or Inf.*torch.float32"):
        export_lora(tmp_path / "f64", tmp_path / "out", base_model=copy.deepcopy(reference).double(),
                    dtype=torch.float32)
    _, model = _adapted()
    with torch.no_grad():
        model.model.wide.singlora["default"].A.fill_(1e6)  # the factors' entries ~ 1e6, beyond float16's 65504
    with pytest.raises(SingLoRAError, match="wide.*torch.float16"):
        export_lora(model, tmp_path / "out", dtype=torch.float16)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("r", [1, 3])
def test_stock_peft_loads_gpt2_conv1d_export(tmp_path, r) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16, vocab_size=40)
    base = transformers.GPT2LMHeadModel(config).eval()
    reference = copy.deepcopy(base)
    # c_attn (in 16 -> out 48, out > in) and c_proj (16 -> 16) are transformers Conv1D; c_fc 16 -> 64, mlp c_proj 64->16
    model = get_singlora_model(base, SingLoRAConfig(r=r, alpha=3.0, target_modules=["c_attn", "c_proj", "c_fc"],
                                                    ramp_up_steps=0))
    assert {layer.kind for _, layer in model.singlora_layers()} == {"conv1d_t"}
    with torch.no_grad():
        for _, layer in model.singlora_layers():
            layer.singlora["default"].A.normal_(0, 0.3)
    export_lora(model, tmp_path)
    ids = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        _assert_differs(reference(ids).logits, model(ids).logits)
        loaded = peft.PeftModel.from_pretrained(reference, tmp_path).eval()
        assert_close(loaded(ids).logits, model(ids).logits)


def _tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4,
    ).eval()


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_stock_diffusers_loads_unet_export(tmp_path, format) -> None:
    from diffusers import StableDiffusionPipeline

    base = _tiny_unet()
    reference = copy.deepcopy(base)
    # to_q: 8x8 square; to_k / to_v: cross-attention 12 -> 8 (in > out); to_out.0: square; conv1: resnet 3x3 Conv2d
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]
    model = get_singlora_model(base, SingLoRAConfig(r=2, alpha=4.0, target_modules=targets, ramp_up_steps=4))
    with torch.no_grad():
        for _, layer in model.singlora_layers():
            layer.singlora["default"].A.normal_(0, 0.4)
    model.set_ramp_step(1)
    assert any(layer.d_in != layer.d_out for _, layer in model.singlora_layers())
    export_lora(model, tmp_path, format=format)
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path))
    sample, t, text = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 5, 12)
    with torch.no_grad():
        expected = model(sample, t, text).sample
        _assert_differs(reference(sample, t, text).sample, expected)
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, reference)
    with torch.no_grad():
        assert_close(reference(sample, t, text).sample, expected)
    if format == "diffusers":  # the lower-level entry point, and export from a saved adapter + base UNet
        again = _tiny_unet()
        again.load_state_dict(copy.deepcopy(model).unload().state_dict())
        model.save_adapter(tmp_path / "singlora")
        from_dir = export_lora(tmp_path / "singlora", tmp_path / "from_dir", format=format, base_model=again)
        again.load_lora_adapter(str(from_dir), prefix="unet")
        with torch.no_grad():
            assert_close(again(sample, t, text).sample, expected)
