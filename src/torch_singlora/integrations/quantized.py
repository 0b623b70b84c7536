"""Quantized base layers (QLoRA-style): SingLoRA adapters on bitsandbytes ``Linear4bit`` / ``Linear8bitLt``.

The adapter sits on top of the quantized layer: ``y = base_q(x) + c * (x @ A_in) @ A_out.T`` with ``A`` in float32
(``SingLoRALayer`` gives low-precision and quantized bases a float32 adapter) and the base never dequantized in
the forward. Shapes come from ``in_features``/``out_features`` (a 4-bit weight is stored packed).

Merging into a quantized weight is refused (``SingLoRALayer.merge`` raises): re-quantizing ``W0 + dW`` would
round the update away. ``dequantize_and_merge`` is the explicit alternative: it dequantizes every adapted base
layer to a plain ``nn.Linear`` (float32 by default), merges there in float32 and returns the plain model.
Export (``torch_singlora.export``) needs no dequantization at all: the LoRA factors do not involve ``W0``.

Checked on CPU with bitsandbytes 0.50 (its CPU backend runs ``Linear8bitLt`` and ``Linear4bit`` forward and
backward); the same code path runs on CUDA.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SingLoRAError
from ..model import SingLoRAModel


# Log records of bitsandbytes that are noise for us, by logger: the message's start. Dropped one by one (a filter on
# that logger for those messages only); every other bitsandbytes message, and every other logger, is untouched.
BITSANDBYTES_NOISE = {
    # at import, on CPUs with AVX512-BF16: an optional kernel from the Hugging Face hub (the built-in one is used)
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    # on every 8-bit matmul of float32 / bfloat16 inputs (hundreds per forward)
    "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast from",
}


def _drop_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(BITSANDBYTES_NOISE.get(record.name, "\0"))


def quiet_bitsandbytes() -> None:
    """Drop the bitsandbytes log messages in ``BITSANDBYTES_NOISE`` (idempotent; call before importing it)."""
    for name in BITSANDBYTES_NOISE:
        logger = logging.getLogger(name)
        if _drop_noise not in logger.filters:
            logger.addFilter(_drop_noise)


quiet_bitsandbytes()


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes quantized layer (checked by type, without importing bitsandbytes)."""
    weight = getattr(module, "weight", None)
    return weight is not None and type(weight).__module__.startswith("bitsandbytes")


def _cpu_packing_undone(data: Tensor, quant_state: Any) -> tuple[Tensor, Any]:
    """The 4-bit weight and quantization state in bitsandbytes' original layout, from the layout its CPU kernel
    uses. On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight at its first eval-mode no-grad
    forward (``quant_state.packing_format_for_cpu``: nibbles reordered, per-block scales ``absmax`` made bfloat16
    and transposed), and ``dequantize_4bit`` reads the original layout only. The nibbles go back with bitsandbytes'
    own inverse (what it does before saving or moving such a weight), on a copy of the state: the layer stays as it
    is, and the scales stay the bfloat16 values the layer computes with (the inverse would quantize them again)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    packed_absmax = quant_state.absmax  # (blocks per row, out_features) bfloat16
    state = copy.copy(quant_state)
    state.original_nested = False  # keep float scales: no second quantization of absmax
    data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    state.absmax, state.nested = packed_absmax.T.reshape(-1).float(), False
    return data, state


def dequantize_weight(module: nn.Module) -> Tensor:
    """The float32 weight ``(out, in)`` of a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` layer."""
    import bitsandbytes as bnb

    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # 4-bit: packed uint8 + quantization state
        data = weight.data
        if getattr(quant_state, "packing_format_for_cpu", False):
            data, quant_state = _cpu_packing_undone(data, quant_state)
        return bnb.functional.dequantize_4bit(data, quant_state).to(torch.float32)
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(module, "state", None), "SCB", None)
    if weight.dtype == torch.int8 and scales is not None:  # 8-bit: int8 rows + per-row absmax scales
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).to(torch.float32)
    if weight.is_floating_point():  # not quantized yet (e.g. before .to(device))
        return weight.data.to(torch.float32)
    raise SingLoRAError(f"cannot dequantize a {type(module).__name__} weight of dtype {weight.dtype}")


def dequantized_linear(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A plain ``nn.Linear`` in ``dtype`` with the dequantized weight (and bias) of a quantized layer."""
    weight = dequantize_weight(module)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=weight.device,
                       dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    linear.requires_grad_(False)
    return linear


def dequantize_and_merge(model: SingLoRAModel, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Dequantize every adapted quantized base layer to ``dtype``, merge the active adapters (in float32) and
    return the plain model (``merge_and_unload``). Quantized layers without an adapter stay quantized."""
    if not isinstance(model, SingLoRAModel):
        raise SingLoRAError(f"model must be a SingLoRAModel, got {type(model).__name__}")
    for _, layer in model.singlora_layers():
        if is_quantized(layer.base_layer):
            layer.base_layer = dequantized_linear(layer.base_layer, dtype)
    return model.merge_and_unload()


__all__ = ["dequantize_and_merge", "dequantize_weight", "dequantized_linear", "is_quantized", "quiet_bitsandbytes"]
