"""Export a SingLoRA adapter as a GGUF LoRA adapter: the file llama.cpp (``--lora``), ollama (``ADAPTER``) and
LM Studio load on top of a base GGUF model. Written with the ``gguf`` package (the ``gguf`` extra).

The layout follows llama.cpp's own converter (``convert_lora_to_gguf.py``) and loader (``src/llama-adapter.cpp``):

Metadata
    ``general.architecture`` (``"llama"``: the base model's GGUF architecture, which llama.cpp requires to match),
    ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32), ``general.name``,
    ``general.quantization_version``.
Tensors, per adapted ``nn.Linear``
    ``<base tensor>.lora_a`` with numpy shape ``(r, d_in)`` (ggml ``ne = [d_in, r]``) and ``<base tensor>.lora_b``
    with numpy shape ``(d_out, r)`` (ggml ``ne = [r, d_out]``), where ``<base tensor>`` is the base model's GGUF
    tensor name (``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight``, via ``gguf.TensorNameMap``).
    llama.cpp adds ``scale * (alpha / r) * lora_b @ lora_a`` to the weight's product, ``scale`` being the
    user's ``--lora-scaled`` factor (1 by default).

The factors are the exact plain-LoRA factors of ``export.collect_lora_factors`` (``lora_B @ lora_A == dW``, ramp
and ``alpha / r`` folded in). ``adapter.lora.alpha`` is the most common rank, so llama.cpp's ``alpha / r`` is 1; a
module of another rank ``r_m`` (``rank_pattern``) gets ``r_m / alpha`` folded into its ``lora_b``.

Llama's converter permutes the rows of ``q_proj`` and ``k_proj`` (per head, from the Hugging Face rotate-half
order to interleaved RoPE pairs; ``LlamaModel.permute``), so the same row permutation is applied to their
``lora_b``. Embeddings, ``lm_head`` of tied models and ``modules_to_save`` have no exact GGUF LoRA form here
and are refused with an error naming them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .atomic import atomic_write
from .config import rank_and_pattern
from .errors import SingLoRAError

GGUF_FILE = "adapter_model.gguf"
# storage dtype name -> gguf.GGMLQuantizationType member name
GGUF_DTYPES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class GGUFArchitecture:
    """How llama.cpp's converter writes one transformers ``model_type``: its GGUF architecture (a
    ``gguf.MODEL_ARCH`` member name) and whether it permutes q/k rows (``LlamaModel.undo_permute``)."""

    arch: str
    permute_qk: bool


# transformers model_type -> what convert_hf_to_gguf.py registers for it (LlamaForCausalLM, MistralForCausalLM)
ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture("LLAMA", permute_qk=True),
    "mistral": GGUFArchitecture("LLAMA", permute_qk=True),
}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise SingLoRAError('GGUF export needs the gguf package: pip install "torch-singlora[gguf]"') from None
    return gguf


def rope_permute(rows: Tensor, n_head: int) -> Tensor:
    """llama.cpp's ``LlamaModel.permute`` of a q/k weight's rows: within each of ``n_head`` heads, the rotate-half
    order ``[0, 1, ..., h/2 - 1 | h/2, ..., h - 1]`` becomes the interleaved ``[0, h/2, 1, h/2 + 1, ...]``.

    ``rows``: ``(n_head * head_dim, ...)`` -> same shape."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _config_int(config: Any, field: str) -> int:
    value = getattr(config, field, None)
    if not isinstance(value, int):
        raise SingLoRAError(f"GGUF export: the base model's config has no integer {field!r} (got {value!r})")
    return value


def gguf_tensors(adapter: Any, config: Any) -> tuple[dict[str, Tensor], float]:
    """The GGUF adapter's tensors (float32, numpy order, see the module docstring) and its ``alpha``.

    Args:
        adapter: an ``export.ExportedAdapter`` (``collect_lora_factors``).
        config: the base model's transformers config (``model_type``, heads, layers, ``tie_word_embeddings``).
    """
    gguf = _gguf()
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise SingLoRAError(f"GGUF export: model_type {model_type!r} is not supported (supported: "
                            f"{sorted(ARCHITECTURES)}); use --format peft")
    if adapter.saved:
        raise SingLoRAError(f"GGUF export: a GGUF LoRA has no place for modules_to_save ({sorted(adapter.saved)[:3]}"
                            "...); train without them or use --format peft")
    if not adapter.factors:
        raise SingLoRAError("GGUF export: the adapter has no adapted module")
    architecture = ARCHITECTURES[model_type]
    n_head = _config_int(config, "num_attention_heads")
    n_kv_head = getattr(config, "num_key_value_heads", None) or n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture.arch], _config_int(config, "num_hidden_layers"))
    alpha, _ = rank_and_pattern({module: f.rank for module, f in adapter.factors.items()})
    tensors: dict[str, Tensor] = {}
    for module, factors in sorted(adapter.factors.items()):
        base_name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if factors.kind != "linear" or base_name is None or base_name.startswith(("token_embd", "output.")):
            raise SingLoRAError(
                f"GGUF export: module {module!r} ({factors.kind}) has no GGUF LoRA tensor (supported: the Linear "
                "layers of the decoder blocks: attention q/k/v/o and MLP gate/up/down); exclude it or use --format peft"
            )
        lora_A = factors.lora_A.to(torch.float32)
        lora_B = factors.lora_B.to(torch.float32) * (factors.rank / alpha)  # llama.cpp scales by alpha / rank
        if architecture.permute_qk and base_name.endswith(".attn_q.weight"):
            lora_B = rope_permute(lora_B, n_head)
        elif architecture.permute_qk and base_name.endswith(".attn_k.weight"):
            lora_B = rope_permute(lora_B, n_kv_head)
        tensors[base_name + ".lora_a"] = lora_A.contiguous()
        tensors[base_name + ".lora_b"] = lora_B.contiguous()
    return tensors, float(alpha)


def write_gguf(adapter: Any, path: str | os.PathLike, config: Any, *, dtype: str = "float32",
               name: str | None = None) -> Path:
    """Write ``adapter`` (an ``export.ExportedAdapter``) as a GGUF LoRA file at ``path`` (atomically).

    Args:
        config: the base model's transformers config.
        dtype: storage type of ``lora_a``/``lora_b``: ``"float32"`` (exact), ``"float16"`` or ``"bfloat16"``.
        name: ``general.name`` (default: ``<base model folder name>-singlora``).
    """
    gguf = _gguf()
    if dtype not in GGUF_DTYPES:
        raise SingLoRAError(f"GGUF export: dtype={dtype!r} must be one of {sorted(GGUF_DTYPES)}")
    qtype = gguf.GGMLQuantizationType[GGUF_DTYPES[dtype]]
    tensors, alpha = gguf_tensors(adapter, config)
    arrays = {}  # key -> the stored data (numpy, in gguf's storage layout for qtype)
    for key, tensor in tensors.items():
        arrays[key] = gguf.quants.quantize(tensor.numpy(), qtype)
        if not torch.isfinite(torch.from_numpy(gguf.quants.dequantize(arrays[key], qtype))).all():
            raise SingLoRAError(f"GGUF export to {path}: {key} would hold Inf or NaN in {dtype} (values up to "
                                f"{tensor.abs().max().item():.3g}); use dtype float32; nothing was written")
    architecture = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[ARCHITECTURES[config.model_type].arch]]
    out = Path(path)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch=architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        base = Path(adapter.base_model_name_or_path or "model").name
        writer.add_name(name or f"{base}-singlora")
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, array in arrays.items():
            writer.add_tensor(key, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write)
    return out


__all__ = ["ARCHITECTURES", "GGUF_DTYPES", "GGUF_FILE", "GGUFArchitecture", "gguf_tensors", "rope_permute",
           "write_gguf"]
