"""bitsandbytes 4-bit / 8-bit bases: the adapter trains on top, merging is refused, dequantize_and_merge is exact,
and stock PEFT serves the exported LoRA on the same quantized base."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_close, dense_update, expected_coefficient
from torch_singlora import SingLoRAConfig, SingLoRAError, get_singlora_model

bnb = pytest.importorskip("bitsandbytes")
from torch_singlora.integrations.quantized import dequantize_and_merge, dequantize_weight, is_quantized  # noqa: E402


def _quantized(bits: int) -> nn.Module:
    """A (out 128 > in 64) Linear and a (in 128 > out 64) Linear quantized to ``bits``, the same for every call.

    Two bases are built rather than deep-copied: a deep copy of a bitsandbytes layer does not reproduce its
    outputs. bitsandbytes' CPU 4-bit kernels need in_features >= 64 and out_features a multiple of 32.
    """
    torch.manual_seed(1234)
    dense = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
    layers = []
    for linear in dense:
        if bits == 4:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, compute_dtype=torch.float32,
                                  quant_type="nf4")
        else:
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False)
        q.load_state_dict(linear.state_dict())
        layers.append(q.to("cpu"))  # quantizes
    return nn.Sequential(*layers)


def _adapted(bits: int):
    model = get_singlora_model(_quantized(bits), SingLoRAConfig(r=3, alpha=6.0, target_modules=["0", "1"],
                                                                ramp_up_steps=2))
    model.set_ramp_step(1)
    with torch.no_grad():
        for _, layer in model.singlora_layers():
            layer.singlora["default"].A.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_adapter_on_quantized_base(bits: int) -> None:
    model, frozen = _adapted(bits), _quantized(bits)
    assert all(is_quantized(m) for m in frozen)
    x = torch.randn(5, 64)
    expected = x
    for i, (_, layer) in enumerate(model.singlora_layers()):
        A = layer.singlora["default"].A
        delta = dense_update(A, layer.d_out, layer.d_in, expected_coefficient(3, 6.0, 1, 2))
        got = layer(expected)  # the adapter adds exactly its dense update on top of the quantized layer
        expected = frozen[i](expected) + (expected.double() @ delta.T).float()
        assert_close(got, expected, torch.float32)
    with model.disable_adapters():
        assert_close(model(x), frozen(x), torch.float32)
    # training touches only A; the quantized weights stay as they are
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.bind_optimizer(optimizer)
    model(x).square().mean().backward()
    optimizer.step()
    assert model.get_ramp_step() == 2
    for (_, layer), original in zip(model.singlora_layers(), frozen):
        assert torch.equal(layer.base_layer.weight.data, original.weight.data)
    with pytest.raises(SingLoRAError, match="quantized"):
        model.merge()


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_and_merge_is_exact(bits: int) -> None:
    config = SingLoRAConfig(r=2, alpha=2.0, target_modules=["0", "1"], ramp_up_steps=0)
    model = get_singlora_model(_quantized(bits), config)
    expected = {}
    for name, layer in model.singlora_layers():
        A = layer.singlora["default"].A
        expected[name] = dequantize_weight(layer.base_layer).double() + dense_update(A, layer.d_out, layer.d_in, 1.0)
    plain = dequantize_and_merge(model)
    for name, module in plain.named_children():
        assert type(module) is nn.Linear and module.weight.dtype == torch.float32
        assert_close(module.weight, expected[name], torch.float32)


@pytest.mark.parametrize("bits", [4, 8])
def test_stock_peft_serves_export_on_quantized_base(tmp_path, bits: int) -> None:
    peft = pytest.importorskip("peft")
    from torch_singlora.export import export_lora

    model = _adapted(bits)
    export_lora(model, tmp_path)
    served = peft.PeftModel.from_pretrained(_quantized(bits), tmp_path)
    h = torch.randn(4, 64)
    with torch.no_grad():
        # Layer by layer, PEFT's LoRA term equals our update. (Whole outputs are not compared: on CPU, PEFT wraps
        # bitsandbytes layers with its generic Linear and the served base itself drifts by ~1e-3.)
        for name, layer in model.singlora_layers():
            lora_layer = served.base_model.model.get_submodule(name)
            lora_term = lora_layer(h) - lora_layer.base_layer(h)
            assert_close(lora_term, layer(h) - layer.base_layer(h), torch.float32)
            h = layer(h)


@pytest.mark.parametrize("repacked_by", ["an eval forward", "bitsandbytes' CPU packing"])
def test_dequantize_and_merge_after_the_cpu_kernel_repacked_the_weight(repacked_by: str) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its CPU kernel at the first eval-mode
    no-grad forward (``quant_state.packing_format_for_cpu``); merging must dequantize the original layout. Where the
    CPU lacks the instructions, the repacked state is made the way bitsandbytes makes it."""
    model = _adapted(4)
    expected, base = {}, {}
    for name, layer in model.singlora_layers():  # the reference, from the weights as quantized (not repacked)
        A = layer.singlora["default"].A
        base[name] = dequantize_weight(layer.base_layer).double()
        expected[name] = base[name] + dense_update(A, layer.d_out, layer.d_in, expected_coefficient(3, 6.0, 1, 2))
    x = torch.randn(5, 64)
    if repacked_by == "an eval forward":
        if not bnb.functional.has_avx512bf16():
            pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
        model.eval()
        with torch.no_grad():
            quantized = model(x)
    else:
        for _, layer in model.singlora_layers():
            weight = layer.base_layer.weight
            if not getattr(weight.quant_state, "packing_format_for_cpu", False):
                weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(weight.data,
                                                                                                weight.quant_state)
    assert all(layer.base_layer.weight.quant_state.packing_format_for_cpu for _, layer in model.singlora_layers())
    plain = dequantize_and_merge(model)
    for name, module in plain.named_children():
        assert type(module) is nn.Linear
        # Repacking stores the per-block scales (absmax) in bfloat16, which bitsandbytes cannot undo: each
        # dequantized value may move by the rounding of its scale, at most bfloat16's unit roundoff 2^-8 of itself.
        error = (module.weight.double() - expected[name]).abs()
        assert (error <= 2**-8 * base[name].abs() + 1e-6).all(), float(error.max())
    if repacked_by == "an eval forward":  # and the merged model answers as the quantized one + adapter did
        with torch.no_grad():
            merged = plain(x)
        assert torch.equal(merged.argmax(-1), quantized.argmax(-1))
        assert_close(merged, quantized, torch.bfloat16)  # the CPU kernel computes in bfloat16


NOISE_SCRIPT = """
import logging, torch
from torch_singlora.integrations.quantized import _drop_noise, quiet_bitsandbytes
quiet_bitsandbytes()
import bitsandbytes as bnb  # on AVX512-BF16 CPUs: the "Failed to load CPU gemm_4bit_forward" message, dropped
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another cpu.ops message")
layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False).to("cpu").eval()
with torch.no_grad():
    for _ in range(3):  # eval mode: MatMul8bitLt (training on CPU takes another path); its warnings dropped
        layer(torch.randn(2, 64))
    logging.getLogger("bitsandbytes.autograd._functions").removeFilter(_drop_noise)
    layer(torch.randn(2, 64))  # the control: without the filter, the warning shows
logging.getLogger("bitsandbytes.autograd._functions").warning("another _functions message")
"""


def test_bitsandbytes_noise_is_dropped_and_nothing_else() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", NOISE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("MatMul8bitLt: inputs will be cast from torch.float32") == 1  # the control's
    assert "gemm_4bit_forward" not in done.stderr
    assert "another cpu.ops message" in done.stderr and "another _functions message" in done.stderr


def test_the_cli_installs_the_noise_filter(tmp_path) -> None:
    import logging

    from torch_singlora.cli import main
    from torch_singlora.integrations import quantized

    loggers = [logging.getLogger(name) for name in quantized.BITSANDBYTES_NOISE]
    for logger in loggers:
        logger.removeFilter(quantized._drop_noise)
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert all(quantized._drop_noise in logger.filters for logger in loggers)
